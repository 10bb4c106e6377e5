"""gpunn's functional API: each function validates its arguments, applies autocast the way the torch op
it replaces does, then runs the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) or, on other
devices, plain torch with the same semantics."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from . import autocast, reference
from .arguments import SUPPORTED_DTYPES, as_pair, as_single, check_tensors, padding_sides
from .kernels.activations import GRAD_FROM_SAVED, NAMES as ACTIVATIONS, grad_source as activation_grad_source
from .kernels.layout import DEFAULT_BLOCKS, BlockLayout, check_block
from .kernels.local import Geometry
from .kernels.runtime import triton_runs_on
from .losses import cross_entropy, mse_loss  # noqa: F401  (public here too, as in torch.nn.functional)
from .ops import linear as ops_linear, local as ops_local, rnn as ops_rnn, rnn_sequence as ops_rnn_sequence
from .ops.library import forward_mode_reaches, requires_grad_within


def check_activation(activation, negative_slope) -> None:
    """Raise ValueError for an activation gpunn does not fuse, TypeError for a non-real slope."""
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(name) for name in ACTIVATIONS)
        raise ValueError(f"Unknown activation {activation!r}; expected one of {names}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a real number, got {type(negative_slope).__name__}")


def activation_repr(activation, negative_slope) -> str:
    """The modules' extra_repr suffix for a fused activation ("" for none)."""
    text = f", activation={activation!r}" if activation is not None else ""
    return text + (f", negative_slope={negative_slope}" if activation == "leaky_relu" else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_supported(op: str, dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"gpunn {op} supports float16, bfloat16, float32 and float64, got {_dtype_name(dtype)}")


def _check_one_device(*devices: torch.device) -> None:
    """torch's RuntimeError for tensors on two devices (the first two, in the order given)."""
    distinct = list(dict.fromkeys(devices))
    if len(distinct) > 1:
        first, second = distinct[:2]
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{first} and {second}!")


def _check_nonlinearity(nonlinearity: str) -> None:
    if nonlinearity not in RNN_NONLINEARITIES:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")


def _check_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    # The same exception type (RuntimeError) torch.nn.functional.linear raises for each of these.
    if input.dim() == 0 or weight.dim() == 0:
        raise RuntimeError(f"both arguments to linear need to be at least 1D, but they are "
                           f"{input.dim()}D and {weight.dim()}D")
    if weight.dim() > 2:
        raise RuntimeError(f"gpunn linear expects a 2-D weight (out_features, in_features) or a 1-D one "
                           f"(in_features,), got shape {tuple(weight.shape)}")
    if input.shape[-1] != weight.shape[-1]:
        rows, outputs = input.shape[:-1].numel(), weight.shape[0] if weight.dim() == 2 else 1
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{input.shape[-1]} and "
                           f"{weight.shape[-1]}x{outputs})")
    if input.dtype != weight.dtype:
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {_dtype_name(input.dtype)} and "
                           f"{_dtype_name(weight.dtype)}")
    _check_supported("linear", input.dtype)
    _check_one_device(input.device, weight.device)
    if bias is not None:
        if bias.dtype != input.dtype:
            raise RuntimeError(f"self and mat2 must have the same dtype, but got {_dtype_name(bias.dtype)} and "
                               f"{_dtype_name(input.dtype)}")
        _check_one_device(input.device, bias.device)
        _check_linear_bias(input, weight, bias)


