"""The fused dense layer y = act(x W^T + b): forward, input-gradient and weight-gradient kernels and
their launchers.

Shapes: x (M, K) described by runtime.Rows (any leading dims, any strides), W (N, K), b (N,),
y (M, N) contiguous. dz = dy * act'(z) is never written to memory: each gradient kernel forms it in
registers from dy and the tensor forward saved (see activations.py). (Writing it once from the input-
gradient kernel for the weight gradient was measured on an H100 and lost: bench/NOTES.md.)

Memory traffic, the least each launch must move (tiles of the other operand are re-read from L2;
grouped tile order keeps a band of them there):
- forward:      reads x (M K) and W (N K), writes y (M N), plus act'(z) (M N) when backward needs it.
- grad_input:   reads dy, the saved tensor (M N each) and W (N K), writes dx (M K).
- grad_weight:  reads dy, the saved tensor and x, writes dW (N K).
- grad_bias:    reads dy and the saved tensor once more, writes db (N): a separate pass (see the kernel).
Operands enter tl.dot in their own dtype (runtime.dot_dtype: bf16 is widened only under the
interpreter, which cannot multiply bf16); accumulation is fp32 (fp64 for fp64 inputs); every output is
rounded once, at its store. Reductions run inside one program in a fixed order: results are bitwise
reproducible for a given config (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activations
from .runtime import Rows, accumulator_dtype, cdiv, dot_dtype, dot_precision, empty, launch, row_alignment, size_bucket
from .tiling import BIAS_TILE, GROUP_SIZE, configs, grouped_tile, pruner, row_offsets
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
    HAS_BIAS: tl.constexpr, SAVE_DERIVATIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
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
    for k in range(0, tl.cdiv(K, BLOCK_K)):
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
    key=["M_BUCKET", "N", "K", "DOT_PRECISION", "ROW_ALIGN", "GRAD_FROM"],
    prune_configs_by={"early_config_prune": pruner("BLOCK_M", "BLOCK_K", "BLOCK_N", "M_BUCKET", "w_ptr",
                                                   activations.dz_tiles)},
)
@triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=["M", "M_BUCKET", "dy_inner"])
def dense_grad_input_kernel(
    dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn,
    g_ptr,  # (M, N) contiguous: the output y or act'(z), per GRAD_FROM
    w_ptr, stride_wn, stride_wk,
    dx_ptr,  # (M, K) contiguous
    M, N, K,
    M_BUCKET,  # autotuning key only
    DY_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, ACT: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
    GRAD_FROM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    # dx = dz @ W: output tiles of (M, K), reduction over N.
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    rn = tl.arange(0, BLOCK_N)  # [BN]
    m_ok = rm < M
    k_ok = rk < K
    dy_rows = tl.multiple_of(row_offsets(rm, dy_inner, stride_dy_outer, stride_dy_inner, DY_TWO_ROW_DIMS),
                             ROW_ALIGN)
    g_rows = tl.multiple_of(rm.to(tl.int64) * N, ROW_ALIGN)
    dy_base = dy_ptr + dy_rows[:, None]  # [BM, 1]
    g_base = g_ptr + g_rows[:, None]  # [BM, 1]
    w_base = w_ptr + rk.to(tl.int64)[None, :] * stride_wk  # [1, BK]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        nn = (n * BLOCK_N + rn).to(tl.int64)  # [BN], int64 as in the forward
        dy_ptrs = dy_base + nn[None, :] * stride_dyn  # [BM, BN]
        g_ptrs = g_base + nn[None, :]  # [BM, BN]
        w_ptrs = w_base + tl.multiple_of(nn * stride_wn, ROW_ALIGN)[:, None]  # [BN, BK]
        if EVEN_N:
            dz = activations.load_dz(dy_ptrs, g_ptrs, m_ok[:, None], ACC_DTYPE, DOT_DTYPE,
                          ACT, GRAD_FROM, NEGATIVE_SLOPE)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        else:
            n_ok = nn < N
            dz = activations.load_dz(dy_ptrs, g_ptrs, m_ok[:, None] & n_ok[None, :], ACC_DTYPE, DOT_DTYPE,
                          ACT, GRAD_FROM, NEGATIVE_SLOPE)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dz, w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    out = tl.multiple_of(rm.to(tl.int64) * K, ROW_ALIGN)[:, None] + rk[None, :]
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@tuned
@triton.autotune(
    configs=configs("BLOCK_N", "BLOCK_K", "BLOCK_M"),
    key=["M_BUCKET", "N", "K", "DOT_PRECISION", "ROW_ALIGN", "GRAD_FROM"],
    prune_configs_by={"early_config_prune": pruner("BLOCK_N", "BLOCK_K", "BLOCK_M", "N", "dy_ptr",
                                                   activations.dz_tiles)},
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "dy_inner", "x_inner"])
def dense_grad_weight_kernel(
    dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn,
    g_ptr,  # (M, N) contiguous: the output y or act'(z), per GRAD_FROM
    x_ptr, x_inner, stride_x_outer, stride_x_inner, stride_xk,
    dw_ptr,  # (N, K) contiguous
    M, N, K,
    M_BUCKET,  # autotuning key only
    DY_TWO_ROW_DIMS: tl.constexpr, X_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, ACT: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
    GRAD_FROM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # dW = dz^T @ x: output tiles of (N, K), reduction over M.
    pid_n, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    rm = tl.arange(0, BLOCK_M)  # [BM]
    n_ok = rn < N
    k_ok = rk < K
    rn64 = rn.to(tl.int64)  # column offsets in int64: dy or x may be column-major and huge
    rk64 = rk.to(tl.int64)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + rm
        m_ok = rows < M
        dy_rows = tl.multiple_of(
            row_offsets(rows, dy_inner, stride_dy_outer, stride_dy_inner, DY_TWO_ROW_DIMS), ROW_ALIGN)
        g_rows = tl.multiple_of(rows.to(tl.int64) * N, ROW_ALIGN)
        dy_ptrs = dy_ptr + dy_rows[:, None] + rn64[None, :] * stride_dyn  # [BM, BN]
        g_ptrs = g_ptr + g_rows[:, None] + rn[None, :]  # [BM, BN]
        # dz in the operand dtype, as torch's backward has it: without an activation the dy tile goes to
        # the MMA as loaded (the H100 timing showed an fp32 round trip here costing more than the GEMM).
        dz = activations.load_dz(dy_ptrs, g_ptrs, m_ok[:, None] & n_ok[None, :], ACC_DTYPE, DOT_DTYPE,
                      ACT, GRAD_FROM, NEGATIVE_SLOPE)  # [BM, BN]
        x_rows = tl.multiple_of(
            row_offsets(rows, x_inner, stride_x_outer, stride_x_inner, X_TWO_ROW_DIMS), ROW_ALIGN)
        x_ptrs = x_ptr + x_rows[:, None] + rk64[None, :] * stride_xk  # [BM, BK]
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dz), x.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    out = tl.multiple_of(rn64 * K, ROW_ALIGN)[:, None] + rk[None, :]
    tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@triton.jit(do_not_specialize=["M", "dy_inner"])
def dense_grad_bias_kernel(
    dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn,
    g_ptr,  # (M, N) contiguous: the output y or act'(z), per GRAD_FROM
    db_ptr,  # (N,)
    M, N,
    DY_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    ACC_DTYPE: tl.constexpr, ACT: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, GRAD_FROM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # db = column sums of dz, one program per BLOCK_N columns.
    # A pass of its own: summed inside the dW GEMM, the dz tile had to live in registers and the H100
    # timing showed the GEMM 2.3x slower; this pass reads dy (and the saved tensor) once more instead.
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    db = activations.bias_gradient(dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn, g_ptr, rn, M, N,
                                   DY_TWO_ROW_DIMS, ROW_ALIGN, ACC_DTYPE, ACT, NEGATIVE_SLOPE, GRAD_FROM, BLOCK_M)
    tl.store(db_ptr + rn, db.to(db_ptr.dtype.element_ty), mask=rn < N)


def _grid(rows: int, cols: int, rows_block: str, cols_block: str):
    return lambda meta: (cdiv(rows, meta[rows_block]) * cdiv(cols, meta[cols_block]),)


def forward(x: Rows, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
            negative_slope: float, save_derivative: bool, out_shape: tuple[int, ...] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = act(x W^T + b), and act'(z) as an (M, N) tensor when save_derivative, else None.

    x: Rows of (M, K); weight (N, K); bias (N,) or None. y is contiguous, of shape out_shape (any shape
    of M * N elements whose last dim is N; default (M, N)).
    """
    n, k = weight.shape
    y = empty(out_shape or (x.m, n), device=weight.device, dtype=weight.dtype)
    g = empty((x.m, n), device=weight.device, dtype=weight.dtype) if save_derivative else None
    if x.m == 0 or n == 0:
        return y, g
    with launch("dense_forward_kernel", weight.device):
        dense_forward_kernel[_grid(x.m, n, "BLOCK_M", "BLOCK_N")](
            *x.args(),
            weight, weight.stride(0), weight.stride(1),
            bias if bias is not None else weight, bias.stride(0) if bias is not None else 0,
            y, g if g is not None else y,
            x.m, n, k, size_bucket(x.m),
            X_TWO_ROW_DIMS=x.two_row_dims, ROW_ALIGN=row_alignment(*x.row_strides, weight.stride(0), n),
            DOT_DTYPE=dot_dtype(weight.dtype), ACC_DTYPE=accumulator_dtype(weight.dtype),
            ACT=activations.CODES[activation], NEGATIVE_SLOPE=float(negative_slope),
            HAS_BIAS=bias is not None, SAVE_DERIVATIVE=save_derivative,
            DOT_PRECISION=dot_precision(weight.dtype), GROUP_M=GROUP_SIZE,
        )
    return y, g


