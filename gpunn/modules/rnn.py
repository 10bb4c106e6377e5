"""gpunn.RNNCell and gpunn.RNN: drop-ins for torch.nn.RNNCell (one fused Triton kernel a step) and
torch.nn.RNN (a persistent Triton kernel a layer and direction, up to the sizes gpunn.functional.rnn gives)."""
from __future__ import annotations

import torch

from torch.nn.utils.rnn import PackedSequence

from .. import functional


class RNNCell(torch.nn.RNNCell):
    """h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh) (or relu), one Triton kernel forward, two backward.

    A drop-in for torch.nn.RNNCell (it subclasses it): the same constructor (input_size, hidden_size,
    bias=True, nonlinearity="tanh", device=None, dtype=None), parameters (weight_ih (H, I), weight_hh
    (H, H), bias_ih, bias_hh (H,)), initialisation, state_dict and errors.

    Shape:
        input (B, I) or unbatched (I,); hx (B, H) / (H,) or None (zeros) -> h' (B, H) / (H,).
    """

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        # torch.nn.RNNCell's own argument checks, with its exception types and messages.
        if input.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        if self.nonlinearity not in functional.RNN_NONLINEARITIES:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            hx = hx.unsqueeze(0) if hx is not None else None
        out = functional.rnn_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                  self.nonlinearity)
        return out if batched else out.squeeze(0)


def nonlinearity_of(rnn: torch.nn.RNN) -> str:
    """The activation a torch.nn.RNN runs: its mode's, fixed at construction, whatever `nonlinearity` was set
    to since."""
    return "relu" if rnn.mode == "RNN_RELU" else "tanh"


class RNN(torch.nn.RNN):
    """A multi-layer Elman RNN: h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh) (or relu) per layer.

    A drop-in for torch.nn.RNN (it subclasses it): the same constructor (input_size, hidden_size,
    num_layers=1, nonlinearity="tanh", bias=True, batch_first=False, dropout=0.0, bidirectional=False,
    device=None, dtype=None), parameters (weight_ih_l{k}[_reverse], ...), initialisation, state_dict,
    flatten_parameters() (a no-op here) and errors. Per layer and direction, the recurrence over all steps is
    one Triton launch (one a step for hidden sizes past one cooperative grid, and under the interpreter for
    those past what is kept on chip: see gpunn.functional.rnn); dropout between layers uses torch's dropout.

    Shape:
        input (T, B, I) ((B, T, I) when batch_first), unbatched (T, I), or a PackedSequence (sorted or
        unsorted); hx (num_layers * D, B, H) / (num_layers * D, H) or None (zeros) ->
        (output (T, B, D*H) / (B, T, D*H) / (T, D*H) or a PackedSequence, h_n (num_layers * D, B, H)).
    """

    def flatten_parameters(self) -> None:
        """A no-op: gpunn reads the parameters where they are (there is no cuDNN weight buffer)."""

    def forward(self, input, hx: torch.Tensor | None = None):
        # torch.nn.RNN.forward's input handling, with its exception types and messages.
        self._update_flat_weights()  # parameters swapped in without __setattr__ (functional_call, weight_norm)
        directions = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        batched = True
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            batch = input.size(batch_dim)
        if hx is None:
            hx = torch.zeros(self.num_layers * directions, batch, self.hidden_size, dtype=input.dtype,
                             device=input.device)
        else:
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(input, hx, batch_sizes)
        output, hidden = functional.rnn(input, hx, self._flat_weights, self.num_layers, nonlinearity_of(self),
                                        self.bias, self.dropout, self.training, self.bidirectional, self.batch_first,
                                        batch_sizes)
        if packed:
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(hidden, unsorted_indices)
        if not batched:
            output, hidden = output.squeeze(batch_dim), hidden.squeeze(1)
        return output, hidden


__all__ = ["RNN", "RNNCell"]