def _check_linear_bias(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """gpunn adds one bias value per output feature, given in any shape of leading 1s that does not add dims
    past the product's (or 2). torch's own rules for other shapes depend on which of its kernels runs: it
    adds some after its product (NotImplementedError here) and rejects the rest (RuntimeError, as here). Its
    kernels also reject a few shapes of leading 1s that gpunn adds per feature ((1, 1, N) beside a 3-D
    input, (1, 1) beside a 1-D one, a (1,) bias of a 1-D weight beside a 3-D input)."""
    if weight.dim() == 1:  # one output, its dim dropped: torch adds a bias there only after a matmul
        if input.dim() == 2 or (input.dim() == 1 and bias.dim() != 0):
            raise RuntimeError("mat2 must be a matrix, got 1-D tensor")
        product, one_per_feature = tuple(input.shape[:-1]), bias.numel() == 1
    else:
        product = (*input.shape[:-1], weight.shape[0])
        one_per_feature = bias.dim() == 0 or (bias.shape[-1] in (1, weight.shape[0])
                                              and all(n == 1 for n in bias.shape[:-1]))
    if bias.dim() > max(len(product), 2):
        raise RuntimeError(f"bias of shape {tuple(bias.shape)} has more dims than the product's shape "
                           f"{tuple(product)}")
    if one_per_feature:
        return
    try:
        broadcast = torch.broadcast_shapes(product, bias.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != tuple(product):
        raise RuntimeError(f"bias of shape {tuple(bias.shape)} does not broadcast to the product's shape "
                           f"{tuple(product)}")
    raise NotImplementedError(f"gpunn adds one bias per output feature; a bias of shape {tuple(bias.shape)} "
                              f"varies along the batch dims")


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None, negative_slope: float = 0.01) -> torch.Tensor:
    """act(input @ weight^T + bias) as one fused Triton kernel; backward as gpunn.Linear's (its docstring).

    Args:
        input: (*, in_features), any number of leading dims (1-D included), any strides.
        weight: (out_features, in_features), or (in_features,) for one output whose dim is dropped.
        bias: (out_features,), or one value per output feature in another shape ((), (1,), (1,
            out_features), ...; see _check_linear_bias), or None.
        activation: None, "relu", "leaky_relu", "gelu" (erf), "gelu_tanh", "tanh", "sigmoid" or "silu".
        negative_slope: the slope of "leaky_relu" for negative inputs.

    Returns:
        (*, out_features) ((*) for a 1-D weight), in the dtype of input and weight (the autocast dtype
        under autocast).

    Raises:
        TypeError for an argument that is not a tensor (bias: or None) or a negative_slope that is not a
        real number; ValueError for an unknown activation; RuntimeError for shapes, dtypes or devices that
        torch.nn.functional.linear would reject (but for a few bias shapes of leading 1s its kernels refuse
        and gpunn adds per feature: see _check_linear_bias); NotImplementedError for a bias that varies
        along the batch dims (torch adds it after the matmul). All checked before any kernel runs.
    """
    check_tensors("linear", ("input", input, False), ("weight", weight, False), ("bias", bias, True))
    check_activation(activation, negative_slope)
    input, weight, bias = autocast.cast(input.device.type, input, weight, bias)
    _check_linear(input, weight, bias)
    if not triton_runs_on(input.device):
        return reference.linear(input, weight, bias, activation, negative_slope)
    if weight.dim() == 1:  # one output feature, its dim dropped (torch's matrix-vector product)
        return _linear_op(input, weight[None], bias, activation, negative_slope, None, (0, 0)).squeeze(-1)
    return _linear_op(input, weight, bias, activation, negative_slope, None, (0, 0))


def _linear_op(input, weight, bias, activation, negative_slope, mask, block):
    """The Triton path shared by linear and masked_linear, on checked (and autocast) arguments."""
    if bias is not None and bias.shape != (weight.shape[0],):
        bias = bias.reshape(-1).expand(weight.shape[0])  # a broadcast bias; autograd sums its gradient
    # When autograd records the call, or forward mode may run, and the activation's derivative cannot be had
    # from the output, the forward kernel also writes act'(z) for backward (or the tangent).
    differentiated = (torch.is_grad_enabled() and any(requires_grad_within(t) for t in (input, weight, bias))
                      or forward_mode_reaches(input, weight, bias))
    save_derivative = differentiated and activation_grad_source(activation) == GRAD_FROM_SAVED.value
    return ops_linear.linear(input, weight, bias, mask, *block, activation, float(negative_slope), save_derivative,
                             0)[0]


def _check_mask(mask_or_layout, weight: torch.Tensor) -> None:
    # RuntimeError, as torch raises for the reference weight.masked_fill(~mask, 0) with such a mask.
    if weight.dim() != 2:
        raise RuntimeError(f"masked_linear expects a 2-D weight (out_features, in_features), got shape "
                           f"{tuple(weight.shape)}")
    if isinstance(mask_or_layout, BlockLayout):
        shape, device = mask_or_layout.shape, mask_or_layout.device
        check_block(mask_or_layout.block, weight.element_size())  # a block too large for these weights
    elif isinstance(mask_or_layout, torch.Tensor):
        if mask_or_layout.dtype != torch.bool:
            raise RuntimeError(f"masked_linear expects a bool mask, got {_dtype_name(mask_or_layout.dtype)}")
        shape, device = tuple(mask_or_layout.shape), mask_or_layout.device
    else:
        raise TypeError(f"mask_or_layout must be a bool tensor or a BlockLayout, got {type(mask_or_layout).__name__}")
    if shape != tuple(weight.shape):
        raise RuntimeError(f"mask of shape {shape} does not match the weight's shape {tuple(weight.shape)} "
                           f"(out_features, in_features)")
    _check_one_device(weight.device, device)


def masked_linear(input: torch.Tensor, weight: torch.Tensor, mask_or_layout, bias: torch.Tensor | None = None,
                  activation: str | None = None, negative_slope: float = 0.01) -> torch.Tensor:
    """act(input @ (weight * mask)^T + bias) with block-sparse kernels that visit only the weight blocks
    holding a connection. Masked-out weights are never read (NaN or Inf there changes nothing) and
    their gradient is exactly zero.

    Args:
        input: (*, in_features), any leading dims and strides, as in linear.
        weight: (out_features, in_features).
        mask_or_layout: a bool mask (out_features, in_features), True where output j reads input i, on
            weight's device; or its gpunn.masks.block_layout(). A mask's layout is built on first use and
            cached for that mask tensor (rebuilt after an in-place change).
        bias: as in linear, or None. Outputs with no connection are act(bias).
        activation, negative_slope: as in linear.

    Returns:
        (*, out_features), in the dtype of input and weight (the autocast dtype under autocast).

    Raises:
        ValueError for an unknown activation; TypeError for a mask that is neither a tensor nor a layout, and
        for an input, weight or bias that is not a tensor (bias: or None);
        RuntimeError for a mask that is not bool, of another shape than weight or on another device, and
        for what linear rejects. All checked before any kernel runs.
    """
    check_tensors("masked_linear", ("input", input, False), ("weight", weight, False),
                  None, ("bias", bias, True))  # the mask: _check_mask
    check_activation(activation, negative_slope)
    input, weight, bias = autocast.cast(input.device.type, input, weight, bias)
    _check_linear(input, weight, bias)
    _check_mask(mask_or_layout, weight)
    if not triton_runs_on(input.device):
        mask = mask_or_layout.mask.bool() if isinstance(mask_or_layout, BlockLayout) else mask_or_layout
        return reference.masked_linear(input, weight, mask, bias, activation, negative_slope)
    # The op takes the mask as a tensor and finds its layout (built once per mask, cached).
    if isinstance(mask_or_layout, BlockLayout):
        mask, block = mask_or_layout.mask, mask_or_layout.block
    else:
        mask, block = mask_or_layout, DEFAULT_BLOCKS[weight.element_size()]
    return _linear_op(input, weight, bias, activation, negative_slope, mask, block)


def local_geometry(kernel_size, stride, padding, dilation, dims: int = 2) -> Geometry:
    """The window of a locally connected layer from ints or pairs, and padding "valid" or "same" as F.conv2d
    takes them ("same" pads the far side one more where dilation x (kernel - 1) is odd, as torch does);
    RuntimeError for values F.conv2d rejects (non-positive kernel, stride or dilation, negative padding,
    another padding string, "same" with a stride), TypeError for non-ints. dims=1: the 1-D layer's window
    as a height of 1, its messages quoting the width only."""
    kernel, stride, dilation = (as_pair(value, name) for value, name in (
        (kernel_size, "kernel_size"), (stride, "stride"), (dilation, "dilation")))
    shown = lambda pair: tuple(pair[2 - dims:])  # noqa: E731
    if min(*kernel, *stride, *dilation) < 1:
        raise RuntimeError(f"non-positive kernel_size, stride or dilation is not supported: kernel_size="
                           f"{shown(kernel)}, stride={shown(stride)}, dilation={shown(dilation)}")
    padding, padding_end = padding_sides(padding, kernel, stride, dilation, RuntimeError)
    if min(padding) < 0:
        raise RuntimeError(f"negative padding is not supported: {shown(padding)}")
    return Geometry(kernel, stride, padding, dilation, padding_end)


def _check_local(input, weight, bias, geometry: Geometry) -> None:
    # RuntimeError throughout, as F.conv2d raises for inputs that do not fit its weight.
    if input.dim() not in (3, 4):
        raise RuntimeError(f"locally_connected2d expects a 3-D (unbatched) or 4-D (batched) input, got shape "
                           f"{tuple(input.shape)}")
    if weight.dim() != 6:
        raise RuntimeError(f"locally_connected2d expects a 6-D weight (out_channels, oh, ow, in_channels, kh, kw), "
                           f"got shape {tuple(weight.shape)}")
    o, oh, ow, c, kh, kw = weight.shape
    channels, height, width = input.shape[-3:]
    if channels != c:
        raise RuntimeError(f"expected input with {c} channels (weight of shape {tuple(weight.shape)}), got "
                           f"input of shape {tuple(input.shape)}")
    if height == 0 or width == 0:  # padding alone would give output positions: F.conv2d refuses first
        raise RuntimeError(f"Only zero batch or zero channel inputs are supported, but got input shape: "
                           f"{list(input.shape)}")
    expected = geometry.output_size(height, width)
    if min(expected) < 1:
        raise RuntimeError(f"kernel {kh}x{kw} (dilation {geometry.dh}x{geometry.dw}) does not fit the padded "
                           f"{height}x{width} input")
    if expected != (oh, ow):
        raise RuntimeError(f"an input of {height}x{width} gives {expected[0]}x{expected[1]} output positions, but "
                           f"the weight has {oh}x{ow}")
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != input.dtype):
        names = ", ".join(_dtype_name(t.dtype) for t in (input, weight, bias) if t is not None)
        raise RuntimeError(f"input, weight and bias must have the same dtype, got {names}")
    _check_supported("locally connected layers", input.dtype)
    _check_one_device(*(t.device for t in (input, weight, bias) if t is not None))
    if bias is not None and tuple(bias.shape) != (o, oh, ow):
        raise RuntimeError(f"bias must have shape (out_channels, oh, ow) = {(o, oh, ow)}, got {tuple(bias.shape)}")


