"""How gpunn's ops follow torch.autocast, as the torch ops they replace do: the layers run in the autocast
dtype (torch's lower-precision list: linear, RNN, RNNCell...), the losses in float32 (its float32 list:
cross_entropy, mse_loss): with a float16 loss, the GradScaler's gradient seed (its scale, 65536 at
first) would overflow float16 and skip steps."""
from __future__ import annotations

import weakref

import torch

from .kernels.runtime import capturing

# A parameter's cast, reused as torch's autocast reuses its own cache: a layer called many times in a region (an
# RNNCell unrolled over T steps, weights shared) saves one copy for backward, not one a call. Keyed by the
# parameter's id; valid while the parameter is the same tensor, at the same version and storage, and while the
# copy lives (held weakly: saved by a graph or in use, it is never made twice; nothing here keeps it alive after
# that). Unlike torch's, it can outlive a region while a graph holds the copy: a write that bypasses the version
# counter (param.data.mul_(...)) in between is then not seen (within one region, torch's misses it too).
_casts: dict[tuple[int, torch.dtype], tuple] = {}


def cast(device_type: str, *tensors: torch.Tensor | None, to_float32: bool = False) -> tuple:
    """tensors as an op under autocast on device_type receives them: floating tensors other than float64
    cast to the autocast dtype (to float32 with to_float32); unchanged outside autocast. None stays None."""
    # Meta tensors have no autocast (is_autocast_enabled raises for them); torch.amp.is_autocast_available
    # would say so for every type, but dynamo before torch 2.13 cannot trace it (a graph break).
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.float32 if to_float32 else torch.get_autocast_dtype(device_type)
    return tuple(_cast(t, dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # As torch's cache: only leaves that require grad (parameters), and not while a compiler traces; and only
    # in grad mode, where a copy is saved for backward (one made under no_grad has no graph back to the
    # parameter, and would cut its gradient if a later call in grad mode took it). Not while a CUDA graph is
    # captured: a copy from before the capture would be read by every replay as it was, and one made in the
    # graph's memory pool is rewritten by replays.
    # is_compiling first: Dynamo cannot trace is_inference_mode_enabled (a graph break under fullgraph=True).
    if (torch.compiler.is_compiling() or tensor.dtype == dtype or type(tensor) is not torch.nn.Parameter
            or not tensor.requires_grad or not torch.is_grad_enabled() or torch.is_inference_mode_enabled()
            or not torch.is_autocast_cache_enabled() or capturing(tensor.device)):
        return tensor.to(dtype)
    key = (id(tensor), dtype)
    entry = _casts.get(key)
    if entry is not None:
        parameter, state, copy = entry[0](), entry[1], entry[2]()
        if parameter is tensor and state == _state(tensor) and copy is not None and copy._version == 0:
            return copy
    copy = tensor.to(dtype)
    _casts[key] = (weakref.ref(tensor, lambda _, key=key: _casts.pop(key, None)), _state(tensor), weakref.ref(copy))
    return copy


def _state(tensor: torch.Tensor) -> tuple:
    """What tells a parameter's values changed: its version (in-place ops) and storage (a new .data)."""
    return tensor._version, tensor.data_ptr(), tensor.device
