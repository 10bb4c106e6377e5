"""gpunn's nn.Module drop-ins."""
from .linear import Linear
from .local import LocallyConnected1d, LocallyConnected2d
from .masked_linear import MaskedLinear
from .rnn import RNN, RNNCell

__all__ = ["Linear", "LocallyConnected1d", "LocallyConnected2d", "MaskedLinear", "RNN", "RNNCell"]
