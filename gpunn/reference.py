"""Plain-torch forms of gpunn's layers: the same signatures and results as gpunn.functional's, in torch ops.

They serve three purposes: gpunn.functional's path on devices where Triton does not run, the torch baseline
and float64 reference of `python -m gpunn check`, and the eager providers of the benchmarks. No argument
checks here: gpunn.functional checks before it calls them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Each activation as torch ops, act(z, negative_slope).
ACTIVATIONS = {
    None: lambda z, slope: z,
    "relu": lambda z, slope: F.relu(z),
    "leaky_relu": lambda z, slope: F.leaky_relu(z, slope),
    "gelu": lambda z, slope: F.gelu(z),
    "gelu_tanh": lambda z, slope: F.gelu(z, approximate="tanh"),
    "tanh": lambda z, slope: torch.tanh(z),
    "sigmoid": lambda z, slope: torch.sigmoid(z),
    "silu": lambda z, slope: F.silu(z),
}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
           negative_slope: float = 0.01) -> torch.Tensor:
    """act(x W^T + b): F.linear, then the activation as its own op. x (*, K), weight (N, K), bias (N,)."""
    return ACTIVATIONS[activation](F.linear(x, weight, bias), negative_slope)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, negative_slope: float = 0.01) -> torch.Tensor:
    """act(x (W * mask)^T + b) as the dense product of the masked weight; mask is bool (N, K).
    masked_fill, not a multiply, so that NaN or Inf in masked-out weights stays out (0 * inf is NaN)."""
    return linear(x, weight.masked_fill(~mask, 0), bias, activation, negative_slope)


def same_padding(kernel_size: tuple[int, int], dilation: tuple[int, int]
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
    """padding="same" (stride 1) as nn.Conv2d pads: ((top, left), (bottom, right)), the far side one more
    where dilation x (kernel - 1) is odd."""
    totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    return (totals[0] // 2, totals[1] // 2), (totals[0] - totals[0] // 2, totals[1] - totals[1] // 2)


def locally_connected2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                        padding=0, dilation=1) -> torch.Tensor:
    """F.unfold (the patch tensor in memory), then one einsum with every position's own filter.

    x (N, C, H, W) or (C, H, W); weight (O, OH, OW, C, KH, KW); bias (O, OH, OW); padding an int, a pair,
    "valid" or "same" (F.pad first where "same" pads one side more). Returns (N, O, OH, OW) or (O, OH, OW)."""
    batched = x.dim() == 4
    x = x if batched else x.unsqueeze(0)
    o, oh, ow, c, kh, kw = weight.shape
    if padding == "valid":
        padding = 0
    elif padding == "same":
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        (top, left), (bottom, right) = same_padding((kh, kw), pair(dilation))
        x, padding = F.pad(x, (left, right, top, bottom)), 0
    patches = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C KH KW, OH OW)
    y = torch.einsum("nrl,olr->nol", patches, weight.reshape(o, oh * ow, c * kh * kw))
    if bias is not None:
        y = y + bias.reshape(o, oh * ow)
    y = y.reshape(x.shape[0], o, oh, ow)
    return y if batched else y.squeeze(0)


def locally_connected1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                        padding=0, dilation=1) -> torch.Tensor:
    """The 1-D form over a height of 1: x (N, C, L) or (C, L); weight (O, OL, C, K); bias (O, OL).
    Returns (N, O, OL) or (O, OL)."""
    single = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
    padding = padding if isinstance(padding, str) else (0, single(padding))  # "same" pads only along L at H = 1
    y = locally_connected2d(x.unsqueeze(-2), weight.unsqueeze(1).unsqueeze(-2),
                            bias.unsqueeze(1) if bias is not None else None, (1, single(stride)),
                            padding, (1, single(dilation)))
    return y.squeeze(-2)


def rnn_cell(x: torch.Tensor, hx: torch.Tensor | None, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
             bias_ih: torch.Tensor | None = None, bias_hh: torch.Tensor | None = None,
             nonlinearity: str = "tanh") -> torch.Tensor:
    """h' = act(x W_ih^T + b_ih + hx W_hh^T + b_hh) as two F.linear and the activation. x (B, I), hx (B, H)
    or None (zeros)."""
    if hx is None:
        hx = x.new_zeros(x.shape[0], weight_hh.shape[0])
    z = F.linear(x, weight_ih, bias_ih) + F.linear(hx, weight_hh, bias_hh)
    return torch.tanh(z) if nonlinearity == "tanh" else torch.relu(z)


def rnn(x: torch.Tensor, hx: torch.Tensor, weights, num_layers: int = 1, nonlinearity: str = "tanh",
        bias: bool = True, dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
        batch_first: bool = False, batch_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's own multi-layer RNN (torch.rnn_tanh / rnn_relu: cuDNN on CUDA), gpunn.functional.rnn's arguments."""
    torch_rnn = torch.rnn_tanh if nonlinearity == "tanh" else torch.rnn_relu
    # cuDNN keeps what its backward needs only in training mode; without dropout that mode computes the same.
    training = training or dropout == 0
    if batch_sizes is not None:
        return torch_rnn(x, batch_sizes, hx, weights, bias, num_layers, dropout, training, bidirectional)
    return torch_rnn(x, hx, weights, bias, num_layers, dropout, training, bidirectional, batch_first)