def _check_local_tensors(op: str, input, weight, bias) -> None:
    check_tensors(op, ("input", input, False), ("weight", weight, False), ("bias", bias, True))


def locally_connected2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        stride=1, padding=0, dilation=1) -> torch.Tensor:
    """A locally connected layer: a convolution whose every output position has its own filter.

    y[n, o, i, j] = bias[o, i, j] + sum_{c, di, dj} weight[o, i, j, c, di, dj] * x[n, c, i*s - p + di*d,
    j*s - p + dj*d], with zero padding (taps in the padding read nothing), as F.unfold sees the input. The
    patches are gathered inside the Triton kernels: no unfold tensor is made.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); any strides.
        weight: (O, OH, OW, C, KH, KW); the kernel size is its last two dims.
        bias: (O, OH, OW) or None.
        stride, dilation: an int or a pair (height, width). padding: an int, a pair, "valid" or "same"
            (stride 1, as F.conv2d).

    Returns:
        (N, O, OH, OW), or (O, OH, OW) for an unbatched input, with OH = (H + 2p - d(KH - 1) - 1) // s + 1
        (H for "same").

    Raises:
        RuntimeError for shapes, dtypes or devices that do not fit together (as F.conv2d does), checked
        before any kernel runs; TypeError for a stride, padding or dilation that is not an int or a pair, or
        an input, weight or bias (or None) that is not a tensor.
    """
    _check_local_tensors("locally_connected2d", input, weight, bias)
    geometry = local_geometry(tuple(weight.shape[-2:]) if weight.dim() == 6 else 1, stride, padding, dilation)
    input, weight, bias = autocast.cast(input.device.type, input, weight, bias)
    _check_local(input, weight, bias, geometry)
    if not triton_runs_on(input.device):
        g = geometry
        return reference.locally_connected2d(input, weight, bias, (g.sh, g.sw),
                                             padding if isinstance(padding, str) else (g.ph, g.pw), (g.dh, g.dw))
    batched = input.dim() == 4
    x = input if batched else input.unsqueeze(0)
    o, oh, ow = weight.shape[:3]
    weight_flat = weight.reshape(o, oh * ow, -1)
    bias_flat = bias.reshape(o, oh * ow) if bias is not None else None
    y = ops_local.locally_connected(x, weight_flat, bias_flat, geometry.as_list())
    return y if batched else y.squeeze(0)


