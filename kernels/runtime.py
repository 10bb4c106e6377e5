"""Where kernels run, how launches are counted, and how strided tensors are described to kernels.

Triton decides at import time whether `@triton.jit` functions are compiled or interpreted: the
environment variable TRITON_INTERPRET=1 must be set before triton is first imported.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# GPUNN_AUTOTUNE=0: each launch takes the first config that suits it instead of timing them all (the GPU
# test suite uses it: correctness needs one compile per kernel variant, not one per config).
AUTOTUNE = os.environ.get("GPUNN_AUTOTUNE", "1") != "0"
# (major, minor): some pruning limits differ between Triton releases (see the compile reports).
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])

_launches: collections.Counter = collections.Counter()
_visited_blocks: collections.Counter = collections.Counter()
_dense_blocks: collections.Counter = collections.Counter()


def launch(kernel_name: str, device: torch.device, blocks: tuple[int, int] | None = None):
    """Context for one kernel launch: counts it (see launch_counts()) and makes `device` the current CUDA
    device, since Triton launches on the current device, not on the tensors' one.

    blocks: for a block-sparse launch, (weight blocks it visits, weight blocks the dense layer of the
    same shape would visit), added to block_counts().
    """
    _launches[kernel_name] += 1
    if blocks is not None:
        _visited_blocks[kernel_name] += blocks[0]
        _dense_blocks[kernel_name] += blocks[1]
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch_counts() -> dict[str, int]:
    """How many times each Triton kernel has been launched in this process."""
    return dict(_launches)


def block_counts() -> dict[str, tuple[int, int]]:
    """Per block-sparse kernel, the weight blocks its launches visited and the weight blocks the dense
    layer would have visited in the same launches, summed over this process: (visited, dense)."""
    return {name: (_visited_blocks[name], _dense_blocks[name]) for name in _dense_blocks}


def capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream is capturing a CUDA graph (False off CUDA)."""
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


# What graphs captured in this process read: a graph holds raw device addresses, not references, so a cached
# table it reads must outlive every replay, not only its cache's LRU window.
_held_for_graphs: dict[int, object] = {}


def hold_for_graphs(entry, device: torch.device) -> None:
    """Keep `entry` (a cached object holding device tensors) alive for the rest of the process when a CUDA
    graph on `device` is being captured: that graph may read it on any later replay."""
    if capturing(device):
        _held_for_graphs[id(entry)] = entry


class Recent(collections.OrderedDict):
    """A cache of the `size` most recently used entries (mask layouts, RNN step tables), safe to use from
    several threads: a lookup's move to the end and an insertion's eviction of the oldest entry happen under
    one lock, where another thread's eviction between the two had removed a key that was being moved."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self._lock = threading.Lock()

    def lookup(self, key):
        """The entry for key, now the most recent, or None."""
        with self._lock:
            entry = self.get(key)
            if entry is not None:
                self.move_to_end(key)
            return entry

    def keep(self, key, entry) -> None:
        """Store entry as the most recent, forgetting the oldest past `size`."""
        with self._lock:
            self[key] = entry
            self.move_to_end(key)
            if len(self) > self.size:
                self.popitem(last=False)

    def forget(self, key, still) -> None:
        """Drop key's entry if still(entry) says it is the one to drop."""
        with self._lock:
            entry = self.get(key)
            if entry is not None and still(entry):
                del self[key]


_poison = False


def empty(shape, *, device, dtype) -> torch.Tensor:
    """An uninitialised output tensor for a kernel to fill (NaN-filled inside poison_outputs())."""
    if _poison:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


@contextlib.contextmanager
def poison_outputs():
    """Fill every kernel output with NaN before its launch, so a test can prove every element is written."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def triton_runs_on(device: torch.device) -> bool:
    """True where gpunn's Triton kernels run for tensors on `device`: compiled on CUDA, interpreted on
    CPU under TRITON_INTERPRET=1. Elsewhere gpunn falls back to plain torch with the same semantics."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for `dtype`: float32 follows torch's TF32 setting
    (torch.get_float32_matmul_precision() == "highest" means IEEE fp32); other dtypes are exact."""
    return "tf32" if dtype == torch.float32 and _matmul_allows_tf32() else "ieee"


def _matmul_allows_tf32() -> bool:
    # torch >= 2.9 keeps the setting in fp32_precision ("tf32", "ieee", or "none": defer to the global
    # fp32_precision, and from there to the older allow_tf32 flag, whose reading raises once the new API was
    # used). Read through the C getters that torch.backends' attributes call: the attributes cost ~5 us a
    # launch on the development CPU (tests/test_linear.py checks every way of setting it).
    precision = torch._C._get_fp32_precision_getter("cuda", "matmul")
    if precision == "none":
        precision = torch._C._get_fp32_precision_getter("generic", "all")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return torch._C._get_cublas_allow_tf32()


def dot_dtype(dtype: torch.dtype):
    """The dtype operands of `dtype` enter tl.dot in: their own, except bfloat16 under the interpreter,
    which holds bf16 as raw 16-bit integers and would multiply the bits; there it is widened to fp32."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return _TRITON_DTYPES[dtype]


