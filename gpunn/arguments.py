"""Argument checks that raise what torch's argument parser raises for a torch op's arguments (TypeError,
naming the argument and its position), before anything reads them."""
from __future__ import annotations

import torch


def wrong_type(op: str, name: str, position: int, expected: str, value) -> TypeError:
    """The parser's error for `value` given as argument `name` (its 1-based `position`) of `op`."""
    return TypeError(f"{op}(): argument '{name}' (position {position}) must be {expected}, not "
                     f"{type(value).__name__}")


def check_tensors(op: str, *arguments: tuple[str, object, bool] | None) -> None:
    """TypeError for each (name, value, optional), in the op's signature order from position 1, whose value
    is not a tensor (or None, where optional): a list, an array or None where torch takes a tensor. None in
    place of a triple: an argument of that position checked elsewhere."""
    for position, argument in enumerate(arguments, 1):
        if argument is None:
            continue
        name, value, optional = argument
        if not isinstance(value, torch.Tensor) and not (optional and value is None):
            raise wrong_type(op, name, position, "Tensor", value)
