"""The masked (block-sparse) dense layer y = act(x (W * mask)^T + b): forward, input-gradient and
weight-gradient kernels that visit only the weight blocks a BlockLayout lists, and their launchers.

Shapes as in dense.py: x (M, K) described by runtime.Rows, W (N, K), mask (N, K), b (N,), y (M, N)
contiguous. The weight block (BLOCK_N x BLOCK_K) is the layout's; only the batch tile is tuned.

Masked-out weights are never read: a full block loads as a dense tile; a partial block loads its weights
under the connection mask (FlexAttention's split of full and partial blocks), so NaN or Inf there cannot
reach any result. The weight gradient is exactly zero at masked positions and in unlisted blocks.

Memory traffic per launch, with v = visited blocks / dense blocks (layout.visited_blocks / dense_blocks):
- forward:      reads about v of x per output block row (the columns its blocks touch), v of W, writes y
                (M N) and act'(z) when backward needs it. Every output element is written: a row of
                blocks with no connection stores act(bias).
- grad_input:   reads dz (dy and the saved tensor) for the listed blocks and v of W, writes dx (M K); an
                input column no output reads gets zeros.
- grad_weight:  per listed block, a (BLOCK_N x BLOCK_K) slice of dz^T x over all M; writes all of dW (zeros
                outside the listed blocks), and db in the same launch (column sums of dz, own programs).
Accumulation and rounding as in dense.py; every reduction runs in one program in a fixed order, so results
are bitwise reproducible for a given config (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activations
from .layout import BlockLayout
from .runtime import (Rows, cdiv, dot_constants, empty, group_rows, grouped, launch,
                      row_alignment, size_bucket, wide_rows)
from .tiling import (GROUP_SIZE, as_wide_as, batch_configs, block_start, grouped_tile, pruner, row_offsets,
                     tile_count)
from .tuned import tuned


@triton.jit
def _load_weights(w_ptrs, mask_ptr, n2, k2, N, K, PARTIAL: tl.constexpr):
    """A weight tile at rows n2 and columns k2 (int64 index tensors that broadcast to the tile, in either
    orientation), zero outside the matrix and, in a partial block, wherever the mask is off: those
    weights are not loaded at all."""
    ok = (n2 < N) & (k2 < K)
    if PARTIAL:
        connected = tl.load(mask_ptr + n2 * K + k2, mask=ok, other=0).to(tl.int32)
        if w_ptrs.dtype.element_ty == tl.float64:
            # Triton 3.6 sizes an MMA operand's k-width by the narrowest load feeding it, this 8-bit mask
            # included, and its fp64 MMA lowering then fails. A reduce over a size-1 axis (no work) is
            # not followed by that search.
            connected = tl.max(connected[:, :, None], axis=2)
        ok = ok & (connected != 0)
    return tl.load(w_ptrs, mask=ok, other=0.0)


@triton.jit
def _forward_step(acc, x_base, stride_xk, m_ok, w_base, stride_wk, mask_ptr, rn64, kb, rk, N, K,
                  DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr):
    """acc += x[:, block kb] @ W[block row, block kb]^T."""
    kk = (as_wide_as(kb, K) * BLOCK_K + rk).to(tl.int64)  # [BK]
    x = tl.load(x_base + kk[None, :] * stride_xk, mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)  # [BM, BK]
    w = _load_weights(w_base + kk[:, None] * stride_wk, mask_ptr, rn64[None, :], kk[:, None], N, K, PARTIAL)
    return tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)


@tuned
@triton.autotune(
    configs=batch_configs("BLOCK_M"),
    key=["M_BUCKET", "N", "K", "BLOCK_N", "BLOCK_K", "DOT_PRECISION", "ROW_ALIGN", "SAVE_DERIVATIVE"],
    prune_configs_by={"early_config_prune": pruner("BLOCK_M", "BLOCK_N", "BLOCK_K", "M_BUCKET", "w_ptr",
                                                   lambda args: 1)},
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "x_inner"])
def masked_forward_kernel(
    x_ptr, x_inner, stride_x_outer, stride_x_inner, stride_xk,
    w_ptr, stride_wn, stride_wk,
    b_ptr, stride_b,
    y_ptr, g_ptr,  # (M, N) contiguous; g receives act'(z) when SAVE_DERIVATIVE
    mask_ptr, row_count_ptr, row_full_ptr, row_index_ptr,  # the layout's per-block-row lists
    M, N, K,
    M_BUCKET,  # autotuning key only
    X_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, ACT: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SAVE_DERIVATIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tile_count(M, BLOCK_M), tile_count(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    rn64 = rn.to(tl.int64)
    m_ok = rm < M
    x_rows = tl.multiple_of(row_offsets(rm, x_inner, stride_x_outer, stride_x_inner, X_TWO_ROW_DIMS), ROW_ALIGN)
    x_base = x_ptr + x_rows[:, None]  # [BM, 1]
    w_base = w_ptr + tl.multiple_of(rn64 * stride_wn, ROW_ALIGN)[None, :]  # [1, BN]

    listed = tl.load(row_count_ptr + pid_n)
    full = tl.load(row_full_ptr + pid_n)
    blocks = row_index_ptr + pid_n.to(tl.int64) * tile_count(K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for i in range(0, full):
        acc = _forward_step(acc, x_base, stride_xk, m_ok, w_base, stride_wk, mask_ptr, rn64, tl.load(blocks + i),
                            rk, N, K, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, BLOCK_K, False)
    for i in range(full, listed):
        acc = _forward_step(acc, x_base, stride_xk, m_ok, w_base, stride_wk, mask_ptr, rn64, tl.load(blocks + i),
                            rk, N, K, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, BLOCK_K, True)
    activations.epilogue(acc, rm, rn, M, N, b_ptr, stride_b, y_ptr, g_ptr, ACT, NEGATIVE_SLOPE, HAS_BIAS,
                         SAVE_DERIVATIVE, ROW_ALIGN)


@triton.jit
def _grad_input_step(acc, dy_base, stride_dyn, g_base, m_ok, w_base, stride_wn, mask_ptr, rk64, nb, rn, N, K,
                     DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                     ACT: tl.constexpr, GRAD_FROM: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr):
    """acc += dz[:, block nb] @ W[block nb, block column]."""
    nn = (as_wide_as(nb, N) * BLOCK_N + rn).to(tl.int64)  # [BN]
    dz = activations.load_dz(dy_base + nn[None, :] * stride_dyn, g_base + nn[None, :],
                             m_ok[:, None] & (nn < N)[None, :], ACC_DTYPE, DOT_DTYPE,
                             ACT, GRAD_FROM)  # [BM, BN]
    w = _load_weights(w_base + nn[:, None] * stride_wn, mask_ptr, nn[:, None], rk64[None, :], N, K, PARTIAL)
    return tl.dot(dz, w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)


@tuned
@triton.autotune(
    configs=batch_configs("BLOCK_M"),
    key=["M_BUCKET", "N", "K", "BLOCK_N", "BLOCK_K", "DOT_PRECISION", "ROW_ALIGN", "GRAD_FROM"],
    prune_configs_by={"early_config_prune": pruner("BLOCK_M", "BLOCK_K", "BLOCK_N", "M_BUCKET", "w_ptr",
                                                   activations.dz_tiles)},
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "dy_inner"])
def masked_grad_input_kernel(
    dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn,
    g_ptr,  # (M, N) contiguous: the output y or act'(z), per GRAD_FROM
    w_ptr, stride_wn, stride_wk,
    dx_ptr,  # (M, K) contiguous
    mask_ptr, col_count_ptr, col_full_ptr, col_index_ptr,  # the layout's per-block-column lists
    M, N, K,
    M_BUCKET,  # autotuning key only
    DY_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, ACT: tl.constexpr,
    GRAD_FROM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    # dx = dz @ (W * mask): output tiles of (M, K), reduction over the block rows listed for this column.
    pid_m, pid_k = grouped_tile(tl.program_id(0), tile_count(M, BLOCK_M), tile_count(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    rn = tl.arange(0, BLOCK_N)  # [BN]
    rk64 = rk.to(tl.int64)
    m_ok = rm < M
    dy_rows = tl.multiple_of(row_offsets(rm, dy_inner, stride_dy_outer, stride_dy_inner, DY_TWO_ROW_DIMS),
                             ROW_ALIGN)
    dy_base = dy_ptr + dy_rows[:, None]  # [BM, 1]
    g_base = g_ptr + tl.multiple_of(rm.to(tl.int64) * N, ROW_ALIGN)[:, None]  # [BM, 1]
    w_base = w_ptr + rk64[None, :] * stride_wk  # [1, BK]

    listed = tl.load(col_count_ptr + pid_k)
    full = tl.load(col_full_ptr + pid_k)
    blocks = col_index_ptr + pid_k.to(tl.int64) * tile_count(N, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for i in range(0, full):
        acc = _grad_input_step(acc, dy_base, stride_dyn, g_base, m_ok, w_base, stride_wn, mask_ptr, rk64,
                               tl.load(blocks + i), rn, N, K, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE,
                               ACT, GRAD_FROM, BLOCK_N, False)
    for i in range(full, listed):
        acc = _grad_input_step(acc, dy_base, stride_dyn, g_base, m_ok, w_base, stride_wn, mask_ptr, rk64,
                               tl.load(blocks + i), rn, N, K, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE,
                               ACT, GRAD_FROM, BLOCK_N, True)
    out = tl.multiple_of(rm.to(tl.int64) * K, ROW_ALIGN)[:, None] + rk[None, :]
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & (rk < K)[None, :])


@tuned
@triton.autotune(
    configs=batch_configs("BLOCK_M"),
    key=["M_BUCKET", "N", "K", "BLOCK_N", "BLOCK_K", "DOT_PRECISION", "ROW_ALIGN", "GRAD_FROM"],
    prune_configs_by={"early_config_prune": pruner("BLOCK_N", "BLOCK_K", "BLOCK_M", "N", "dy_ptr",
                                                   activations.dz_tiles)},
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "dy_inner", "x_inner", "GROUP_ROWS", "BIAS_PROGRAMS",
                               "FULL_BLOCKS", "VISITED_BLOCKS"])
def masked_grad_weight_kernel(
    dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn,
    g_ptr,  # (M, N) contiguous: the output y or act'(z), per GRAD_FROM
    x_ptr, x_inner, stride_x_outer, stride_x_inner, stride_xk,
    dw_ptr,  # (groups, N, K) contiguous
    db_ptr,  # (groups, N)
    mask_ptr, block_order_ptr,  # the layout's blocks: full, partial, then empty
    M, N, K,
    GROUP_ROWS,  # rows each group (grid axis 1) sums: M, or a sample's for per-sample gradients
    M_BUCKET,  # autotuning key only
    BIAS_PROGRAMS,  # the first programs: db for BLOCK_N columns each (0 when db is not asked for)
    FULL_BLOCKS, VISITED_BLOCKS,
    DY_TWO_ROW_DIMS: tl.constexpr, X_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    GROUPED: tl.constexpr, WIDE_ROWS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, ACT: tl.constexpr,
    GRAD_FROM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # dW = (dz^T @ x) * mask, one program per weight block; db = column sums of dz in programs of their own
    # at the front of the grid (a sum inside the dW loop keeps the dz tile in registers: bench/NOTES.md).
    # GROUPED (per-sample gradients): grid axis 1 picks a group of GROUP_ROWS rows and its dW and db. A
    # constexpr, and the group's outputs reached by moving the pointers, so that the plain layer's code is
    # untouched: the group's bounds and offsets at run time cost it up to 90 registers (352 B spilled at a
    # 64x64x256 tile in the sm_90 compile report), and under Triton 3.6 a zero group offset inside the dW
    # store's tl.multiple_of dropped the hint with the folded add (unvectorized stores, 62 -> 95 registers).
    pid = tl.program_id(0)
    if GROUPED:
        group = tl.program_id(1).to(tl.int64)
        start = block_start(tl.program_id(1), GROUP_ROWS, WIDE_ROWS)
        end = tl.minimum(start + GROUP_ROWS, M)
        dw_ptr += tl.multiple_of(group * N * K, ROW_ALIGN)  # keeps the dW store's alignment hint (K's)
        db_ptr += group * N
    else:
        start = 0
        end = M
    if pid < BIAS_PROGRAMS:
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        db = activations.bias_gradient(dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn, g_ptr, rn,
                                       start, end, N, DY_TWO_ROW_DIMS, ROW_ALIGN, ACC_DTYPE, ACT, GRAD_FROM, BLOCK_M)
        tl.store(db_ptr + rn, db.to(db_ptr.dtype.element_ty), mask=rn < N)
    else:
        item = pid - BIAS_PROGRAMS
        block = tl.load(block_order_ptr + item)
        columns = tile_count(K, BLOCK_K)
        rn64 = (as_wide_as(block // columns, N) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
        rk64 = (as_wide_as(block % columns, K) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # [BK]
        rm = tl.arange(0, BLOCK_M)  # [BM]
        n_ok = rn64 < N
        k_ok = rk64 < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
        if item < VISITED_BLOCKS:
            for m0 in range(start, end, BLOCK_M):
                rows = m0 + rm
                m_ok = rows < end
                dy_rows = tl.multiple_of(
                    row_offsets(rows, dy_inner, stride_dy_outer, stride_dy_inner, DY_TWO_ROW_DIMS), ROW_ALIGN)
                g_rows = tl.multiple_of(rows.to(tl.int64) * N, ROW_ALIGN)
                dz = activations.load_dz(dy_ptr + dy_rows[:, None] + rn64[None, :] * stride_dyn,
                                         g_ptr + g_rows[:, None] + rn64[None, :], m_ok[:, None] & n_ok[None, :],
                                         ACC_DTYPE, DOT_DTYPE, ACT, GRAD_FROM)  # [BM, BN]
                x_rows = tl.multiple_of(
                    row_offsets(rows, x_inner, stride_x_outer, stride_x_inner, X_TWO_ROW_DIMS), ROW_ALIGN)
                x = tl.load(x_ptr + x_rows[:, None] + rk64[None, :] * stride_xk,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
                acc = tl.dot(tl.trans(dz), x.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                             out_dtype=ACC_DTYPE)
            if item >= FULL_BLOCKS:
                # Exact zeros at masked positions (the product there is not part of the gradient).
                ok = n_ok[:, None] & k_ok[None, :]
                connected = tl.load(mask_ptr + rn64[:, None] * K + rk64[None, :], mask=ok, other=0) != 0
                acc = tl.where(connected, acc, 0.0)
        out = tl.multiple_of(rn64 * K, ROW_ALIGN)[:, None] + rk64[None, :]
        tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def _check(layout: BlockLayout, shape, device: torch.device) -> None:
    # gpunn.functional validates user input; this guards the launchers' own contract.
    if layout.shape != tuple(shape) or layout.device != device:
        raise ValueError(f"{layout} does not describe a weight of shape {tuple(shape)} on {device}")


def forward(x: Rows, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
            negative_slope: float, save_derivative: bool, out_shape: tuple[int, ...] | None = None, *,
            layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = act(x (W * mask)^T + b), and act'(z) as an (M, N) tensor when save_derivative, else None.

    x: Rows of (M, K); weight (N, K); bias (N,) or None; layout: the mask's BlockLayout on weight's device.
    y is contiguous, of shape out_shape (default (M, N)).
    """
    _check(layout, weight.shape, weight.device)
    n, k = weight.shape
    y = empty(out_shape or (x.m, n), device=weight.device, dtype=weight.dtype)
    g = empty((x.m, n), device=weight.device, dtype=weight.dtype) if save_derivative else None
    if x.m == 0 or n == 0:
        return y, g
    block_n, block_k = layout.block
    with launch("masked_forward_kernel", weight.device, (layout.visited_blocks, layout.dense_blocks)):
        masked_forward_kernel[lambda meta: (cdiv(x.m, meta["BLOCK_M"]) * layout.grid[0],)](
            *x.args(),
            weight, weight.stride(0), weight.stride(1),
            bias if bias is not None else weight, bias.stride(0) if bias is not None else 0,
            y, g if g is not None else y,
            layout.mask, layout.row_count, layout.row_full, layout.row_index,
            x.m, n, k, size_bucket(x.m),
            X_TWO_ROW_DIMS=x.two_row_dims, ROW_ALIGN=row_alignment(*x.row_strides, weight.stride(0), n),
            **dot_constants(weight.dtype), **activations.forward_constants(activation, negative_slope),
            HAS_BIAS=bias is not None, SAVE_DERIVATIVE=save_derivative, BLOCK_N=block_n, BLOCK_K=block_k,
            GROUP_M=GROUP_SIZE,
        )
    return y, g