def accumulator_dtype(dtype: torch.dtype):
    """fp32 accumulation for 16- and 32-bit inputs; fp64 stays fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_constants(dtype: torch.dtype) -> dict:
    """The numerics constexprs of a kernel whose tl.dot reads operands of `dtype`."""
    return dict(DOT_DTYPE=dot_dtype(dtype), ACC_DTYPE=accumulator_dtype(dtype), DOT_PRECISION=dot_precision(dtype))


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """accumulator_dtype as a torch dtype: for buffers that carry fp32 (fp64) state between launches."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
                  torch.float64: tl.float64}


def row_alignment(*strides: int) -> int:
    """The largest power of two, up to 16, that divides every row stride given (0 divides by anything).

    Kernels pass it to tl.multiple_of: Triton specialises only strides divisible by 16, and rows of, say,
    1000 bf16 elements are still 16-byte aligned; without the hint they load element by element.
    """
    align = 16
    for stride in strides:
        while stride % align:
            align //= 2
    return align


# Rows an int32 index reaches. A constant here so that a test can lower it and run the wide kernels' variants.
INT32_ROWS = 2 ** 31


def grouped(groups: int, shape=()) -> tuple[int, ...]:
    """The shape of a sum over rows: `shape`, or (groups, *shape) where groups > 0 equal groups of consecutive
    rows are summed apart (gpunn.ops.library.Op's groups: torch.func.vmap's per-sample sums)."""
    return (groups, *shape) if groups else tuple(shape)


def group_rows(m: int, groups: int) -> int:
    """The rows in each of `groups` equal groups of m rows; all m for groups 0 (one sum over all rows)."""
    if groups and m % groups:  # the launchers' contract: a remainder's rows would be summed nowhere
        raise ValueError(f"{m} rows do not make {groups} equal groups")
    return m // groups if groups else m


def wide_rows(m: int, block_rows: int) -> bool:
    """Whether blocks of block_rows rows over m rows have bounds past int32 (a kernel's WIDE_ROWS constexpr)."""
    return m + block_rows >= INT32_ROWS


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 serve kernels too, and a host call to
# either costs ~5 us (it unwraps constexprs); a launcher calls several a launch.
def cdiv(a: int, b: int) -> int:
    """a / b rounded up (b > 0)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def size_bucket(n: int) -> int:
    """Autotuning key for a size that varies call to call (the batch): the next power of two, clamped to
    [16, 8192], so that a new batch size rarely re-tunes."""
    return min(max(next_power_of_2(n), 16), 8192)


@dataclass(frozen=True)
class Rows:
    """A tensor of shape (*, F) seen by a kernel as `m` rows of `F` features without copying.

    Row r starts at element offset (r // inner) * stride_outer + (r % inner) * stride_inner and its
    features are stride_feature apart. Two row strides cover any leading dims that collapse to at most
    two (every contiguous tensor, transposes of batch dims, slices, stride-0 broadcasts such as the
    gradient of .sum()). Kernels compute these offsets in int64.
    """

    tensor: torch.Tensor
    m: int
    inner: int
    stride_outer: int
    stride_inner: int
    stride_feature: int

    @staticmethod
    def of(t: torch.Tensor) -> "Rows":
        """t (*, F), any strides, as rows: its leading dims merged where their strides allow, in up to two
        row dims (a copy of t where they do not)."""
        if t.dim() == 2:  # the common case, without the general merge below (host time: bench/NOTES.md)
            m = t.shape[0]
            return Rows(t, m, m, 0, t.stride(0) if m != 1 else 0, t.stride(1))
        lead = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
        merged: list[tuple[int, int]] = []
        for size, stride in lead:
            if merged and merged[-1][1] == stride * size:
                merged[-1] = (merged[-1][0] * size, stride)
            else:
                merged.append((size, stride))
        if len(merged) > 2:
            # Rare (three or more leading dims that cannot be merged): one copy makes it contiguous. An empty
            # tensor has no element to read: its rows as one dim (the strides of size-0 dims need not merge,
            # contiguous or not).
            if not t.numel():
                return Rows.of(t.reshape(math.prod(t.shape[:-1]), t.shape[-1]))
            return Rows.of(t.contiguous())
        m = 1
        for size, _ in merged:
            m *= size
        if not merged:
            return Rows(t, m, 1, 0, 0, t.stride(-1))
        if len(merged) == 1:
            return Rows(t, m, m, 0, merged[0][1], t.stride(-1))
        (_, outer), (inner_size, inner) = merged
        return Rows(t, m, inner_size, outer, inner, t.stride(-1))

    @property
    def two_row_dims(self) -> bool:
        """Whether row offsets need the outer/inner split (kernels compile the simpler path otherwise)."""
        return self.inner < self.m

    @property
    def row_strides(self) -> tuple[int, int]:
        """(stride_outer, stride_inner), for the alignment check (row_alignment)."""
        return self.stride_outer, self.stride_inner

    def args(self) -> tuple:
        """Kernel arguments: (tensor, inner, stride_outer, stride_inner, stride_feature)."""
        return self.tensor, self.inner, self.stride_outer, self.stride_inner, self.stride_feature