def locally_connected1d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        stride=1, padding=0, dilation=1) -> torch.Tensor:
    """The 1-D locally connected layer: locally_connected2d over a height of 1.

    Args:
        input: (N, C, L) or unbatched (C, L).
        weight: (O, OL, C, K).
        bias: (O, OL) or None.
        stride, dilation: an int (or a 1-tuple). padding: an int (or a 1-tuple), "valid" or "same".

    Returns:
        (N, O, OL) or (O, OL), OL = (L + 2p - d(K - 1) - 1) // s + 1 (L for "same").
    """
    _check_local_tensors("locally_connected1d", input, weight, bias)
    stride, dilation = (as_single(v, n) for v, n in ((stride, "stride"), (dilation, "dilation")))
    padding = padding if isinstance(padding, str) else (0, as_single(padding, "padding"))
    if input.dim() not in (2, 3):
        raise RuntimeError(f"locally_connected1d expects a 2-D (unbatched) or 3-D (batched) input, got shape "
                           f"{tuple(input.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"locally_connected1d expects a 4-D weight (out_channels, ol, in_channels, k), got "
                           f"shape {tuple(weight.shape)}")
    o, ol, c, k = weight.shape
    geometry = local_geometry((1, k), (1, stride), padding, (1, dilation), dims=1)  # before the 2-D view
    if input.shape[-2] != c:
        raise RuntimeError(f"expected input with {c} channels (weight of shape {tuple(weight.shape)}), got input "
                           f"of shape {tuple(input.shape)}")
    expected = geometry.output_size(1, input.shape[-1])[1]
    if expected < 1:
        raise RuntimeError(f"kernel {k} (dilation {dilation}) does not fit the padded input of length "
                           f"{input.shape[-1]}")
    if expected != ol:
        raise RuntimeError(f"an input of length {input.shape[-1]} gives {expected} output positions, but the weight "
                           f"has {ol}")
    if bias is not None and tuple(bias.shape) != (o, ol):
        raise RuntimeError(f"bias must have shape (out_channels, ol) = {(o, ol)}, got {tuple(bias.shape)}")
    weight2d = weight.unsqueeze(1).unsqueeze(-2)  # (O, 1, OL, C, 1, K)
    bias2d = bias.unsqueeze(1) if bias is not None else None
    y = locally_connected2d(input.unsqueeze(-2), weight2d, bias2d, (1, stride), padding, (1, dilation))
    return y.squeeze(-2)


