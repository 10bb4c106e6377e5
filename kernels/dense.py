"""The fused dense layer y = act(x W^T + b): the forward kernel, the backward's elementwise pass and its
two gradient GEMMs, and their launchers.

Shapes: x (M, K) described by runtime.Rows (any leading dims, any strides), W (N, K), b (N,),
y (M, N) contiguous. Backward forms dz = dy * act'(z) once, in its own pass over (M, N), which also
sums db; the input- and weight-gradient kernels are then plain GEMMs on dz. (Formed in registers inside
each GEMM's loop, dz kept the MMA operand off the shared-memory path, and those GEMMs measured 1.6-2.3x
slower on an H100 than on a plain operand; written from inside the input-gradient GEMM's pipelined loop,
it slowed that GEMM 1.9x: bench/NOTES.md.)

Memory traffic, the least each launch must move (tiles of the other operand are re-read from L2;
grouped tile order keeps a band of them there):
- forward:            reads x (M K) and W (N K), writes y (M N), plus act'(z) (M N) when backward needs it.
- grad_preactivation: reads dy and the saved tensor (M N each), writes dz (M N) where there is an
                      activation, and db (N) (via (chunks, N) partial sums; see the launcher).
- grad_input:         reads dz (M N) and W (N K), writes dx (M K).
- grad_weight:        reads dz and x (M K), writes dW (N K).
Operands enter tl.dot in their own dtype (runtime.dot_dtype: bf16 is widened only under the
interpreter, which cannot multiply bf16); dz is stored in dy's dtype, which it enters the MMA in anyway;
accumulation is fp32 (fp64 for fp64 inputs); every output is rounded once, at its store. Reductions run
in a fixed order: results are bitwise reproducible for a given config (no atomics).

Ensembles (torch.func.vmap over stacked weights): forward and grad_input take `members` E > 0, a weight
(E, N, K) and bias (E, N), one member's after another, and rows that are E members' M rows one after
another (x at one row stride). A MEMBERS constexpr puts the members on grid axis 1, each program's pointers
moved to its member's rows and weight, so the plain kernels compile as they did. The weight gradient and db
of each member are grad_weight's and grad_preactivation's groups.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activations
from .runtime import (Rows, accumulator_dtype, cdiv, dot_constants, empty, group_rows, grouped, launch,
                      row_alignment, size_bucket, state_dtype, wide_rows)
from .tiling import (GROUP_SIZE, LARGEST_REDUCTION_BLOCK, PREACTIVATION_CHUNK_TILES, PREACTIVATION_PROGRAMS,
                     PREACTIVATION_TILE, WEIGHT_GRAD_PROGRAMS, WEIGHT_GRAD_SPLIT_ROWS, WEIGHT_GRAD_TILE, block_start,
                     configs, grouped_tile, pruner, row_offsets, tile_count, tile_grid)
from .tuned import tuned


@tuned
@triton.autotune(
    configs=configs("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    key=["M_BUCKET", "N", "K", "DOT_PRECISION", "ROW_ALIGN", "SAVE_DERIVATIVE"],
    prune_configs_by={"early_config_prune": pruner("BLOCK_M", "BLOCK_N", "BLOCK_K", "M_BUCKET", "w_ptr",
                                                   lambda args: 1)},
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["M", "M_BUCKET", "x_inner"])
def dense_forward_kernel(
    x_ptr, x_inner, stride_x_outer, stride_x_inner, stride_xk,
    w_ptr, stride_wn, stride_wk,
    b_ptr, stride_b,
    y_ptr, g_ptr,  # (M, N) contiguous; g receives act'(z) when SAVE_DERIVATIVE
    M, N, K,
    M_BUCKET,  # autotuning key only
    X_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, ACT: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SAVE_DERIVATIVE: tl.constexpr, DOT_PRECISION: tl.constexpr, MEMBERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    # MEMBERS (an ensemble under torch.func.vmap, see the module docstring): grid axis 1 picks a member's M rows
    # of x and of the outputs, its (N, K) weight and (N,) bias.
    if MEMBERS:
        member = tl.program_id(1).to(tl.int64)
        x_ptr += tl.multiple_of(member * M * stride_x_inner, ROW_ALIGN)
        w_ptr += tl.multiple_of(member * N * stride_wn, ROW_ALIGN)
        b_ptr += tl.multiple_of(member * N, ROW_ALIGN)
        y_ptr += tl.multiple_of(member * M * N, ROW_ALIGN)
        g_ptr += tl.multiple_of(member * M * N, ROW_ALIGN)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tile_count(M, BLOCK_M), tile_count(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    m_ok = rm < M
    n_ok = rn < N
    x_rows = tl.multiple_of(row_offsets(rm, x_inner, stride_x_outer, stride_x_inner, X_TWO_ROW_DIMS), ROW_ALIGN)
    w_rows = tl.multiple_of(rn.to(tl.int64) * stride_wn, ROW_ALIGN)
    x_base = x_ptr + x_rows[:, None]  # [BM, 1]
    w_base = w_ptr + w_rows[None, :]  # [1, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tile_count(K, BLOCK_K)):
        # Column offsets in int64: a column-major x or W of over 2**31 elements has strides near M or N.
        kk = (k * BLOCK_K + rk).to(tl.int64)  # [BK]
        x_ptrs = x_base + kk[None, :] * stride_xk  # [BM, BK]
        w_ptrs = w_base + kk[:, None] * stride_wk  # [BK, BN]
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = kk < K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    activations.epilogue(acc, rm, rn, M, N, b_ptr, stride_b, y_ptr, g_ptr, ACT, NEGATIVE_SLOPE, HAS_BIAS,
                         SAVE_DERIVATIVE, ROW_ALIGN)


@tuned
@triton.autotune(
    configs=configs("BLOCK_M", "BLOCK_K", "BLOCK_N"),
    key=["M_BUCKET", "N", "K", "DOT_PRECISION", "ROW_ALIGN"],
    prune_configs_by={"early_config_prune": pruner("BLOCK_M", "BLOCK_K", "BLOCK_N", "M_BUCKET", "w_ptr",
                                                   lambda args: 1)},
)
@triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=["M", "M_BUCKET", "dz_inner"])
def dense_grad_input_kernel(
    dz_ptr, dz_inner, stride_dz_outer, stride_dz_inner, stride_dzn,
    w_ptr, stride_wn, stride_wk,
    dx_ptr,  # (M, K) contiguous
    M, N, K,
    M_BUCKET,  # autotuning key only
    DZ_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, MEMBERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    # dx = dz @ W: output tiles of (M, K), reduction over N. MEMBERS: grid axis 1 picks a member's M rows and
    # its weight, as in the forward.
    if MEMBERS:
        member = tl.program_id(1).to(tl.int64)
        dz_ptr += tl.multiple_of(member * M * stride_dz_inner, ROW_ALIGN)
        w_ptr += tl.multiple_of(member * N * stride_wn, ROW_ALIGN)
        dx_ptr += tl.multiple_of(member * M * K, ROW_ALIGN)
    pid_m, pid_k = grouped_tile(tl.program_id(0), tile_count(M, BLOCK_M), tile_count(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    rn = tl.arange(0, BLOCK_N)  # [BN]
    m_ok = rm < M
    k_ok = rk < K
    dz_rows = tl.multiple_of(row_offsets(rm, dz_inner, stride_dz_outer, stride_dz_inner, DZ_TWO_ROW_DIMS),
                             ROW_ALIGN)
    dz_base = dz_ptr + dz_rows[:, None]  # [BM, 1]
    w_base = w_ptr + rk.to(tl.int64)[None, :] * stride_wk  # [1, BK]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n in range(0, tile_count(N, BLOCK_N)):
        nn = (n * BLOCK_N + rn).to(tl.int64)  # [BN], int64 as in the forward
        dz_ptrs = dz_base + nn[None, :] * stride_dzn  # [BM, BN]
        w_ptrs = w_base + tl.multiple_of(nn * stride_wn, ROW_ALIGN)[:, None]  # [BN, BK]
        if EVEN_N:
            dz = tl.load(dz_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        else:
            n_ok = nn < N
            dz = tl.load(dz_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dz.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    out = tl.multiple_of(rm.to(tl.int64) * K, ROW_ALIGN)[:, None] + rk[None, :]
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@tuned
@triton.autotune(
    configs=configs("BLOCK_N", "BLOCK_K", "BLOCK_M"),
    key=["M_BUCKET", "N", "K", "DOT_PRECISION", "ROW_ALIGN"],
    prune_configs_by={"early_config_prune": pruner("BLOCK_N", "BLOCK_K", "BLOCK_M", "N", "dz_ptr",
                                                   lambda args: 1)},
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "dz_inner", "x_inner", "SPLIT_ROWS"])
def dense_grad_weight_kernel(
    dz_ptr, dz_inner, stride_dz_outer, stride_dz_inner, stride_dzn,
    x_ptr, x_inner, stride_x_outer, stride_x_inner, stride_xk,
    dw_ptr,  # (splits, N, K) contiguous: dW, or each split's partial sums of it
    M, N, K,
    SPLIT_ROWS,  # rows each split reduces (grid axis 1)
    M_BUCKET,  # autotuning key only: SPLIT_ROWS bucketed
    DZ_TWO_ROW_DIMS: tl.constexpr, X_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr, WIDE_ROWS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # dW = dz^T @ x: output tiles of (N, K), reduction over the split's rows of M.
    pid_n, pid_k = grouped_tile(tl.program_id(0), tile_count(N, BLOCK_N), tile_count(K, BLOCK_K), GROUP_M)
    split = tl.program_id(1)
    start = block_start(split, SPLIT_ROWS, WIDE_ROWS)
    end = tl.minimum(start + SPLIT_ROWS, M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    rm = tl.arange(0, BLOCK_M)  # [BM]
    n_ok = rn < N
    k_ok = rk < K
    rn64 = rn.to(tl.int64)  # column offsets in int64: dz or x may be column-major and huge
    rk64 = rk.to(tl.int64)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + rm
        m_ok = rows < end
        dz_rows = tl.multiple_of(
            row_offsets(rows, dz_inner, stride_dz_outer, stride_dz_inner, DZ_TWO_ROW_DIMS), ROW_ALIGN)
        dz = tl.load(dz_ptr + dz_rows[:, None] + rn64[None, :] * stride_dzn, mask=m_ok[:, None] & n_ok[None, :],
                     other=0.0)  # [BM, BN]
        x_rows = tl.multiple_of(
            row_offsets(rows, x_inner, stride_x_outer, stride_x_inner, X_TWO_ROW_DIMS), ROW_ALIGN)
        x = tl.load(x_ptr + x_rows[:, None] + rk64[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BM, BK]
        acc = tl.dot(tl.trans(dz.to(DOT_DTYPE)), x.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)

    out = tl.multiple_of(split.to(tl.int64) * N * K + rn64 * K, ROW_ALIGN)[:, None] + rk[None, :]
    tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@triton.jit(do_not_specialize=["M", "dy_inner", "CHUNK_ROWS"])
def dense_grad_preactivation_kernel(
    dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn,
    g_ptr,  # (M, N) contiguous: the output y or act'(z), per GRAD_FROM
    dz_ptr,  # (M, N) contiguous: receives dz when WRITE_DZ
    sums_ptr,  # (chunks, N): receives each chunk's column sums of dz when SUMS
    M, N, CHUNK_ROWS,
    DY_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    ACC_DTYPE: tl.constexpr, ACT: tl.constexpr, GRAD_FROM: tl.constexpr, WIDE_ROWS: tl.constexpr,
    WRITE_DZ: tl.constexpr, SUMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (chunk of CHUNK_ROWS rows, BLOCK_N columns), column blocks fastest: neighbouring
    # programs stream neighbouring columns of the same rows.
    pid = tl.program_id(0)
    column_blocks = tile_count(N, BLOCK_N)
    chunk = pid // column_blocks
    rn = (pid % column_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    start = block_start(chunk, CHUNK_ROWS, WIDE_ROWS)
    sums = activations.dz_rows(dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn, g_ptr, dz_ptr, rn,
                               start, tl.minimum(start + CHUNK_ROWS, M), N, DY_TWO_ROW_DIMS, ROW_ALIGN, ACC_DTYPE,
                               ACT, GRAD_FROM, WRITE_DZ, BLOCK_M)
    if SUMS:
        tl.store(sums_ptr + chunk.to(tl.int64) * N + rn, sums.to(sums_ptr.dtype.element_ty), mask=rn < N)


def forward(x: Rows, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
            negative_slope: float, save_derivative: bool, out_shape: tuple[int, ...] | None = None,
            members: int = 0, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = act(x W^T + b), and act'(z) as an (M, N) tensor when save_derivative, else None.

    x: Rows of (M, K); weight (N, K); bias (N,) or None (of weight's dtype, or the accumulator's). y is
    contiguous, of shape out_shape (any shape of M * N elements whose last dim is N; default (M, N)), in
    out_dtype (default weight's: a sum that more terms join later, as the RNN's projection, is kept in the
    accumulator's dtype to be rounded once). members E > 0 (see the module docstring): weight (E, N, K),
    bias (E, N), x E members' rows, at one row stride.
    """
    n, k = weight.shape[-2:]
    y = empty(out_shape or (x.m, n), device=weight.device, dtype=out_dtype or weight.dtype)
    g = empty((x.m, n), device=weight.device, dtype=weight.dtype) if save_derivative else None
    if x.m == 0 or n == 0:
        return y, g
    weight, bias, rows = _members_operands(x, weight, bias, members)
    with launch("dense_forward_kernel", weight.device):
        dense_forward_kernel[tile_grid(rows, n, "BLOCK_M", "BLOCK_N", max(members, 1))](
            *x.args(),
            weight, weight.stride(-2), weight.stride(-1),
            bias if bias is not None else weight, bias.stride(-1) if bias is not None else 0,
            y, g if g is not None else y,
            rows, n, k, size_bucket(rows),
            X_TWO_ROW_DIMS=x.two_row_dims, ROW_ALIGN=row_alignment(*x.row_strides, weight.stride(-2), n),
            **dot_constants(weight.dtype), **activations.forward_constants(activation, negative_slope),
            HAS_BIAS=bias is not None, SAVE_DERIVATIVE=save_derivative, MEMBERS=members > 0, GROUP_M=GROUP_SIZE,
        )
    return y, g


