"""gpunn's nn.Module drop-ins."""
from .linear import Linear
from .masked_linear import MaskedLinear

__all__ = ["Linear", "MaskedLinear"]
