"""Block-sparse layouts of a connectivity mask: which weight blocks the masked kernels visit.

A mask (N, K) (True where output n reads input k) is cut into blocks of BLOCK_N x BLOCK_K. A block with
no connection is never visited. A block whose every in-range position is connected is *full*: kernels
load it as a dense tile. Any other listed block is *partial*: kernels load its weights under the mask,
so a masked-out weight is never read (NaN or Inf there changes nothing). The lists are built once per
mask and device, on the device, with one host sync to size the grids, and cached (`layout_for`).
"""
from __future__ import annotations

import functools
import operator
import weakref
from dataclasses import dataclass

import torch

from .runtime import Recent, cdiv, hold_for_graphs

# Weight blocks (BLOCK_N, BLOCK_K) by operand size in bytes. Small blocks waste less work on a sparse
# mask's partial blocks; the batch tile (BLOCK_M, tuned) gives the MMA its 64+ rows. Each block side is
# the reduction of one kernel (BLOCK_K forward, BLOCK_N for the input gradient), and 4- and 8-byte
# operands keep reductions to 32, as the dense pruner does (longer ones only cost registers for
# fp64's DMMA and IEEE fp32's FMA).
DEFAULT_BLOCKS = {2: (64, 64), 4: (32, 32), 8: (32, 32)}
_EMPTY, _PARTIAL, _FULL = 2, 1, 0  # sort keys: full blocks first, then partial, then empty


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """The blocks of a mask (N, K) that hold a connection, in the three orders the kernels walk them.

    Per output block row r (forward): row_index[r, :row_count[r]] are the listed block columns, the
    first row_full[r] of them full. Per input block column c (input gradient): col_index[c, :col_count[c]]
    the listed block rows, full first. block_order lists every block id (r * KB + c): the full_blocks
    full ones, then the partial_blocks partial ones, then the empty ones (weight gradient).
    All index tensors are int32 on the mask's device; `mask` is the mask as uint8, read for partial blocks only.
    """

    shape: tuple[int, int]
    block: tuple[int, int]
    mask: torch.Tensor  # (N, K) uint8, contiguous
    row_count: torch.Tensor  # (NB,)
    row_full: torch.Tensor  # (NB,)
    row_index: torch.Tensor  # (NB, KB)
    col_count: torch.Tensor  # (KB,)
    col_full: torch.Tensor  # (KB,)
    col_index: torch.Tensor  # (KB, NB)
    block_order: torch.Tensor  # (NB * KB,)
    full_blocks: int
    partial_blocks: int

    @property
    def grid(self) -> tuple[int, int]:
        """(NB, KB): block rows and block columns."""
        return tuple(cdiv(size, block) for size, block in zip(self.shape, self.block))

    @property
    def visited_blocks(self) -> int:
        """Weight blocks holding at least one connection: the blocks each kernel visits."""
        return self.full_blocks + self.partial_blocks

    @property
    def dense_blocks(self) -> int:
        """Weight blocks the dense layer of the same shape visits at this block size."""
        rows, cols = self.grid
        return rows * cols

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def __repr__(self) -> str:
        return (f"BlockLayout(shape={self.shape}, block={self.block}, full={self.full_blocks}, "
                f"partial={self.partial_blocks}, dense={self.dense_blocks})")


MAX_BLOCK_BYTES = 32 * 1024  # one weight block; larger ones overflow shared memory at 3 pipeline stages


def check_block(block, element_size: int | None = None) -> tuple[int, int]:
    """Validate a (BLOCK_N, BLOCK_K) pair: powers of two from 16 (tl.dot's smallest tile) to 128, and,
    given the weights' element size, at most MAX_BLOCK_BYTES a block. Raises ValueError."""
    try:
        block = tuple(operator.index(b) for b in block)
    except TypeError:
        raise ValueError(f"block must be a pair of powers of two from 16 to 128, got {block!r}") from None
    if len(block) != 2 or not all(16 <= b <= 128 and b & (b - 1) == 0 for b in block):
        raise ValueError(f"block must be a pair of powers of two from 16 to 128, got {block}")
    if element_size is not None and block[0] * block[1] * element_size > MAX_BLOCK_BYTES:
        raise ValueError(f"a {block[0]}x{block[1]} block of {element_size}-byte weights exceeds "
                         f"{MAX_BLOCK_BYTES} bytes; use a smaller block")
    return block


