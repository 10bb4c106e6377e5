"""gpunn.MaskedLinear: a linear layer whose connectivity is restricted by a fixed mask."""
from __future__ import annotations

import torch

from .. import functional


class MaskedLinear(torch.nn.Module):
    """y = act(x (W * mask)^T + b), with block-sparse kernels whose cost follows the connections.

    Output neuron j reads input i only where mask[j, i] is True (see gpunn.masks for local and random
    masks). Masked-out weights never affect the output or any gradient, even when they hold NaN or Inf,
    and their gradient is exactly zero, so plain SGD or Adam leaves them as they are.

    Args:
        in_features, out_features, bias, device, dtype: as torch.nn.Linear.
        mask: bool (out_features, in_features). Copied into the buffer `mask` (in the state_dict and
            restored by load_state_dict) on the module's device. On the meta device the layer keeps a copy
            of it until to_empty (which torch.nn.utils.skip_init calls) copies it into the real buffer.
        activation, negative_slope: as gpunn.Linear, fused into the kernels.

    Parameters:
        weight (out_features, in_features), stored densely like nn.Linear's; bias (out_features,).

    Initialisation: nn.Linear's rule with each neuron's true fan-in: row j of the weight and bias j are
    uniform in +-1/sqrt(connections of j) (a neuron with no connection gets bias 0, as nn.Linear does for
    in_features = 0). With a local_2d mask this is nn.Conv2d's rule for the same kernel at the neurons whose
    window lies inside the image; one whose window reaches into the padding has fewer connections, so a wider
    range (nn.Conv2d counts the padding's taps in its fan-in). Masked-out
    weights start at zero, so `weight` equals the effective weight.

    Shape:
        input (*, in_features) -> output (*, out_features).
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, bias: bool = True, device=None,
                 dtype=None, *, activation: str | None = None, negative_slope: float = 0.01) -> None:
        functional.check_activation(activation, negative_slope)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask must have shape (out_features, in_features) = ({out_features}, {in_features}), "
                             f"got {tuple(mask.shape)}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.bias = torch.nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("mask", mask.to(device=self.weight.device, copy=True))
        # Built on the meta device (torch.nn.utils.skip_init, a model initialised later), the layer keeps the
        # mask it was given until to_empty makes the buffer real: the mask is its structure, which to_empty
        # would otherwise leave as uninitialised memory.
        self._mask_for_to_empty = mask.detach().clone() if self.mask.is_meta and not mask.is_meta else None
        self.activation = activation
        self.negative_slope = negative_slope
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's uniform init, scaled per output neuron by its number of connections."""
        with torch.no_grad():
            fan_in = self.mask.sum(dim=1, keepdim=True).to(self.weight.dtype)
            bound = torch.where(fan_in > 0, fan_in.clamp(min=1).rsqrt(), torch.zeros_like(fan_in))  # (N, 1)
            self.weight.uniform_(-1, 1).mul_(bound).masked_fill_(~self.mask, 0)
            if self.bias is not None:
                self.bias.uniform_(-1, 1).mul_(bound.squeeze(1))

    def _apply(self, fn, recurse=True):
        was_meta = self.mask.is_meta
        module = super()._apply(fn, recurse)
        if was_meta and not self.mask.is_meta and self._mask_for_to_empty is not None:  # to_empty: the way off meta
            with torch.no_grad():
                self.mask.copy_(self._mask_for_to_empty)
            self._mask_for_to_empty = None
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if not self.mask.is_meta:  # loaded off the meta device (assign=True): the given mask is no longer needed
            self._mask_for_to_empty = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.masked_linear(input, self.weight, self.mask, self.bias, self.activation,
                                        self.negative_slope)

    def extra_repr(self) -> str:
        connections = "?" if self.mask.is_meta else int(self.mask.sum())  # a meta mask has no values to count
        text = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"connections={connections}")
        return text + functional.activation_repr(self.activation, self.negative_slope)


__all__ = ["MaskedLinear"]
