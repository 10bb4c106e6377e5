"""gpunn.Linear: a drop-in for torch.nn.Linear with a fused activation."""
from __future__ import annotations

import torch

from .. import functional


class Linear(torch.nn.Linear):
    """y = act(x W^T + b) in one Triton kernel (forward) and three (backward: dz = dy act'(z) and the bias
    gradient in one pass, which a layer with neither activation nor bias skips, then the input- and
    weight-gradient GEMMs; over many rows the bias sum and the weight gradient each add a launch that sums
    their row chunks).

    A drop-in for torch.nn.Linear: the same constructor, parameters (`weight` (out_features,
    in_features), `bias` (out_features,)), initialisation, state_dict keys and errors; it is an
    instance of torch.nn.Linear and loads its state_dict strictly, and the reverse.

    Args:
        in_features, out_features, bias, device, dtype: as torch.nn.Linear.
        activation: None (default), "relu", "leaky_relu", "gelu", "gelu_tanh", "tanh", "sigmoid" or "silu",
            fused into the kernel's epilogue.
        negative_slope: slope of "leaky_relu" for negative inputs (default 0.01, as torch.nn.LeakyReLU).

    Shape:
        input (*, in_features) -> output (*, out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str | None = None, negative_slope: float = 0.01) -> None:
        functional.check_activation(activation, negative_slope)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.linear(input, self.weight, self.bias, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        return super().extra_repr() + functional.activation_repr(self.activation, self.negative_slope)
