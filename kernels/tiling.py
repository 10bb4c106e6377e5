"""Tile order, strided row addressing and autotuning configs shared by gpunn's matmul kernels.

A matmul kernel computes an output of (rows x cols) tiles, reducing over a third dimension in chunks.
Each kernel names the three block sizes after its own operands (the dense forward tiles M x N and
reduces K; its weight gradient tiles N x K and reduces M), so a config is described here by role:
(rows, cols, reduction, num_stages, num_warps), and `configs(...)` names it for the kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .runtime import AUTOTUNE, INTERPRET, cdiv

# Hopper (sm_90) tiles. Large square-ish tiles feed the warpgroup MMA; narrow ones with a long reduction
# chunk serve small batches, where the weight read bounds the time and many programs must stream it.
GPU_TILES = (
    # rows, cols, reduction, stages, warps
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 32, 4, 4),
    (128, 128, 32, 3, 8),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 32, 32, 3, 4),
    (32, 32, 32, 2, 4),
    (32, 64, 128, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 32, 256, 3, 4),
)
# The interpreter runs programs one after another: one config, large blocks.
INTERPRETER_TILE = (64, 64, 64, 1, 4)
# The dense backward's elementwise pass (dz and its column sums): (rows, cols, warps) a program step, 128
# columns so each row is a 256-byte (bf16) contiguous read; about this many programs (row chunks x column
# blocks) to stream the (M, N) gradient across the SMs; and, where splitting the rows costs db a second
# launch, the row tiles one chunk keeps (dense.row_chunks). The interpreter splits from two tiles, so that
# tests cover it.
PREACTIVATION_TILE = (64, 64, 4) if INTERPRET else (32, 128, 4)
PREACTIVATION_PROGRAMS = 16 if INTERPRET else 1024
PREACTIVATION_CHUNK_TILES = 1 if INTERPRET else 16
# Double backward's pass (dense_double_backward) holds some eight tiles at once (dy, g_dz, z, act', act'' and
# what it forms): at the pass's 32 x 128 tile that reached 255 registers and spilled up to 2 KB in the sm_90
# compile report, so it takes a quarter of the elements a step.
DOUBLE_BACKWARD_TILE = (64, 64, 4) if INTERPRET else (16, 64, 4)
# The dense weight gradient's output (N, K) may have few tiles while its reduction over the batch is long
# (an RNN's weights over every step: 4 tiles of 128 x 128 at hidden 256, reducing 16384 rows), which would
# leave most SMs idle. Where the output has under half of WEIGHT_GRAD_PROGRAMS tiles (counted at
# WEIGHT_GRAD_TILE), its rows split (dense.weight_grad_splits) until about WEIGHT_GRAD_PROGRAMS programs (two
# per SM of an H100), with at least WEIGHT_GRAD_SPLIT_ROWS rows a split, and enough that the fp32 (N, K) of
# partial sums each split writes moves no more than the rows it reads. The interpreter splits from two row
# tiles, so that tests cover it.
WEIGHT_GRAD_TILE = (64, 64) if INTERPRET else (128, 128)
WEIGHT_GRAD_PROGRAMS = 16 if INTERPRET else 264
WEIGHT_GRAD_SPLIT_ROWS = 64 if INTERPRET else 1024

# Block-sparse kernels take their weight block (BLOCK_N x BLOCK_K) from the layout and tune only the batch
# tile: (batch rows, stages, warps). Their reduction loops are short (a band mask lists 2-4 blocks per
# row), so deep pipelines buy little.
GPU_BATCH_TILES = (
    (128, 3, 8),
    (128, 3, 4),
    (64, 3, 4),
    (256, 3, 8),
    (64, 3, 8),
    (32, 3, 4),
    (16, 3, 4),
    (32, 3, 8),
    (16, 3, 8),
)
INTERPRETER_BATCH_TILE = (64, 1, 4)

# The largest reduction block of this machine's tile table: a split of a reduction made of whole ones
# ends on a block boundary whichever config the autotuner picks.
LARGEST_REDUCTION_BLOCK = INTERPRETER_TILE[2] if INTERPRET else max(tile[2] for tile in GPU_TILES)

SHARED_MEMORY_BUDGET = 200 * 1024  # bytes per program; H100 allows 227 KB, leave room for the epilogue
GROUP_SIZE = 8  # output tile rows per band in grouped order (keeps a band of operand tiles in L2)


def configs(rows: str, cols: str, reduction: str, gpu_tiles=GPU_TILES,
            interpreter_tile=INTERPRETER_TILE) -> list[triton.Config]:
    """Every config of this machine's tile table (the matmul table unless another is given), its block
    sizes named for one kernel."""
    tiles = [interpreter_tile] if INTERPRET else gpu_tiles
    return [
        triton.Config({rows: r, cols: c, reduction: k}, num_stages=s, num_warps=w)
        for r, c, k, s, w in tiles
    ]


def batch_configs(name: str) -> list[triton.Config]:
    """Every batch tile of this machine's table as configs of the one block size `name`."""
    tiles = [INTERPRETER_BATCH_TILE] if INTERPRET else GPU_BATCH_TILES
    return [triton.Config({name: m}, num_stages=s, num_warps=w) for m, s, w in tiles]


