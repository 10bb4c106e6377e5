"""gpunn: neural-network building blocks as hand-written Triton kernels, as drop-in torch modules.

Submodules load on first use, so that `python -m gpunn` can choose Triton's interpreter (CPU-only
machines) before triton is imported.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CrossEntropyLoss": ("gpunn.losses", "CrossEntropyLoss"),
    "Linear": ("gpunn.modules", "Linear"),
    "MSELoss": ("gpunn.losses", "MSELoss"),
    "MaskedLinear": ("gpunn.modules", "MaskedLinear"),
    "LocallyConnected1d": ("gpunn.modules", "LocallyConnected1d"),
    "LocallyConnected2d": ("gpunn.modules", "LocallyConnected2d"),
    "RNN": ("gpunn.modules", "RNN"),
    "RNNCell": ("gpunn.modules", "RNNCell"),
    "convert": ("gpunn.convert", None),
    "functional": ("gpunn.functional", None),
    "kernels": ("gpunn.kernels", None),
    "losses": ("gpunn.losses", None),
    "masks": ("gpunn.masks", None),
    "modules": ("gpunn.modules", None),
    "optim": ("gpunn.optim", None),
    "reference": ("gpunn.reference", None),
}

__all__ = ["CrossEntropyLoss", "Linear", "LocallyConnected1d", "LocallyConnected2d", "MSELoss", "MaskedLinear", "RNN",
           "RNNCell", "convert", "functional", "kernels", "losses", "masks", "modules", "optim", "reference",
           "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'gpunn' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = getattr(module, attribute) if attribute else module
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
