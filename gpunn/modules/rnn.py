"""gpunn.RNNCell: a drop-in for torch.nn.RNNCell whose step runs as one fused Triton kernel."""
from __future__ import annotations

import torch

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


__all__ = ["RNNCell"]