def accumulator_budget(element: int, exact_fp32: bool, saves_derivative: bool, row_align: int) -> int:
    """Accumulator elements per thread a tile may hold without spilling on sm_90.

    Each limit comes from the compile report (python -m bench.compile_report): the largest tiles that
    compiled without a spill at that kind of launch.
    """
    budget = 128  # bf16/fp16 operands, 16-aligned rows, a light epilogue: 128x256 over 8 warps fits
    if element == 4 or saves_derivative or row_align < 16:
        budget = 64  # fp32 operands, the act'(z) epilogue or masked vector loads need the registers
    if element == 4 and saves_derivative:
        budget = 32
    if element == 8:
        budget = 32  # an fp64 accumulator takes two registers an element
    if row_align * element < 16:
        # Rows not 16-byte aligned: element-wise loads, one address register each.
        budget = min(budget, 8 if element == 8 or exact_fp32 else 16)
    elif exact_fp32 and row_align < 16:
        budget = min(budget, 8)
    return budget


def pruner(rows: str, cols: str, reduction: str, rows_extent: str, element_of: str, streamed_a_tiles):
    """An early_config_prune hook keeping the configs that suit one call.

    A block size that is not in the configs (a block-sparse kernel's weight block) is read from the
    kernel's arguments. rows_extent names the argument that bounds the output rows (a bucketed batch, or
    N); element_of names a tensor argument whose dtype is the operand dtype; streamed_a_tiles(args) says
    how many (rows x reduction) tiles each pipeline stage holds (2 where backward forms dz from dy and a
    saved tensor, in registers). The kernel passes ROW_ALIGN (and the forward SAVE_DERIVATIVE) as keywords.
    """

    def prune(all_configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        element = args[element_of].element_size()
        a_tiles = streamed_a_tiles(args)
        extent = args[rows_extent]
        exact_fp32 = element == 4 and args.get("DOT_PRECISION") == "ieee"
        row_align = args["ROW_ALIGN"]
        budget = accumulator_budget(element, exact_fp32, args.get("SAVE_DERIVATIVE", False), row_align)
        if a_tiles == 2:
            budget = min(budget, 64)  # dz formed in registers beside the accumulator (report: 128 spilled)
        # A block-sparse kernel: the column block (and its weight block) is the layout's, not tuned.
        layout_block = cols not in all_configs[0].kwargs
        kept, narrow = [], []
        for config in all_configs:
            r, c, k = (config.kwargs.get(name, args.get(name)) for name in (rows, cols, reduction))
            threads = 32 * config.num_warps
            if config.num_stages * (a_tiles * r * k + k * c) * element > SHARED_MEMORY_BUDGET:
                continue
            if r * c > budget * threads:
                continue
            # dz formed in registers in a narrow (mma.sync) tile: under 64 bytes a thread, or it spills.
            if a_tiles == 2 and r < 64 and r * k * element >= 64 * threads:
                continue
            if layout_block:
                # The masked kernels' loops also carry the connection mask (the report: these spilled).
                # dz in registers: at most 64 bytes a thread in any tile.
                if a_tiles == 2 and r * k * element > 64 * threads:
                    continue
                # Rows not 16-byte aligned load the weight block element by element, an address register
                # pair each: 4 warps spilled at 64 x 64, 8 do not.
                if row_align * element < 16 and config.num_warps < 8:
                    continue
                # fp64: 16 accumulator elements a thread (32 registers) beside the mask loads.
                if element == 8 and r * c > 16 * threads:
                    continue
            # fp64 (DMMA, a small fraction of the bf16 rate) and IEEE fp32 (FMA): a long reduction chunk
            # only costs registers.
            if (element == 8 or exact_fp32) and k > 32:
                continue
            # Small batches want the narrow tiles, large ones the wide tiles (unless only narrow ones fit).
            # Where the rows are a layout's block rather than tuned, there is nothing to choose.
            if rows in config.kwargs and r > max(extent, 16):
                continue
            if rows in config.kwargs and extent >= 256 and r < 64 and budget >= 16:
                narrow.append(config)
                continue
            kept.append(config)
        if not kept and layout_block:
            # The column block is a layout's: the register budget may rule out every wide tile.
            kept = narrow
        return pruned(kept, all_configs)

    return prune


def tile_grid(rows: int, cols: int, rows_block: str, cols_block: str, splits: int = 1):
    """A launch grid of (output tiles, splits of the reduction) for a tuned tile of rows_block x cols_block."""
    return lambda meta: (cdiv(rows, meta[rows_block]) * cdiv(cols, meta[cols_block]), splits)


def smallest(configs: list[triton.Config]) -> triton.Config:
    """The config that stages the least: what a pruner falls back on where no config suits."""
    return min(configs, key=lambda cfg: cfg.num_stages * sum(cfg.kwargs.values()))


def pruned(kept: list[triton.Config], configs: list[triton.Config]) -> list[triton.Config]:
    """What a pruner returns: the configs it kept (the smallest of `configs` where it kept none), only the
    first of them under GPUNN_AUTOTUNE=0."""
    kept = kept or [smallest(configs)]
    return kept if AUTOTUNE else kept[:1]


@triton.jit
def tile_count(size, BLOCK: tl.constexpr):
    """The tiles of BLOCK that cover `size`: tl.cdiv's (size + BLOCK - 1) // BLOCK wraps for an int32 size
    within a block of 2**31 (passed as int32 below 2**31), and loops bounded by it ran no step."""
    return size // BLOCK + (size % BLOCK != 0)


@triton.jit
def as_wide_as(index, size):
    """index in size's integer type: int64 exactly where the size reached the kernel as int64 (2**31 or more),
    so that index * BLOCK cannot wrap there, while sizes below keep int32 arithmetic (int64 index vectors
    had spilled in the sm_90 compile report)."""
    return index + size * 0


@triton.jit
def grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """Map a linear program id to (row tile, col tile) in grouped order: GROUP row tiles share each
    column sweep, so their operand tiles are re-read from L2 rather than from DRAM."""
    per_group = GROUP * num_cols
    group = pid // per_group
    first_row = group * GROUP
    group_rows = min(num_rows - first_row, GROUP)
    row = first_row + (pid % per_group) % group_rows
    col = (pid % per_group) // group_rows
    return row, col


@triton.jit
def block_start(index, rows, WIDE_ROWS: tl.constexpr):
    """The first row of the index-th block of `rows` rows: in int64 where the blocks' bounds pass 2^31 - 1
    (WIDE_ROWS, from runtime.wide_rows), in int32 otherwise, as int64 rows cost registers."""
    if WIDE_ROWS:
        return index.to(tl.int64) * rows
    else:
        return index * rows


@triton.jit
def row_offsets(rows, inner, stride_outer, stride_inner, TWO_ROW_DIMS: tl.constexpr):
    """int64 element offsets of `rows` of a Rows-described tensor (see runtime.Rows)."""
    if TWO_ROW_DIMS:
        # The division in the rows' own type (int32 unless M passed 2**31): a 64-bit division by a runtime
        # value is a long software routine on the GPU, and cost the weight gradient 10-100 registers.
        outer = rows // inner
        return outer.to(tl.int64) * stride_outer + (rows - outer * inner).to(tl.int64) * stride_inner
    else:
        return rows.to(tl.int64) * stride_inner