RNN_NONLINEARITIES = ("tanh", "relu")


def _check_rnn_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh) -> None:
    # torch's rnn_tanh_cell / rnn_relu_cell checks first, in its order and with its messages (size(i) raises
    # torch's IndexError where a tensor has too few dims), then what gpunn's kernels need beyond them.
    if input.size(1) != weight_ih.size(1):
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {weight_ih.size(1)}")
    if input.size(0) != hx.size(0):
        raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden0 batch size {hx.size(0)}")
    if hx.size(1) != weight_hh.size(1):
        raise RuntimeError(f"hidden0 has inconsistent hidden_size: got {hx.size(1)}, expected {weight_hh.size(1)}")
    if input.dim() != 2 or hx.dim() != 2:
        raise RuntimeError(f"rnn_cell expects a 2-D input and hidden state, got {input.dim()}-D and {hx.dim()}-D")
    if weight_ih.dim() != 2 or weight_hh.dim() != 2 or weight_hh.shape[0] != weight_hh.shape[1] \
            or weight_ih.shape[0] != weight_hh.shape[0]:
        raise RuntimeError(f"rnn_cell expects weight_ih (H, I) and weight_hh (H, H), got {tuple(weight_ih.shape)} "
                           f"and {tuple(weight_hh.shape)}")
    for bias in (bias_ih, bias_hh):
        if bias is not None and tuple(bias.shape) != (weight_ih.shape[0],):
            raise RuntimeError(f"rnn_cell expects biases of shape ({weight_ih.shape[0]},), got {tuple(bias.shape)}")
    tensors = [t for t in (input, hx, weight_ih, weight_hh, bias_ih, bias_hh) if t is not None]
    if len({t.dtype for t in tensors}) > 1:
        names = ", ".join(_dtype_name(t.dtype) for t in tensors)
        raise RuntimeError(f"rnn_cell expects tensors of one dtype, got {names}")
    _check_supported("rnn_cell", input.dtype)
    _check_one_device(*(t.device for t in tensors))


