"""The work gpunn's kernels do, counted as Triton's interpreter executes them (no GPU needed).

Under TRITON_INTERPRET=1 every program of every launch runs in Python, and every tl.load, tl.store and
tl.dot goes through the interpreter's builder. count_work() wraps those builder calls and adds up:
- launches and programs (the grid's size);
- dot FLOPs: 2 M N K of every tl.dot as issued, so tile padding past a tensor's edge counts (it is work
  a GPU does too), and blocks a block-sparse kernel skips do not;
- bytes loaded and stored: the distinct addresses each tl.load / tl.store touches among the lanes its mask
  lets through, at their element size (a broadcast load of one value counts once), summed over programs
  and launches. This is what programs request from memory; on a GPU, programs that read the same data
  share it through L2, so DRAM traffic can be lower.
Set beside an op's minimal FLOPs and bytes, the counts show fusion and skipped work on a CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np

from .runtime import INTERPRET


@dataclass
class Work:
    """Totals over the kernels launched inside count_work()."""

    launches: int = 0
    programs: int = 0
    dot_flops: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0

    def __truediv__(self, calls: int) -> "Work":
        """The work per call, for a block that made `calls` identical calls."""
        return Work(*(getattr(self, f.name) // calls for f in fields(self)))


def _bytes(pointers, mask) -> int:
    """Bytes at the distinct addresses of the lanes `mask` lets through."""
    addresses = pointers.data[np.broadcast_to(mask.data, pointers.data.shape)]
    return np.unique(addresses).size * pointers.get_element_ty().primitive_bitwidth // 8


@contextlib.contextmanager
def count_work() -> Iterator[Work]:
    """Yields a Work that, after the block, holds what the Triton kernels launched inside it did.

    Raises RuntimeError where kernels are compiled rather than interpreted (counting needs the interpreter)."""
    if not INTERPRET:
        raise RuntimeError("counting kernel work needs Triton's interpreter (TRITON_INTERPRET=1 before triton is "
                           "imported)")
    from triton.runtime.interpreter import InterpreterBuilder

    work = Work()
    originals = {name: getattr(InterpreterBuilder, name)
                 for name in ("set_grid_dim", "create_masked_load", "create_masked_store", "create_dot")}

    # The builder's methods differ in trailing arguments across Triton releases; only the leading ones are read.
    def set_grid_dim(self, nx, ny, nz):
        work.launches += 1
        work.programs += nx * ny * nz
        return originals["set_grid_dim"](self, nx, ny, nz)

    def create_masked_load(self, pointers, mask, *args, **kwargs):
        work.bytes_loaded += _bytes(pointers, mask)
        return originals["create_masked_load"](self, pointers, mask, *args, **kwargs)

    def create_masked_store(self, pointers, value, mask, *args, **kwargs):
        work.bytes_stored += _bytes(pointers, mask)
        return originals["create_masked_store"](self, pointers, value, mask, *args, **kwargs)

    def create_dot(self, a, b, *args, **kwargs):
        work.dot_flops += 2 * int(np.prod(a.data.shape)) * b.data.shape[-1]
        return originals["create_dot"](self, a, b, *args, **kwargs)

    patched = {"set_grid_dim": set_grid_dim, "create_masked_load": create_masked_load,
               "create_masked_store": create_masked_store, "create_dot": create_dot}
    for name, method in patched.items():
        setattr(InterpreterBuilder, name, method)
    try:
        yield work
    finally:
        for name, method in originals.items():
            setattr(InterpreterBuilder, name, method)