def grad_input(dy: Rows, saved: torch.Tensor | None, weight: torch.Tensor, activation: str | None,
               negative_slope: float) -> torch.Tensor:
    """dx = (dy * act'(z)) @ W as an (M, K) tensor.

    dy: Rows of (M, N); saved: what forward saved for this activation ((M, N) contiguous, or None).
    """
    n, k = weight.shape
    dx = empty((dy.m, k), device=weight.device, dtype=weight.dtype)
    if dy.m == 0 or k == 0:
        return dx
    with launch("dense_grad_input_kernel", weight.device):
        dense_grad_input_kernel[_grid(dy.m, k, "BLOCK_M", "BLOCK_K")](
            *dy.args(),
            saved if saved is not None else dy.tensor,
            weight, weight.stride(0), weight.stride(1),
            dx,
            dy.m, n, k, size_bucket(dy.m),
            DY_TWO_ROW_DIMS=dy.two_row_dims, ROW_ALIGN=row_alignment(*dy.row_strides, weight.stride(0), n, k),
            DOT_DTYPE=dot_dtype(weight.dtype), ACC_DTYPE=accumulator_dtype(weight.dtype),
            ACT=activations.CODES[activation], NEGATIVE_SLOPE=float(negative_slope),
            GRAD_FROM=activations.grad_source(activation, negative_slope),
            DOT_PRECISION=dot_precision(weight.dtype), GROUP_M=GROUP_SIZE,
        )
    return dx