def grad_input(dy: Rows, saved: torch.Tensor | None, weight: torch.Tensor, activation: str | None, *,
               layout: BlockLayout) -> torch.Tensor:
    """dx = (dy * act'(z)) @ (W * mask) as an (M, K) tensor.

    dy: Rows of (M, N); saved: what forward saved for this activation ((M, N) contiguous, or None).
    """
    _check(layout, weight.shape, weight.device)
    n, k = weight.shape
    dx = empty((dy.m, k), device=weight.device, dtype=weight.dtype)
    if dy.m == 0 or k == 0:
        return dx
    block_n, block_k = layout.block
    with launch("masked_grad_input_kernel", weight.device, (layout.visited_blocks, layout.dense_blocks)):
        masked_grad_input_kernel[lambda meta: (cdiv(dy.m, meta["BLOCK_M"]) * layout.grid[1],)](
            *dy.args(),
            saved if saved is not None else dy.tensor,
            weight, weight.stride(0), weight.stride(1),
            dx,
            layout.mask, layout.col_count, layout.col_full, layout.col_index,
            dy.m, n, k, size_bucket(dy.m),
            DY_TWO_ROW_DIMS=dy.two_row_dims, ROW_ALIGN=row_alignment(*dy.row_strides, weight.stride(0), n, k),
            **dot_constants(weight.dtype), **activations.backward_constants(activation),
            BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_SIZE,
        )
    return dx