def _members_operands(x: Rows, weight: torch.Tensor, bias: torch.Tensor | None, members: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(weight, bias, rows a launch's program covers): as given without members; with them, each member's
    weight and bias packed one after another, and a member's rows."""
    if not members:
        return weight, bias, x.m
    if (x.two_row_dims or weight.shape[0] != members or x.m % members
            or (bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]))):
        raise ValueError(f"gpunn dense: {members} members take an (E, N, K) weight, an (E, N) bias and E members' "
                         f"rows at one row stride")
    return _packed(weight), _packed(bias) if bias is not None else None, x.m // members


def _packed(tensor: torch.Tensor) -> torch.Tensor:
    """tensor with a contiguous tensor's strides, its size-1 dims' included (the kernels step from member to
    member by them; is_contiguous() ignores those), copied only where they differ."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= size
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def grad_preactivation(dy: Rows, saved: torch.Tensor | None, activation: str | None, write_dz: bool,
                       bias_grad: bool, groups: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dz, db): dz = dy * act'(z) as an (M, N) contiguous tensor of dy's dtype when write_dz, and db (N,),
    the column sums of dz (of its values before they are rounded to dz's dtype), when bias_grad; each None
    where not asked for. groups > 0: db (groups, N), each of `groups` equal groups of consecutive rows
    summed apart (per-sample gradients).

    dy: Rows of (M, N); saved: what forward saved for this activation ((M, N) contiguous, or None).
    One pass reads dy and the saved tensor and writes dz; the gradient GEMMs then take dz as a plain
    operand. Rows are cut into chunks (row_chunks, a function of the shape; with groups, one chunk a group);
    db: each chunk's column sums are added in row order, then, over several chunks, a second launch adds the
    chunks' sums in order: deterministic.
    """
    tensor = dy.tensor
    n = tensor.shape[-1]
    like = dict(device=tensor.device, dtype=tensor.dtype)
    dz = empty((dy.m, n), **like) if write_dz else None
    db = empty(grouped(groups, (n,)), **like) if bias_grad else None
    if (dz is None and db is None) or n == 0:
        return dz, db
    if groups:  # each group's sums are its db row
        _preactivation_pass(dy, saved, dz, db, activation, group_rows(dy.m, groups), groups)
        return dz, db
    chunk_rows, chunks = row_chunks(dy.m, n, db is not None)
    sums = chunk_sums(db, chunks)
    _preactivation_pass(dy, saved, dz, sums, activation, chunk_rows, chunks)
    add_chunk_sums(sums, db)
    return dz, db