def grad_weight(dy: Rows, saved: torch.Tensor | None, x: Rows | None, weight_shape: tuple[int, int],
                activation: str | None, negative_slope: float, bias_grad: bool
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dW, db) = (dz^T @ x, sum of dz over rows): dW (N, K) when x is given, db (N,) when bias_grad;
    each None where not asked for.

    dy: Rows of (M, N); x: Rows of (M, K) or None; saved as in grad_input.
    """
    n, k = weight_shape
    like = dict(device=dy.tensor.device, dtype=dy.tensor.dtype)
    dw = empty((n, k), **like) if x is not None else None
    db = empty((n,), **like) if bias_grad else None
    common = dict(ACC_DTYPE=accumulator_dtype(dy.tensor.dtype), ACT=activations.CODES[activation],
                  NEGATIVE_SLOPE=float(negative_slope), GRAD_FROM=activations.grad_source(activation, negative_slope))
    g = saved if saved is not None else dy.tensor
    if dw is not None and n > 0 and k > 0:
        with launch("dense_grad_weight_kernel", dy.tensor.device):
            dense_grad_weight_kernel[_grid(n, k, "BLOCK_N", "BLOCK_K")](
                *dy.args(), g, *x.args(), dw,
                dy.m, n, k, size_bucket(dy.m),
                DY_TWO_ROW_DIMS=dy.two_row_dims, X_TWO_ROW_DIMS=x.two_row_dims,
                ROW_ALIGN=row_alignment(*dy.row_strides, *x.row_strides, n, k),
                DOT_DTYPE=dot_dtype(dy.tensor.dtype), DOT_PRECISION=dot_precision(dy.tensor.dtype),
                GROUP_M=GROUP_SIZE, **common,
            )
    if db is not None and n > 0:
        rows, cols, _, _, warps = BIAS_TILE
        with launch("dense_grad_bias_kernel", dy.tensor.device):
            dense_grad_bias_kernel[(cdiv(n, cols),)](
                *dy.args(), g, db, dy.m, n,
                DY_TWO_ROW_DIMS=dy.two_row_dims, ROW_ALIGN=row_alignment(*dy.row_strides, n),
                BLOCK_M=rows, BLOCK_N=cols, num_warps=warps, **common,
            )
    return dw, db
