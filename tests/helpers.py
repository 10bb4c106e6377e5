"""Shared test utilities: references in float64, error measure, tolerances, launch accounting."""
from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpunn.kernels import launch_counts

# Relative norm error bounds per dtype (DESIGN.md, Numerics). float32 is IEEE in these tests.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}

# The independent oracle: torch.nn.functional, applied in float64 (written out here rather than taken
# from gpunn.functional, so that the tests do not check gpunn against its own code).
REFERENCE_ACTIVATIONS = {
    None: lambda z, slope: z,
    "relu": lambda z, slope: F.relu(z),
    "leaky_relu": lambda z, slope: F.leaky_relu(z, slope),
    "gelu": lambda z, slope: F.gelu(z),
    "gelu_tanh": lambda z, slope: F.gelu(z, approximate="tanh"),
    "tanh": lambda z, slope: torch.tanh(z),
    "sigmoid": lambda z, slope: torch.sigmoid(z),
    "silu": lambda z, slope: F.silu(z),
}
ACTIVATIONS = list(REFERENCE_ACTIVATIONS)


def case_seed(*parts) -> int:
    """A seed for a test case from its parameters, the same in every process (Python's hash() of a string is
    salted per process, so a failure seeded by it would not reproduce on a rerun)."""
    return zlib.crc32(repr(parts).encode())


def dtypes_for(device: torch.device) -> list[torch.dtype]:
    """Every dtype gpunn supports; bfloat16 correctness is claimed only where tensor cores compute it."""
    dtypes = [torch.float64, torch.float32, torch.float16]
    if device.type == "cuda":
        dtypes.append(torch.bfloat16)
    return dtypes


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives inf (NaN never passes)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out).any():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]:.0e} ({dtype})"


def reference_linear(x, w, b, activation, slope=0.01):
    """act(x W^T + b) by torch.nn.functional in float64 on float64 copies (leaf tensors)."""
    return REFERENCE_ACTIVATIONS[activation](F.linear(x, w, b), slope)


def leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 leaf copy of t that requires grad where t does."""
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)


@contextlib.contextmanager
def count_launches():
    """Yields a dict that, after the block, holds the launches per kernel made inside it."""
    before = launch_counts()
    delta: dict[str, int] = {}
    yield delta
    after = launch_counts()
    delta.update({name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)})


class TorchOpSpy(TorchDispatchMode):
    """Records every aten op that runs, to show no torch matmul (or activation) stands behind the Triton path."""

    MATMULS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.matmul", "aten.linear", "aten.baddbmm", "aten.dot",
               "aten.mv", "aten.gelu", "aten.gelu_backward", "aten._sparse_mm", "aten.masked_fill"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def matmuls(self) -> list[str]:
        return sorted(self.MATMULS & set(self.ops))


@contextlib.contextmanager
def raises_exactly(expected: type[BaseException], match: str | None = None):
    """pytest.raises of that type itself, not a subclass of it (NotImplementedError is a RuntimeError)."""
    with pytest.raises(expected, match=match) as info:
        yield info
    assert type(info.value) is expected, f"raised {type(info.value).__name__}, expected {expected.__name__}"


def assert_same_values(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Equal to 1e-10 (float64), NaN and infinities in the same places: for results torch makes non-finite."""
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0, equal_nan=True, msg=what)
