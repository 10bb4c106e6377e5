"""How gpunn's ops follow torch.autocast, as the torch ops they replace do: the layers run in the autocast
dtype (torch's lower-precision list: linear, RNN, RNNCell...), the losses in float32 (its float32 list:
cross_entropy, mse_loss): with a float16 loss, the GradScaler's gradient seed (its scale, 65536 at
first) would overflow float16 and skip steps."""
from __future__ import annotations

import torch


def cast(device_type: str, *tensors: torch.Tensor | None, to_float32: bool = False) -> tuple:
    """tensors as an op under autocast on device_type receives them: floating tensors other than float64
    cast to the autocast dtype (to float32 with to_float32); unchanged outside autocast. None stays None."""
    # Meta tensors have no autocast (is_autocast_enabled raises for them); torch.amp.is_autocast_available
    # would say so for every type, but dynamo before torch 2.13 cannot trace it (a graph break).
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.float32 if to_float32 else torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)
