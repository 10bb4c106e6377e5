"""gpunn's nn.Module drop-ins."""
from .linear import Linear

__all__ = ["Linear"]