def rnn_cell(input: torch.Tensor, hx: torch.Tensor | None, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
             bias_ih: torch.Tensor | None = None, bias_hh: torch.Tensor | None = None,
             nonlinearity: str = "tanh") -> torch.Tensor:
    """One Elman RNN step h' = act(input W_ih^T + b_ih + hx W_hh^T + b_hh) as one fused Triton kernel
    (backward: two).

    Args:
        input: (B, I), any strides.
        hx: (B, H), or None for zeros.
        weight_ih: (H, I); weight_hh: (H, H); bias_ih, bias_hh: (H,) or None (one alone: the other is zeros,
            as torch's cell functions take it).
        nonlinearity: "tanh" or "relu".

    Returns:
        h' (B, H), in the dtype of the inputs (the autocast dtype under autocast).

    Raises:
        TypeError for an argument that is not a tensor (hx and the biases: or None); ValueError for an
        unknown nonlinearity; RuntimeError for shapes, dtypes or devices that torch's RNN cell would reject
        (with its messages), before any kernel runs.
    """
    _check_nonlinearity(nonlinearity)
    check_tensors("rnn_cell", ("input", input, False), ("hx", hx, True), ("weight_ih", weight_ih, False),
                  ("weight_hh", weight_hh, False), ("bias_ih", bias_ih, True), ("bias_hh", bias_hh, True))
    if hx is None:
        hx = torch.zeros(input.shape[0] if input.dim() == 2 else 0, weight_hh.shape[0], dtype=input.dtype,
                         device=input.device)
    device_type = input.device.type
    input, hx, weight_ih, weight_hh, bias_ih, bias_hh = autocast.cast(device_type, input, hx, weight_ih, weight_hh,
                                                                      bias_ih, bias_hh)
    _check_rnn_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    if (bias_ih is None) != (bias_hh is None):  # the kernels add both biases or neither
        bias_ih, bias_hh = (bias if bias is not None else torch.zeros_like(bias_ih if bias_hh is None else bias_hh)
                            for bias in (bias_ih, bias_hh))
    if not triton_runs_on(input.device):
        return reference.rnn_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity)
    return ops_rnn.rnn_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity)


