"""The dense and masked layers' double backward: the elementwise pass between their GEMMs, and its launcher.

First-order backward maps (dy, x, W, b) to dz = dy * act'(z), dx = dz W, dW = dz^T x and db = sum dz, with
z = x W^T + b. Given the gradients (g_dx, g_dW, g_db) of those, the chain rule through dz needs
    g_dz = g_dx W^T + x g_dW^T + g_db   (one GEMM: the forward kernel, with g_db as its bias)
and then, per element (this pass, one read of dy, g_dz and z):
    g_dy = g_dz * act'(z)               (dy's gradient)
    dz   = dy * act'(z)                 (for the terms dx and dW contribute directly: dz g_dW, dz^T g_dx)
    g_z  = g_dz * dy * act''(z)         (the gradient at z, which reaches x, W and b as in first order)
and g_b, the column sums of g_z. The layer's op (gpunn.ops.linear) runs the GEMMs around it (for the
masked layer, with W and g_dW under the mask). act' and act''
are evaluated from z (recomputed by a forward GEMM), so every activation takes the same path.

Forward mode through first-order backward (jacfwd(jacrev(f)), torch.func.hessian) takes the same pass: given
the tangents dy' and z' (as g_dz), dz's tangent is dz' = dy' * act'(z) + dy * act''(z) * z', which the pass
writes in g_z's place (dy' added to it, DY_TANGENT), with db' its column sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activations
from .dense import add_chunk_sums, chunk_sums, row_chunks
from .runtime import Rows, accumulator_dtype, cdiv, empty, launch, wide_rows
from .tiling import DOUBLE_BACKWARD_TILE, block_start, row_offsets, tile_count


@triton.jit(do_not_specialize=["M", "dy_inner", "gdz_inner", "dyt_inner", "CHUNK_ROWS"])
def dense_double_backward_kernel(
    dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn,
    gdz_ptr, gdz_inner, stride_gdz_outer, stride_gdz_inner, stride_gdzn,
    dyt_ptr, dyt_inner, stride_dyt_outer, stride_dyt_inner, stride_dytn,  # dy', read under DY_TANGENT
    z_ptr,  # (M, N) contiguous: the pre-activation, read unless ACT is none
    dz_ptr, gz_ptr, stride_out,  # (M, N) each, rows stride_out apart (two halves of one (M, 2N) buffer)
    gdy_ptr,  # (M, N) contiguous
    sums_ptr,  # (chunks, N): each chunk's column sums of g_z
    M, N, CHUNK_ROWS,
    DY_TWO_ROW_DIMS: tl.constexpr, GDZ_TWO_ROW_DIMS: tl.constexpr, DYT_TWO_ROW_DIMS: tl.constexpr,
    DY_TANGENT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ACT: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, HAS_GDZ: tl.constexpr, WIDE_ROWS: tl.constexpr,
    WRITE_GDY: tl.constexpr, WRITE_DZ: tl.constexpr, WRITE_GZ: tl.constexpr, SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Programs as in dense_grad_preactivation_kernel: (chunk of rows, column block), column blocks fastest.
    pid = tl.program_id(0)
    column_blocks = tile_count(N, BLOCK_N)
    chunk = pid // column_blocks
    rn = (pid % column_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rn64 = rn.to(tl.int64)
    n_ok = rn < N
    start = block_start(chunk, CHUNK_ROWS, WIDE_ROWS)
    end = tl.minimum(start + CHUNK_ROWS, M)
    sums = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)  # [BM]
        ok = (rows < end)[:, None] & n_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy_rows = row_offsets(rows, dy_inner, stride_dy_outer, stride_dy_inner, DY_TWO_ROW_DIMS)
        dy = tl.load(dy_ptr + dy_rows[:, None] + rn64[None, :] * stride_dyn, mask=ok, other=0.0).to(ACC_DTYPE)
        if HAS_GDZ:
            gdz_rows = row_offsets(rows, gdz_inner, stride_gdz_outer, stride_gdz_inner, GDZ_TWO_ROW_DIMS)
            gdz = tl.load(gdz_ptr + gdz_rows[:, None] + rn64[None, :] * stride_gdzn, mask=ok, other=0.0)
            gdz = gdz.to(ACC_DTYPE)
        else:
            gdz = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        if ACT == activations.NONE:
            z = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)  # act' = 1 and act'' = 0 whatever z is
        else:
            z = tl.load(z_ptr + rows64 * N + rn64[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
        act_prime = activations.derivative(z, ACT, NEGATIVE_SLOPE)
        if WRITE_GDY:
            gdy = activations.times_derivative(gdz, z, act_prime, ACT)
            tl.store(gdy_ptr + rows64 * N + rn64[None, :], gdy.to(gdy_ptr.dtype.element_ty), mask=ok)
        if WRITE_DZ:
            dz = activations.times_derivative(dy, z, act_prime, ACT)
            tl.store(dz_ptr + rows64 * stride_out + rn64[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)
        if WRITE_GZ:
            if ACT == activations.NONE or ACT == activations.RELU or ACT == activations.LEAKY_RELU:
                # act'' = 0: no term, as torch's graph has none (a product with 0 would make an infinite dy NaN).
                gz = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
            else:
                gz = gdz * dy * activations.second_derivative(z, ACT)
            if DY_TANGENT:
                dyt_rows = row_offsets(rows, dyt_inner, stride_dyt_outer, stride_dyt_inner, DYT_TWO_ROW_DIMS)
                dyt = tl.load(dyt_ptr + dyt_rows[:, None] + rn64[None, :] * stride_dytn, mask=ok, other=0.0)
                gz += activations.times_derivative(dyt.to(ACC_DTYPE), z, act_prime, ACT)
            tl.store(gz_ptr + rows64 * stride_out + rn64[None, :], gz.to(gz_ptr.dtype.element_ty), mask=ok)
            sums += tl.sum(gz, axis=0)
    if SUMS:
        tl.store(sums_ptr + chunk.to(tl.int64) * N + rn, sums.to(sums_ptr.dtype.element_ty), mask=n_ok)


def elementwise(dy: Rows, gdz: Rows | None, z: torch.Tensor | None, activation: str | None, negative_slope: float,
                write_gdy: bool, write_dz: bool, write_gz: bool, bias_grad: bool, dy_tangent: Rows | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The pass of the module docstring: (g_dy (M, N), dz (M, N), g_z (M, N), g_b (N,)).

    dy, gdz: Rows of (M, N) (gdz None for zero); z: (M, N) contiguous, or None without an activation.
    dy_tangent: Rows of (M, N), added to g_z times act'(z) (forward mode: g_z is then dz', see the module
    docstring), or None.
    Returns (g_dy, dz, g_z, g_b), each None where not asked for; g_b needs write_gz. When both dz and g_z
    are asked for they are the two halves of one (M, 2N) buffer (dz first), so that the GEMMs after the
    pass take [dz | g_z] as one operand.
    """
    tensor = dy.tensor
    n = tensor.shape[-1]
    like = dict(device=tensor.device, dtype=tensor.dtype)
    gdy = empty((dy.m, n), **like) if write_gdy else None
    pair = empty((dy.m, n * (write_dz + write_gz)), **like) if write_dz or write_gz else None
    dz = pair[:, :n] if write_dz else None
    gz = pair[:, pair.shape[1] - n:] if write_gz else None
    gb = empty((n,), **like) if bias_grad else None
    if (gdy is None and pair is None) or n == 0:
        return gdy, dz, gz, gb
    chunk_rows, chunks = row_chunks(dy.m, n, gb is not None, DOUBLE_BACKWARD_TILE)
    sums = chunk_sums(gb, chunks)
    gdz_args = gdz.args() if gdz is not None else (tensor, 1, 0, 0, 0)
    dyt_args = dy_tangent.args() if dy_tangent is not None else (tensor, 1, 0, 0, 0)
    rows, cols, warps = DOUBLE_BACKWARD_TILE
    with launch("dense_double_backward_kernel", tensor.device):
        dense_double_backward_kernel[(chunks * cdiv(n, cols),)](
            *dy.args(), *gdz_args, *dyt_args, z if z is not None else tensor,
            pair if pair is not None else tensor, pair[:, pair.shape[1] - n:] if pair is not None else tensor,
            pair.stride(0) if pair is not None else n,
            gdy if gdy is not None else tensor, sums if sums is not None else tensor,
            dy.m, n, chunk_rows,
            DY_TWO_ROW_DIMS=dy.two_row_dims, GDZ_TWO_ROW_DIMS=gdz is not None and gdz.two_row_dims,
            DYT_TWO_ROW_DIMS=dy_tangent is not None and dy_tangent.two_row_dims, DY_TANGENT=dy_tangent is not None,
            ACC_DTYPE=accumulator_dtype(tensor.dtype), **activations.forward_constants(activation, negative_slope),
            HAS_GDZ=gdz is not None, WIDE_ROWS=wide_rows(dy.m, chunk_rows), WRITE_GDY=write_gdy, WRITE_DZ=write_dz,
            WRITE_GZ=write_gz, SUMS=sums is not None, BLOCK_M=rows, BLOCK_N=cols, num_warps=warps,
        )
    add_chunk_sums(sums, gb)
    return gdy, dz, gz, gb