def build(mask: torch.Tensor, block: tuple[int, int]) -> BlockLayout:
    """The BlockLayout of a bool mask (N, K) at blocks of `block` (BLOCK_N, BLOCK_K), on the mask's device."""
    block_n, block_k = check_block(block)
    n, k = mask.shape
    rows, cols = cdiv(n, block_n), cdiv(k, block_k)
    if rows * cols >= 2**31:
        raise ValueError(f"a {n}x{k} mask has {rows * cols} blocks of {block_n}x{block_k}: more than int32 block ids")
    padded = torch.zeros(rows * block_n, cols * block_k, dtype=torch.uint8, device=mask.device)
    padded[:n, :k] = mask
    connections = padded.view(rows, block_n, cols, block_k).sum(dim=(1, 3), dtype=torch.int32)  # (NB, KB)
    rows_in = (n - torch.arange(rows, device=mask.device) * block_n).clamp(max=block_n)
    cols_in = (k - torch.arange(cols, device=mask.device) * block_k).clamp(max=block_k)
    key = torch.full_like(connections, _PARTIAL)
    key[connections == rows_in[:, None] * cols_in[None, :]] = _FULL  # every in-range position connected
    key[connections == 0] = _EMPTY

    def lists(keys: torch.Tensor):
        # Stable sort by key: full, partial, empty; ascending block index within each kind.
        index = torch.sort(keys, dim=1, stable=True).indices.to(torch.int32)
        return (keys != _EMPTY).sum(1, dtype=torch.int32), (keys == _FULL).sum(1, dtype=torch.int32), index

    row_count, row_full, row_index = lists(key)
    col_count, col_full, col_index = lists(key.t())
    flat = key.reshape(-1)
    full, partial = (int(v) for v in torch.stack([(flat == _FULL).sum(), (flat == _PARTIAL).sum()]).tolist())
    layout = BlockLayout(
        shape=(n, k), block=(block_n, block_k), mask=mask.to(torch.uint8).contiguous(),
        row_count=row_count, row_full=row_full, row_index=row_index.contiguous(),
        col_count=col_count, col_full=col_full, col_index=col_index.contiguous(),
        block_order=torch.sort(flat, stable=True).indices.to(torch.int32),
        full_blocks=full, partial_blocks=partial,
    )
    _by_own_mask[id(layout.mask)] = layout
    return layout


_CACHE_SIZE = 64
# id(layout.mask) -> layout, for every live layout: an op handed a layout's own uint8 mask finds the layout.
_by_own_mask: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@dataclass
class _Entry:
    mask: weakref.ref  # the mask the layout was built from (dead once that tensor is freed)
    data_ptr: int
    version: int | None  # the mask's version counter when last checked (None: inference tensors have none)
    layout: BlockLayout


_cache = Recent(_CACHE_SIZE)  # (id(mask), device, block) -> _Entry


def _forget(key, ref) -> None:
    # The mask was freed: drop its layout now (it holds a copy of the mask on the device).
    _cache.forget(key, lambda entry: entry.mask is ref)


@torch.compiler.disable  # reads ids, weak references and version counters: always run eagerly
def layout_for(mask: torch.Tensor, block: tuple[int, int]) -> BlockLayout:
    """The layout of `mask` at `block`, built on first use and cached per mask tensor, device and block.

    A change through torch ops (`mask[...] = ...`, `load_state_dict`) bumps the mask's version: the next
    call compares the mask with the layout's copy and rebuilds if it differs (a version bump without a
    change, as a DDP buffer broadcast makes, costs one comparison). Writes that bypass the version counter
    (through `.data`, numpy or DLPack aliases) are not seen. Masks made under torch.inference_mode have
    no version counter and are compared on every call. A freed mask's entry is dropped at once.
    """
    key = (id(mask), mask.device, tuple(block))
    version = None if mask.is_inference() else mask._version
    entry = _cache.lookup(key)
    if entry is not None and entry.mask() is mask:
        unchanged = version is not None and entry.version == version and entry.data_ptr == mask.data_ptr()
        if unchanged or torch.equal(entry.layout.mask.view(torch.bool), mask):
            entry.version, entry.data_ptr = version, mask.data_ptr()
            hold_for_graphs(entry.layout, key[1])  # the mask's device
            return entry.layout
    layout = build(mask, block)
    _cache.keep(key, _Entry(weakref.ref(mask, functools.partial(_forget, key)), mask.data_ptr(), version, layout))
    return layout


# layout -> {reps: the layout of its mask repeated}, alive as long as the layout is.
_repeats: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def repeated(layout: BlockLayout, reps: tuple[int, int]) -> BlockLayout:
    """The layout of layout's mask repeated reps = (along N, along K) times, as Tensor.repeat lays it out:
    the mask of a GEMM over two weights side by side ([W | V] at (1, 2)) or stacked ([W; V] at (2, 1)), both
    masked by the same mask, as the masked layer's double backward runs its sums of two products. Built on
    first use (one host sync) and kept as long as `layout` lives."""
    reps = tuple(reps)
    if reps == (1, 1):
        return layout
    built = _repeats.setdefault(layout, {})
    if reps not in built:
        built[reps] = build(layout.mask.view(torch.bool).repeat(*reps), layout.block)
    return built[reps]


@torch.compiler.disable
def layout_of(mask: torch.Tensor, block: tuple[int, int]) -> BlockLayout:
    """The layout a masked op is handed as a tensor (torch's custom ops take tensors, not layouts): a bool
    mask (layout_for's cache), or the uint8 copy a BlockLayout holds (the layout itself; rebuilt, uncached,
    for a uint8 mask that is no layout's)."""
    if mask.dtype == torch.uint8:
        layout = _by_own_mask.get(id(mask))
        if layout is not None and layout.mask is mask and layout.block == tuple(block):
            return layout
        return build(mask.view(torch.bool), block)
    return layout_for(mask, block)