def _check_rnn(input, hx, weights, num_layers, directions, has_bias, batch_first, batch_sizes) -> None:
    # The checks torch's rnn_tanh / rnn_relu make, as RuntimeErrors, before any kernel runs.
    per = 4 if has_bias else 2
    if len(weights) != num_layers * directions * per:
        raise RuntimeError(f"rnn expects {num_layers * directions * per} weight tensors "
                           f"(num_layers x directions x {per}), got {len(weights)}")
    if input.dim() != (2 if batch_sizes is not None else 3):
        raise RuntimeError(f"rnn: expected input to be {2 if batch_sizes is not None else 3}-D, got {input.dim()}-D")
    if batch_sizes is not None:  # a hand-built PackedSequence: the kernels trust this layout
        if batch_sizes.dim() != 1 or batch_sizes.device.type != "cpu" or batch_sizes.dtype != torch.int64:
            raise RuntimeError("batch_sizes should always be on CPU, a 1-D int64 tensor")
        if len(batch_sizes) and (batch_sizes.min() < 1 or (batch_sizes[1:] > batch_sizes[:-1]).any()):
            raise RuntimeError("batch_sizes must be positive and non-increasing (a PackedSequence's)")
        if int(batch_sizes.sum()) != input.shape[0]:
            raise RuntimeError(f"batch_sizes sum to {int(batch_sizes.sum())} rows, but the packed input has "
                               f"{input.shape[0]}")
    hidden = weights[1].shape[0]
    if batch_sizes is not None:
        batch = int(batch_sizes[0]) if len(batch_sizes) else 0
    else:
        batch = input.shape[0 if batch_first else 1]
        if input.shape[1 if batch_first else 0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    if hx.dim() != 3 or tuple(hx.shape) != (num_layers * directions, batch, hidden):
        raise RuntimeError(f"Expected hidden size {(num_layers * directions, batch, hidden)}, got {list(hx.shape)}")
    for index in range(0, len(weights), per):
        layer = index // (per * directions)
        w_ih, w_hh = weights[index], weights[index + 1]
        inputs = input.shape[-1] if layer == 0 else directions * hidden
        if tuple(w_ih.shape) != (hidden, inputs) or tuple(w_hh.shape) != (hidden, hidden):
            raise RuntimeError(f"rnn layer {layer}: expected weight_ih {(hidden, inputs)} and weight_hh "
                               f"{(hidden, hidden)}, got {tuple(w_ih.shape)} and {tuple(w_hh.shape)}")
        if has_bias and any(tuple(b.shape) != (hidden,) for b in weights[index + 2:index + 4]):
            raise RuntimeError(f"rnn layer {layer}: expected biases of shape ({hidden},)")
    tensors = [input, hx, *weights]
    if len({t.dtype for t in tensors}) > 1:
        raise RuntimeError(f"rnn expects input, hx and weights of one dtype, got input {_dtype_name(input.dtype)}, "
                           f"hx {_dtype_name(hx.dtype)}, weights {_dtype_name(weights[0].dtype)}")
    _check_supported("rnn", input.dtype)
    _check_one_device(*(t.device for t in tensors))


def rnn(input: torch.Tensor, hx: torch.Tensor, weights, num_layers: int = 1, nonlinearity: str = "tanh",
        bias: bool = True, dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
        batch_first: bool = False, batch_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A multi-layer Elman RNN over a whole sequence (torch.nn.RNN's computation): per layer, one dense GEMM
    projects every step's input, one launch per direction runs the recurrence (one a step where the hidden
    size is too large for one cooperative grid: see kernels/rnn_sequence.py), and backward is one
    backward-through-time launch per direction plus dense GEMMs for the gradients.

    Args:
        input: (T, B, I), or (B, T, I) when batch_first, any strides; or, with batch_sizes, the data of a
            PackedSequence (rows, I).
        hx: (num_layers * D, B, H) initial states (D = 2 when bidirectional), in the rows' order.
        weights: per layer, per direction: weight_ih (H, I or D*H), weight_hh (H, H), and when bias,
            bias_ih and bias_hh (H,) (torch.nn.RNN's _flat_weights order).
        nonlinearity: "tanh" or "relu". dropout: applied to each layer's output but the last, in training.
        batch_sizes: a PackedSequence's batch_sizes (CPU int64, non-increasing), or None.

    Returns:
        (output, h_n): output (T, B, D*H) ((B, T, D*H) when batch_first; (rows, D*H) when packed) and h_n
        (num_layers * D, B, H), in the input's dtype (the autocast dtype under autocast).

    Raises:
        TypeError for an input, hx or weight that is not a tensor; ValueError for an unknown nonlinearity;
        RuntimeError for shapes, dtypes or devices torch's RNN would reject, before any kernel runs.
    """
    _check_nonlinearity(nonlinearity)
    weights = list(weights)  # any sequence (or iterable) of tensors, read more than once below
    check_tensors("rnn", ("input", input, False), ("hx", hx, False),
                  *((f"weights[{i}]", weight, False) for i, weight in enumerate(weights)))
    directions = 2 if bidirectional else 1
    device_type = input.device.type
    input, hx, *weights = autocast.cast(device_type, input, hx, *weights)
    _check_rnn(input, hx, weights, num_layers, directions, bias, batch_first, batch_sizes)
    if not triton_runs_on(input.device):
        return reference.rnn(input, hx, weights, num_layers, nonlinearity, bias, dropout, training, bidirectional,
                             batch_first, batch_sizes)
    x = input
    if batch_sizes is None:
        x = input.transpose(0, 1) if batch_first else input  # (T, B, I), time-major rows without a copy
    per_layer = len(weights) // num_layers
    finals = []
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            x = F.dropout(x, dropout, training=True)
        layer_weights = weights[layer * per_layer:(layer + 1) * per_layer]
        out, h_n = ops_rnn_sequence.rnn_layer(x, hx[layer * directions:(layer + 1) * directions], batch_sizes,
                                              nonlinearity, directions, layer_weights)
        x = out if batch_sizes is not None else out.view(*x.shape[:2], out.shape[-1])  # (T, B, D*H)
        finals.append(h_n)
    if batch_sizes is None and batch_first:
        x = x.transpose(0, 1)
    return x, torch.cat(finals)