def grad_weight(dy: Rows, saved: torch.Tensor | None, x: Rows | None, weight_shape: tuple[int, int],
                activation: str | None, bias_grad: bool, groups: int = 0, *, layout: BlockLayout
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dW, db) = ((dz^T @ x) * mask, sum of dz over rows), in one launch: dW (N, K) when x is given
    (exact zeros at masked positions), db (N,) when bias_grad; each None where not asked for. groups > 0:
    dW (groups, N, K) and db (groups, N), each of `groups` equal groups of consecutive rows summed apart
    (per-sample gradients), on a second grid axis.

    dy: Rows of (M, N); x: Rows of (M, K) or None; saved as in grad_input.
    """
    _check(layout, weight_shape, dy.tensor.device)
    n, k = weight_shape
    like = dict(device=dy.tensor.device, dtype=dy.tensor.dtype)
    dw = empty(grouped(groups, (n, k)), **like) if x is not None else None
    db = empty(grouped(groups, (n,)), **like) if bias_grad else None
    bias_programs = layout.grid[0] if db is not None else 0
    block_programs = layout.dense_blocks if dw is not None else 0
    if bias_programs + block_programs == 0:
        return dw, db
    block_n, block_k = layout.block
    x = x or dy  # without dW no block program runs; the x arguments are then never read
    visited = layout.visited_blocks if dw is not None else 0
    copies, rows = max(groups, 1), group_rows(dy.m, groups)
    with launch("masked_grad_weight_kernel", dy.tensor.device, (visited * copies, block_programs * copies)):
        masked_grad_weight_kernel[(bias_programs + block_programs, copies)](
            *dy.args(), saved if saved is not None else dy.tensor, *x.args(),
            dw if dw is not None else dy.tensor, db if db is not None else dy.tensor,
            layout.mask, layout.block_order,
            dy.m, n, k, rows, size_bucket(rows), bias_programs, layout.full_blocks,
            layout.visited_blocks,
            DY_TWO_ROW_DIMS=dy.two_row_dims, X_TWO_ROW_DIMS=x.two_row_dims,
            ROW_ALIGN=row_alignment(*dy.row_strides, *x.row_strides, n, k), GROUPED=groups > 0,
            WIDE_ROWS=groups > 0 and wide_rows(dy.m, rows),
            **dot_constants(dy.tensor.dtype), **activations.backward_constants(activation),
            BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return dw, db
