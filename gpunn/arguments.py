"""Argument checks, run before anything reads the arguments: what torch's argument parser raises for a torch
op's arguments (TypeError, naming the argument and its position), and the parsers of the layers' and masks'
size arguments (ints, pairs, paddings) as torch.nn's convolutions take them."""
from __future__ import annotations

import numbers

import torch

from . import reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what gpunn's kernels take


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


def is_int(value) -> bool:
    """Whether value is an integer as torch.nn's size arguments take them (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value, name: str) -> int:
    """value as an int, where it is a positive integer (is_int); else ValueError naming the argument."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def non_negative_int(value, name: str) -> int:
    """value as an int, where it is an integer (is_int) of 0 or more; else ValueError naming the argument."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def as_pair(value, name: str) -> tuple[int, int]:
    """(value, value) for an int, the pair itself for a pair of ints; TypeError otherwise."""
    try:
        pair = (value, value) if is_int(value) else tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(is_int(v) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def padding_sides(padding, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                  error: type[Exception] = ValueError) -> tuple[tuple[int, int], tuple[int, int]]:
    """The zero padding (height, width) before the first row and column and after the last, of an int, a
    pair, "valid" or "same" as F.conv2d takes them: "same" only at stride 1, the far side one more where
    dilation x (kernel - 1) is odd (reference.same_padding). `error` for a string F.conv2d refuses: nn.Conv2d
    raises ValueError there, F.conv2d RuntimeError. A number is not checked here (negative, say)."""
    if not isinstance(padding, str):
        pair = as_pair(padding, "padding")
        return pair, pair
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding != "same":
        raise error(f"Invalid padding string: '{padding}'")
    if tuple(stride) != (1, 1):
        raise error("padding='same' is not supported for strided convolutions")
    return reference.same_padding(kernel_size, dilation)


def as_single(value, name: str) -> int:
    """An int, or a 1-sequence of one int (as nn.Conv1d accepts); TypeError otherwise."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not is_int(value):
        raise TypeError(f"{name} must be an int or a 1-tuple of an int, got {value!r}")
    return int(value)
