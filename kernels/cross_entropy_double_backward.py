"""Cross-entropy's double backward: the gradients of its backward's dx, for either target form.

Both forms' first-order gradient is, per row (see gpunn.kernels.losses), dx_j = s (a p_j - r_j) with
p = softmax(x), s the row's output gradient over the mean's denominator, and a and r constant in x:
    class indices:        a = (1 - e) w_y + (e / C) W,  r_j = (1 - e) w_y [j = y] + (e / C) w_j
    class probabilities:  a = A = sum_j w_j q_j,         r_j = w_j q_j   (q = (1 - e) t + e / C)
Given G, the gradient of dx, with d = sum_j p_j G_j (the softmax Jacobian applied to G):
    x's gradient:                    s a p_j (G_j - d)
    the probabilities' (t's):        s (1 - e) w_j (d - G_j)
    the output gradient's, per row:  (a d - sum_j r_j G_j) / the mean's denominator (summed over the rows
                                     where the output gradient is one value: sum, mean)
With probabilities, the backward's dt_j = s (1 - e) w_j (lse - x_j) too; given its gradient H, x's gains
s (1 - e) (p_j sum_k w_k H_k - w_j H_j) and the output gradient's (1 - e) sum_j w_j (lse - x_j) H_j over
the denominator (dt does not depend on t).
One kernel: a first pass over each row for d (and sum_j r_j G_j), a second that writes the gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .losses import (PROBABILITIES_TILE, REDUCTIONS, WARPS, reduced_loss, row_stats, smoothed_target,
                     smoothing_weight_total, tile_constants)
from .runtime import accumulator_dtype, cdiv, empty, launch, state_dtype


@triton.jit
def cross_entropy_double_backward_kernel(
    x_ptr, stride_x, target_ptr, stride_t, weight_ptr, stats_ptr, row_mass_ptr, grad_ptr, stride_grad, sums_ptr,
    gdx_ptr, gdt_ptr,  # (N, C) contiguous each: the gradients of dx (HAS_GDX) and of dt (HAS_GDT)
    gx_ptr, gt_ptr,  # (N, C) contiguous each
    ggrad_ptr,  # (N,) in the compute dtype: each row's part of the output gradient's gradient
    N, C, ignore_index,
    PROBABILITIES: tl.constexpr, HAS_GDX: tl.constexpr, HAS_GDT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr, REDUCTION: tl.constexpr,
    COMPUTE: tl.constexpr, INPUT_GRAD: tl.constexpr, TARGET_GRAD: tl.constexpr, GRAD_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # REDUCTION: 0 none (grad per row), 1 sum, 2 mean (over sums[1] for class indices, over N for
    # probabilities), as the backward kernels take it.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    cols = tl.arange(0, BLOCK_C)
    e_over_c = tl.full((), SMOOTHING, COMPUTE) / C  # in the compute dtype (a constexpr over C divides in fp32)
    norm = tl.full((BLOCK_R,), 1.0, COMPUTE)
    if REDUCTION == 2:
        if PROBABILITIES:
            norm = norm / N
        else:
            total = tl.load(sums_ptr + 1).to(COMPUTE)
            if SMOOTHING != 0.0:  # no weight on the kept rows: NaN, as the forward's mean and the backward's
                norm = tl.where(total == 0, float("nan"), norm / total)
            else:
                norm = norm / total
    if PROBABILITIES:
        kept = r_ok
        coef = tl.load(row_mass_ptr + rows, mask=r_ok, other=0.0).to(COMPUTE)
        target = rows  # unused
    else:
        target = tl.load(target_ptr + rows, mask=r_ok, other=ignore_index)
        kept = r_ok & (target != ignore_index)
        bad = kept & ((target < 0) | (target >= C))  # as the backward: never an address, the row NaN
        kept = kept & ~bad
        norm = tl.where(kept, norm, tl.where(bad, float("nan"), 0.0))
        safe = tl.where(kept, target, 0)
        w_y = tl.load(weight_ptr + safe, mask=kept, other=0.0).to(COMPUTE) if HAS_WEIGHT else kept.to(COMPUTE)
        weight_total = smoothing_weight_total(weight_ptr, C, HAS_WEIGHT, SMOOTHING, COMPUTE, BLOCK_C)
        coef = w_y * (1.0 - SMOOTHING) + weight_total * e_over_c
    scale = tl.load(grad_ptr + rows * stride_grad, mask=r_ok, other=0.0).to(COMPUTE) * norm
    row_max, log_sum = row_stats(stats_ptr, rows, r_ok)
    dot = tl.zeros((BLOCK_R,), COMPUTE)
    constant = tl.zeros((BLOCK_R,), COMPUTE)  # sum_j r_j G_j, less (1 - e) sum_j w_j (lse - x_j) H_j
    weighted_h = tl.zeros((BLOCK_R,), COMPUTE)  # sum_j w_j H_j
    for c0 in range(0, C, BLOCK_C):
        c_ok = c0 + cols < C
        ok = r_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + c0 + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
        g = tl.zeros((BLOCK_R, BLOCK_C), COMPUTE)
        if HAS_GDX:
            g = tl.load(gdx_ptr + rows[:, None] * C + c0 + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
        p = tl.where(ok, tl.exp((x - row_max[:, None]) - log_sum[:, None]), 0.0)
        dot += tl.sum(p * g, axis=1)
        # The weights are loaded where each use needs them: loaded once ahead, they spilled 16 B (bf16) in
        # the sm_90 compile report.
        if GRAD_GRAD:
            w = tl.load(weight_ptr + c0 + cols, mask=c_ok, other=0.0).to(COMPUTE)[None, :] if HAS_WEIGHT else 1.0
            if PROBABILITIES:
                q = smoothed_target(target_ptr + rows[:, None] * stride_t + c0 + cols[None, :], ok, C, SMOOTHING,
                                    COMPUTE)
                constant += tl.sum(w * q * g, axis=1)
            else:
                r = tl.where(c0 + cols[None, :] == target[:, None], w_y[:, None] * (1.0 - SMOOTHING), 0.0)
                if SMOOTHING != 0.0:
                    r = r + tl.where(ok, e_over_c * w, 0.0)
                constant += tl.sum(r * g, axis=1)
        if HAS_GDT:
            h = tl.load(gdt_ptr + rows[:, None] * C + c0 + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
            w = tl.load(weight_ptr + c0 + cols, mask=c_ok, other=0.0).to(COMPUTE)[None, :] if HAS_WEIGHT else 1.0
            weighted_h += tl.sum(tl.where(ok, w * h, 0.0), axis=1)
            if GRAD_GRAD:
                distance = tl.where(ok, (row_max[:, None] - x) + log_sum[:, None], 0.0)  # lse - x
                constant -= tl.sum(w * distance * h, axis=1) * (1.0 - SMOOTHING)
    if GRAD_GRAD:
        # An ignored row (norm 0) adds exactly 0, whatever its logits (padding masked with -inf makes its p NaN);
        # its logits' gradient is torch's, NaN there too.
        part = tl.where(norm == 0, 0.0, (coef * dot - constant) * norm)
        if REDUCTION == 2 and not PROBABILITIES:
            part = tl.where(total == 0, float("nan"), part)  # a mean over no weight (all rows ignored): torch's NaN
        tl.store(ggrad_ptr + rows, part, mask=r_ok)
    if INPUT_GRAD or TARGET_GRAD:
        for c0 in range(0, C, BLOCK_C):
            c_ok = c0 + cols < C
            ok = r_ok[:, None] & c_ok[None, :]
            out = rows[:, None] * C + c0 + cols[None, :]
            w = tl.load(weight_ptr + c0 + cols, mask=c_ok, other=0.0).to(COMPUTE)[None, :] if HAS_WEIGHT else 1.0
            g = tl.zeros((BLOCK_R, BLOCK_C), COMPUTE)
            if HAS_GDX:
                g = tl.load(gdx_ptr + out, mask=ok, other=0.0).to(COMPUTE)
            if INPUT_GRAD:
                x = tl.load(x_ptr + rows[:, None] * stride_x + c0 + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
                p = tl.exp((x - row_max[:, None]) - log_sum[:, None])
                gx = (scale * coef)[:, None] * p * (g - dot[:, None])
                if HAS_GDT:
                    h = tl.load(gdt_ptr + out, mask=ok, other=0.0).to(COMPUTE)
                    gx += (scale * (1.0 - SMOOTHING))[:, None] * (p * weighted_h[:, None] - w * h)
                tl.store(gx_ptr + out, gx.to(gx_ptr.dtype.element_ty), mask=ok)
            if TARGET_GRAD:
                gt = (scale * (1.0 - SMOOTHING))[:, None] * w * (dot[:, None] - g)
                tl.store(gt_ptr + out, gt.to(gt_ptr.dtype.element_ty), mask=ok)


def cross_entropy_double_backward(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                                  ignore_index: int, smoothing: float, stats: torch.Tensor,
                                  row_mass: torch.Tensor | None, grad: torch.Tensor, grad_dx: torch.Tensor | None,
                                  grad_dt: torch.Tensor | None, reduction: str, totals: torch.Tensor | None,
                                  input_grad: bool, target_grad: bool,
                                  grad_grad: bool) -> tuple[torch.Tensor | None, ...]:
    """(x's gradient (N, C), the probabilities' (N, C), the output gradient's (grad's shape)), each None where
    not asked for, given grad_dx and grad_dt ((N, C) contiguous, or None for zero), the gradients of the
    backward's dx and (probabilities only) dt. The arguments are the
    backward's: target (N,) class indices, or (N, C) probabilities when row_mass (the forward's A, (N,)) is
    given; totals the index form's [loss sum, weight sum] (read for the mean)."""
    rows, classes = x.shape
    probabilities = row_mass is not None
    gx = empty((rows, classes), device=x.device, dtype=x.dtype) if input_grad else None
    gt = empty((rows, classes), device=x.device, dtype=x.dtype) if target_grad else None
    launched = rows and classes and (input_grad or target_grad or grad_grad)
    # Zeros only where no kernel runs (no classes): a launch writes every row.
    ggrad = (empty if launched else torch.zeros)((rows,), device=x.device, dtype=state_dtype(x.dtype)) \
        if grad_grad else None
    if launched:
        tiles = tile_constants(rows, classes, x.dtype, PROBABILITIES_TILE)
        with launch("cross_entropy_double_backward_kernel", x.device):
            cross_entropy_double_backward_kernel[(cdiv(rows, tiles["BLOCK_R"]),)](
                x, x.stride(0), target, target.stride(0) if probabilities else 0,
                weight if weight is not None else x, stats, row_mass if probabilities else stats, grad,
                grad.stride(0) if grad.dim() else 0, totals if totals is not None else stats,
                grad_dx if grad_dx is not None else x, grad_dt if grad_dt is not None else x,
                gx if gx is not None else x, gt if gt is not None else x, ggrad if ggrad is not None else stats,
                rows, classes, ignore_index,
                PROBABILITIES=probabilities, HAS_GDX=grad_dx is not None, HAS_GDT=grad_dt is not None,
                HAS_WEIGHT=weight is not None, SMOOTHING=float(smoothing),
                REDUCTION=REDUCTIONS[reduction], COMPUTE=accumulator_dtype(x.dtype),
                INPUT_GRAD=input_grad, TARGET_GRAD=target_grad, GRAD_GRAD=grad_grad, **tiles, num_warps=WARPS,
            )
    if ggrad is not None:
        ggrad = ggrad.to(grad.dtype) if grad.dim() else reduced_loss(ggrad, ggrad, grad.dtype)[1]
    return gx, gt, ggrad