def grad_bias(dz: Rows, groups: int = 0) -> torch.Tensor:
    """db (N,) = the column sums of dz, Rows of (M, N) (the pass with no activation, nothing written but db);
    (groups, N) for groups > 0, as grad_preactivation's."""
    return grad_preactivation(dz, None, None, False, True, groups)[1]


def row_chunks(m: int, n: int, sums: bool, tile: tuple[int, int, int] = PREACTIVATION_TILE) -> tuple[int, int]:
    """(rows a chunk, chunks) of grad_preactivation's pass over an (m, n) gradient: whole tiles of rows, and
    enough chunks that with the column blocks they make about PREACTIVATION_PROGRAMS programs (a narrow
    layer's few column blocks would otherwise leave each program a long serial loop). Where the pass sums
    db (sums), more than one chunk costs a second launch, so up to PREACTIVATION_CHUNK_TILES row tiles stay
    one chunk: a short loop costs less than a launch."""
    rows, cols, _ = tile
    row_tiles = max(cdiv(m, rows), 1)
    if sums and row_tiles <= PREACTIVATION_CHUNK_TILES:
        return row_tiles * rows, 1
    tiles_a_chunk = cdiv(row_tiles, min(row_tiles, max(PREACTIVATION_PROGRAMS // cdiv(n, cols), 1)))
    return tiles_a_chunk * rows, cdiv(row_tiles, tiles_a_chunk)


def chunk_sums(out: torch.Tensor | None, chunks: int) -> torch.Tensor | None:
    """Where a pass over `chunks` row chunks writes the column sums meant for out ((N,), or None for none):
    out itself for one chunk, else fp32 (fp64) partial sums (chunks, N), one row a chunk, that add_chunk_sums
    then adds in order (a second launch)."""
    if out is None or chunks == 1:
        return out
    return empty((chunks, out.shape[-1]), device=out.device, dtype=state_dtype(out.dtype))


def add_chunk_sums(sums: torch.Tensor | None, out: torch.Tensor | None) -> None:
    """out = the column sums of chunk_sums' partials (nothing to do where they were written to out itself)."""
    if sums is not None and sums is not out:
        add_partial_sums(sums, out)


def _preactivation_pass(dy: Rows, saved: torch.Tensor | None, dz: torch.Tensor | None, sums: torch.Tensor | None,
                        activation: str | None, chunk_rows: int, chunks: int) -> None:
    tensor = dy.tensor
    n = tensor.shape[-1]
    rows, cols, warps = PREACTIVATION_TILE
    with launch("dense_grad_preactivation_kernel", tensor.device):
        dense_grad_preactivation_kernel[(chunks * cdiv(n, cols),)](
            *dy.args(), saved if saved is not None else tensor, dz if dz is not None else tensor,
            sums if sums is not None else tensor,
            dy.m, n, chunk_rows,
            DY_TWO_ROW_DIMS=dy.two_row_dims, ROW_ALIGN=row_alignment(*dy.row_strides, n),
            ACC_DTYPE=accumulator_dtype(tensor.dtype), **activations.backward_constants(activation),
            WIDE_ROWS=wide_rows(dy.m, chunk_rows),
            WRITE_DZ=dz is not None, SUMS=sums is not None, BLOCK_M=rows, BLOCK_N=cols, num_warps=warps,
        )


def add_partial_sums(partials: torch.Tensor, out: torch.Tensor) -> None:
    """out (C,) = the column sums of partials ((R, C) contiguous, fp32 or fp64), added in row order and
    rounded once to out's dtype: the pass, with no activation, over one chunk of R rows."""
    _preactivation_pass(Rows.of(partials), None, None, out, None, partials.shape[0], 1)


def grad_input(dz: Rows, weight: torch.Tensor, members: int = 0) -> torch.Tensor:
    """dx = dz @ W as an (M, K) tensor. dz: Rows of (M, N), the gradient at the pre-activation
    (grad_preactivation's dz, or dy itself without an activation). members as in forward."""
    n, k = weight.shape[-2:]
    dx = empty((dz.m, k), device=weight.device, dtype=weight.dtype)
    if dz.m == 0 or k == 0:
        return dx
    weight, _, rows = _members_operands(dz, weight, None, members)
    with launch("dense_grad_input_kernel", weight.device):
        dense_grad_input_kernel[tile_grid(rows, k, "BLOCK_M", "BLOCK_K", max(members, 1))](
            *dz.args(),
            weight, weight.stride(-2), weight.stride(-1),
            dx,
            rows, n, k, size_bucket(rows),
            DZ_TWO_ROW_DIMS=dz.two_row_dims, ROW_ALIGN=row_alignment(*dz.row_strides, weight.stride(-2), n, k),
            **dot_constants(weight.dtype), MEMBERS=members > 0, GROUP_M=GROUP_SIZE,
        )
    return dx


def grad_weight(dz: Rows, x: Rows, weight_shape: tuple[int, int], groups: int = 0) -> torch.Tensor:
    """dW = dz^T @ x as an (N, K) tensor. dz: Rows of (M, N) as in grad_input; x: Rows of (M, K).
    groups > 0: dW (groups, N, K), one product for each of `groups` equal groups of consecutive rows
    (per-sample gradients), in one launch: the groups are the kernel's splits, each written as it is.

    Where (N, K) makes few output tiles and M is long (a narrow layer on a large batch, an RNN's weights
    over every step), the M rows split (weight_grad_splits, a function of the shape): each split's
    programs write fp32 (fp64) partial sums, and a second launch adds them in split order, so dW stays
    deterministic.
    """
    n, k = weight_shape
    tensor = dz.tensor
    dw = empty(grouped(groups, (n, k)), device=tensor.device, dtype=tensor.dtype)
    if n == 0 or k == 0:
        return dw
    split_rows, splits = (group_rows(dz.m, groups), groups) if groups else weight_grad_splits(dz.m, n, k)
    out = dw if groups or splits == 1 else empty((splits, n, k), device=tensor.device,
                                                 dtype=state_dtype(tensor.dtype))
    with launch("dense_grad_weight_kernel", tensor.device):
        dense_grad_weight_kernel[tile_grid(n, k, "BLOCK_N", "BLOCK_K", splits)](
            *dz.args(), *x.args(), out,
            dz.m, n, k, split_rows, size_bucket(split_rows),
            DZ_TWO_ROW_DIMS=dz.two_row_dims, X_TWO_ROW_DIMS=x.two_row_dims,
            ROW_ALIGN=row_alignment(*dz.row_strides, *x.row_strides, n, k), WIDE_ROWS=wide_rows(dz.m, split_rows),
            **dot_constants(tensor.dtype), GROUP_M=GROUP_SIZE,
        )
    if out is not dw:
        add_partial_sums(out.view(splits, n * k), dw.view(n * k))
    return dw


def weight_grad_splits(m: int, n: int, k: int) -> tuple[int, int]:
    """(rows a split, splits) of grad_weight's reduction over m rows for an (n, k) weight.

    Only an output of fewer tiles (counted at WEIGHT_GRAD_TILE) than half of WEIGHT_GRAD_PROGRAMS splits:
    into enough splits that with the tiles they make about WEIGHT_GRAD_PROGRAMS programs, none of fewer
    than WEIGHT_GRAD_SPLIT_ROWS rows nor of fewer rows than keep the fp32 partials' traffic (written and
    read, 8 n k bytes a split) within the bf16 rows' it reads (2 (n + k) bytes a row). Each split is a whole
    number of the largest row block the kernel tunes, so that only the last split's last block is partial.
    """
    rows, cols = WEIGHT_GRAD_TILE
    tiles = cdiv(n, rows) * cdiv(k, cols)
    if n == 0 or k == 0 or 2 * tiles > WEIGHT_GRAD_PROGRAMS:
        return m, 1
    fewest_rows = max(WEIGHT_GRAD_SPLIT_ROWS, cdiv(4 * n * k, n + k))
    splits = min(cdiv(WEIGHT_GRAD_PROGRAMS, tiles), m // fewest_rows)
    if splits <= 1:
        return m, 1
    split_rows = cdiv(cdiv(m, splits), LARGEST_REDUCTION_BLOCK) * LARGEST_REDUCTION_BLOCK
    return split_rows, cdiv(m, split_rows)
