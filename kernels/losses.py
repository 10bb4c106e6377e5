"""Fused losses: cross-entropy over class indices (with class weights, ignore_index and label smoothing)
or over class probabilities (with class weights and label smoothing), and mean squared error, forward
and backward.

Cross-entropy, rows of C logits x, target y, class weights w (1 without), smoothing e:
    lse = logsumexp(x);  nll = w_y (lse - x_y);  smooth = W lse - sum_j w_j x_j   (W = sum_j w_j)
    loss_row = (1 - e) nll + (e / C) smooth  (0 for an ignored row)
    mean: sum(loss_row) / sum(w_y over rows not ignored); sum: the sum; none: loss_row.
torch.nn.functional.cross_entropy's definition, label smoothing included. The forward reads the logits
once (an online logsumexp, the target logit and the weighted sum in one pass) and keeps each row's max
and the log of its sum of exp(x - max) (lse is their sum: differences from lse are formed as
(max - x) + log_sum, so that they keep the precision of x - max rather than of lse's magnitude; weighted
sums of logits are kept as sums of w_j (max - x_j), relative to the running max, for the same reason);
the backward reads them once more and writes the gradient
    dx_j = s_row ((1 - e) w_y (p_j - [j = y]) + (e / C) (W p_j - w_j)),  p = softmax(x)
with s_row the output gradient (over the denominator for mean). All arithmetic in fp32 (fp64 for fp64).
Class probabilities t (smoothed to q = (1 - e) t + e / C): loss_row = sum_j w_j q_j (lse - x_j), in one
pass as the index form's; dx_j = s_row (A p_j - w_j q_j) with A = sum_j w_j q_j, and dt_j =
s_row (1 - e) w_j (lse - x_j); the mean divides by the rows, whatever the weights (torch's definition).
Reductions over rows run in one program (one a group of rows, for torch.func's per-sample losses), in a fixed
order: results are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import (INTERPRET, accumulator_dtype, cdiv, empty, group_rows, grouped, launch, next_power_of_2,
                      state_dtype)

BLOCK_C = 256 if INTERPRET else 2048  # logits a program handles at a time along a row
TILE = 4096 if INTERPRET else 8192  # elements a program handles at a time (BLOCK_R x BLOCK_C)
FP64_ROWS = 32  # rows a program handles at most in fp64
# Class-probability targets hold a second (rows x classes) tile, the targets, and backward writes up to two
# gradients: half the elements a program (a full TILE spilled 8-224 B in the sm_90 compile report).
PROBABILITIES_TILE = TILE // 2
REDUCE_BLOCK = 1024
WARPS = 8
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}  # the kernels' REDUCTION codes


@triton.jit
def cross_entropy_forward_kernel(
    x_ptr, stride_x, target_ptr, weight_ptr,
    row_loss_ptr, row_weight_ptr,  # (N,) each, in the compute dtype
    stats_ptr,  # (N, 2): each row's max and the log of its sum of exp(x - max)
    N, C, ignore_index,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # BLOCK_R rows a program, BLOCK_C logits of each at a time. SMOOTHING: the label smoothing as a
    # constant (0.0: none), materialised in the compute dtype.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    x_rows = x_ptr + rows[:, None] * stride_x  # [BR, 1]
    cols = tl.arange(0, BLOCK_C)
    running_max = tl.full((BLOCK_R,), float("-inf"), COMPUTE)
    running_sum = tl.zeros((BLOCK_R,), COMPUTE)
    gap = tl.zeros((BLOCK_R,), COMPUTE)  # label smoothing's sum_j w_j (max - x_j)
    weight_total = tl.zeros((BLOCK_R,), COMPUTE)
    for c0 in range(0, C, BLOCK_C):
        c_ok = c0 + cols < C
        previous_max = running_max
        x, running_max, running_sum = _logsumexp_step(x_rows + c0 + cols[None, :], r_ok[:, None] & c_ok[None, :],
                                                      r_ok, running_max, running_sum, COMPUTE)
        if SMOOTHING != 0.0:
            w = tl.load(weight_ptr + c0 + cols, mask=c_ok, other=0.0).to(COMPUTE) if HAS_WEIGHT else c_ok.to(COMPUTE)
            gap = _gap_step(gap, weight_total, w[None, :], x, c_ok[None, :], previous_max, running_max)
            weight_total += tl.sum(w, axis=0)
    target = tl.load(target_ptr + rows, mask=r_ok, other=ignore_index)
    kept = r_ok & (target != ignore_index)
    # A target out of range (the host checks, except while a CUDA graph is captured) is never used as an
    # address: its row's loss is NaN.
    bad = kept & ((target < 0) | (target >= C))
    kept = kept & ~bad
    safe = tl.where(kept, target, 0)
    w_y = tl.load(weight_ptr + safe, mask=kept, other=0.0).to(COMPUTE) if HAS_WEIGHT else kept.to(COMPUTE)
    x_y = tl.load(x_ptr + rows * stride_x + safe, mask=kept, other=0.0).to(COMPUTE)
    # lse - x_y as (max - x_y) + log_sum: lse itself, rounded at the logits' scale, would carry an error of
    # that scale into the difference (torch's x - max - log_sum does not).
    log_sum = _store_row_stats(stats_ptr, rows, r_ok, running_max, running_sum)
    loss = w_y * ((running_max - x_y) + log_sum)
    if SMOOTHING != 0.0:
        smooth = weight_total * log_sum + gap
        loss = loss * (1.0 - SMOOTHING) + smooth * SMOOTHING / C
    # An ignored row's logits are never part of the loss (as torch's): its max and log-sum, NaN or inf for
    # non-finite logits (padding filled with -inf), must not reach it as 0 * NaN.
    loss = tl.where(kept, loss, tl.where(bad, float("nan"), 0.0))
    tl.store(row_loss_ptr + rows, loss, mask=r_ok)
    tl.store(row_weight_ptr + rows, w_y, mask=r_ok)


@triton.jit
def _logsumexp_step(x_ptrs, ok, r_ok, running_max, running_sum, COMPUTE: tl.constexpr):
    """One block of logits of BLOCK_R rows into their online logsumexp: (the block in the compute dtype,
    -inf where masked off and 0 on rows past N, which are finite and never stored; the rows' max; their sum
    of exp(x - max))."""
    x = tl.load(x_ptrs, mask=ok, other=float("-inf"))
    x = tl.where(r_ok[:, None], x.to(COMPUTE), 0.0)
    new_max = tl.maximum(running_max, tl.max(x, axis=1))
    # Shifted by 0 while every logit so far is -inf: -inf - -inf would make the sum NaN for good (a row whose
    # first BLOCK_C logits are masked out with -inf, as a restricted vocabulary does).
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return x, new_max, running_sum


@triton.jit
def _store_row_stats(stats_ptr, rows, r_ok, running_max, running_sum):
    """Stores each row's max and log-sum for backward (a row's pair side by side: the stats are rows, as
    torch.func.vmap folds them), and returns the log-sum, where the loss is formed: stored at the kernel's end
    instead, after the loss's stores, one value spilled 8 B in the class-index forward's sm_90 compile (fp32,
    64 classes)."""
    log_sum = tl.log(running_sum)
    tl.store(stats_ptr + 2 * rows, running_max, mask=r_ok)
    tl.store(stats_ptr + 2 * rows + 1, log_sum, mask=r_ok)
    return log_sum


@triton.jit
def smoothing_weight_total(weight_ptr, C, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
                            COMPUTE: tl.constexpr, BLOCK_C: tl.constexpr):
    """W = sum_j w_j (C without weights), which label smoothing's gradient takes; 0 without smoothing, where
    nothing reads it (and no program sums the weights)."""
    total = tl.zeros((), COMPUTE)
    if SMOOTHING != 0.0:
        if HAS_WEIGHT:
            cols = tl.arange(0, BLOCK_C)
            for c0 in range(0, C, BLOCK_C):
                total += tl.sum(tl.load(weight_ptr + c0 + cols, mask=c0 + cols < C, other=0.0).to(COMPUTE), axis=0)
        else:
            total += C
    return total


@triton.jit
def row_stats(stats_ptr, rows, r_ok):
    """(each row's max, the log of its sum of exp(x - max)), as the forward kernels stored them."""
    return (tl.load(stats_ptr + 2 * rows, mask=r_ok, other=0.0),
            tl.load(stats_ptr + 2 * rows + 1, mask=r_ok, other=0.0))


@triton.jit
def _output_gradient_of(rows, GROUP_ROWS, GROUPED: tl.constexpr):
    """Which output gradient (and, for the class-index mean, which totals) a row's loss takes: the row's own
    or the one value (by the gradient's stride, 1 or 0), or, GROUPED (per-sample losses under
    torch.func.vmap), its group's of GROUP_ROWS rows."""
    if GROUPED:
        return rows // GROUP_ROWS
    else:
        return rows


@triton.jit
def _gap_step(gap, mass, q, x, ok, previous_max, new_max):
    """One block of logits x (BLOCK_R x BLOCK_C, lanes not ok ignored) into sum_j q_j (max - x_j), each row's
    weighted gaps below its running max, given mass (sum_j q_j over the blocks before): the earlier terms each
    grow by the max's rise, and the block's own are added. A weighted loss sum_j q_j (lse - x_j) is then
    mass * log_sum + gap, terms of one sign for q >= 0: no cancellation at any logit scale. (Sums taken
    relative to 0 lost 3e-5 relative in fp32 with logits near 1e3; relative to a row's first logit, a masked
    -1e9 there, weighted 0, subtracted two numbers near 1e9.) A -inf logit's gap is +inf, also while every
    logit so far is -inf (then -inf - -inf would be NaN), as torch's -log_softmax is."""
    rise = tl.where(previous_max == float("-inf"), 0.0, new_max - previous_max)
    below = tl.where(x == float("-inf"), float("inf"), new_max[:, None] - x)
    return gap + mass * rise + tl.sum(q * tl.where(ok, below, 0.0), axis=1)


@triton.jit
def _divide(a, b):
    # Correctly rounded: Triton's fp32 `/` is the approximate division (fp64's rounds).
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit(do_not_specialize=["count"])  # a count of 1 would be a constant, which has no .to()
def reduced_loss_kernel(a_ptr, b_ptr, totals_ptr, loss_ptr, N, count, DIVIDE_BY: tl.constexpr, BLOCK: tl.constexpr):
    """Program g: totals[g] = [sum(a), sum(b)] over its group's N values (the g-th N of a and b), in a fixed
    order, and its reduced loss loss[g] in loss's dtype: sum(a), divided by sum(b) (DIVIDE_BY "sum_b"; NaN
    where sum(b) is 0 for "sum_b_or_nan") or by count ("count"), or not ("none")."""
    group = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    a_ptr += group * N
    b_ptr += group * N
    total_a = tl.zeros((BLOCK,), totals_ptr.dtype.element_ty)
    total_b = tl.zeros((BLOCK,), totals_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK):
        ok = n0 + offsets < N
        total_a += tl.load(a_ptr + n0 + offsets, mask=ok, other=0.0)
        total_b += tl.load(b_ptr + n0 + offsets, mask=ok, other=0.0)
    sum_a = tl.sum(total_a, axis=0)
    sum_b = tl.sum(total_b, axis=0)
    tl.store(totals_ptr + 2 * group, sum_a)
    tl.store(totals_ptr + 2 * group + 1, sum_b)
    loss = sum_a
    if DIVIDE_BY == "sum_b":
        loss = _divide(sum_a, sum_b)
    if DIVIDE_BY == "sum_b_or_nan":
        loss = tl.where(sum_b == 0, float("nan"), _divide(sum_a, sum_b))
    if DIVIDE_BY == "count":
        loss = _divide(sum_a, count.to(sum_a.dtype))
    tl.store(loss_ptr + group, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def cross_entropy_backward_kernel(
    x_ptr, stride_x, target_ptr, weight_ptr, stats_ptr, grad_ptr, stride_grad, sums_ptr,
    dx_ptr,  # (N, C) contiguous
    N, C, ignore_index, GROUP_ROWS,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, REDUCTION: tl.constexpr, GROUPED: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # REDUCTION: 0 none (grad per row), 1 sum, 2 mean (grad over the second of sums, the weight of the rows
    # kept); GROUPED: per group of rows (sums then (groups, 2)).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    cols = tl.arange(0, BLOCK_C)
    target = tl.load(target_ptr + rows, mask=r_ok, other=ignore_index)
    kept = r_ok & (target != ignore_index)
    bad = kept & ((target < 0) | (target >= C))  # as in the forward: never an address; the gradient is NaN
    kept = kept & ~bad
    which = _output_gradient_of(rows, GROUP_ROWS, GROUPED)
    scale = tl.load(grad_ptr + which * stride_grad, mask=r_ok, other=0.0).to(COMPUTE)
    if REDUCTION == 2:
        if GROUPED:
            total = tl.load(sums_ptr + 2 * which + 1, mask=r_ok, other=1.0).to(COMPUTE)
        else:
            total = tl.load(sums_ptr + 1).to(COMPUTE)
        if SMOOTHING != 0.0:  # no weight on the kept rows: NaN, as the forward's mean (see _cross_entropy_impl)
            scale = tl.where(total == 0, float("nan"), scale / total)
        else:
            scale = scale / total
    scale = tl.where(kept, scale, tl.where(bad, float("nan"), 0.0))
    safe = tl.where(kept, target, 0)
    w_y = tl.load(weight_ptr + safe, mask=kept, other=0.0).to(COMPUTE) if HAS_WEIGHT else kept.to(COMPUTE)
    weight_total = smoothing_weight_total(weight_ptr, C, HAS_WEIGHT, SMOOTHING, COMPUTE, BLOCK_C)
    row_max, log_sum = row_stats(stats_ptr, rows, r_ok)
    for c0 in range(0, C, BLOCK_C):
        c_ok = c0 + cols < C
        ok = r_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + c0 + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
        p = tl.exp((x - row_max[:, None]) - log_sum[:, None])
        dx = w_y[:, None] * (p - tl.where(c0 + cols[None, :] == target[:, None], 1.0, 0.0))
        if SMOOTHING != 0.0:
            w = tl.load(weight_ptr + c0 + cols, mask=c_ok, other=0.0).to(COMPUTE) if HAS_WEIGHT else 1.0
            dx = dx * (1.0 - SMOOTHING) + (weight_total * p - w) * SMOOTHING / C
        tl.store(dx_ptr + rows[:, None] * C + c0 + cols[None, :], (dx * scale[:, None]).to(dx_ptr.dtype.element_ty),
                 mask=ok)


def tile_constants(rows: int, classes: int, dtype: torch.dtype, elements: int = TILE) -> dict:
    """BLOCK_C logits of a row at a time (all of a short row), and as many rows as fill `elements`; in fp64
    half the elements and at most FP64_ROWS rows (128 rows of 64 fp64 logits spilled 32-520 B a thread in
    the sm_90 compile report; with its per-row max and log-sum kept apart, 8 rows of 1024 spilled 8-40 B)."""
    block_c = min(next_power_of_2(classes), BLOCK_C)
    if dtype == torch.float64:
        elements //= 2
    most = FP64_ROWS if dtype == torch.float64 else elements
    block_r = min(next_power_of_2(rows), max(1, elements // block_c), most)
    return dict(BLOCK_R=block_r, BLOCK_C=block_c)


def cross_entropy_forward(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                          smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row loss, per-row weight w_y (0 when ignored)), each (N,), and per-row stats (N, 2): the row's
    max and the log of its sum of exp(x - max); all in fp32 (fp64 for fp64).

    x (N, C) with unit column stride; target (N,) int64 in [0, C) or ignore_index; weight (C,) or None.
    """
    rows, classes = x.shape
    compute = state_dtype(x.dtype)
    if classes == 0:  # every target ignored (any other is out of range): each row's loss is 0, as torch's
        return *(torch.zeros(rows, device=x.device, dtype=compute) for _ in range(2)), _stats(rows, x, compute, True)
    row_loss, row_weight = (empty((rows,), device=x.device, dtype=compute) for _ in range(2))
    stats = _stats(rows, x, compute)
    if rows:
        tiles = tile_constants(rows, classes, x.dtype)
        with launch("cross_entropy_forward_kernel", x.device):
            cross_entropy_forward_kernel[(cdiv(rows, tiles["BLOCK_R"]),)](
                x, x.stride(0), target, weight if weight is not None else x, row_loss, row_weight, stats,
                rows, classes, ignore_index,
                HAS_WEIGHT=weight is not None, SMOOTHING=float(smoothing), COMPUTE=accumulator_dtype(x.dtype), **tiles,
                num_warps=WARPS,
            )
    return row_loss, row_weight, stats


def _stats(rows: int, x: torch.Tensor, dtype: torch.dtype, zeros: bool = False) -> torch.Tensor:
    """The (rows, 2) per-row stats the forward kernels write (zeros where no kernel runs: no classes)."""
    return (torch.zeros if zeros else empty)((rows, 2), device=x.device, dtype=dtype)


def reduced_loss(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, divide_by: str = "none", count: int = 1,
                 groups: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(totals, loss) of two (N,) tensors of one dtype, in one launch: totals = [sum(a), sum(b)] in their
    dtype, and loss in `dtype`: sum(a), divided by sum(b) for divide_by "sum_b" (NaN where sum(b) is 0 for
    "sum_b_or_nan") or by count for "count".
    Shapes (2,) and (); for groups > 0, (groups, 2) and (groups,), one for each of `groups` equal groups of
    consecutive values (count is then a group's), one program each. One kernel where torch ops would make
    three more launches (host time a call).

    The division is correctly rounded: as torch divides a cross-entropy's sums; its MSE mean multiplies by
    1 / count, which can differ in the last bit of fp32."""
    totals = empty(grouped(groups, (2,)), device=a.device, dtype=a.dtype)
    loss = empty(grouped(groups), device=a.device, dtype=dtype)
    with launch("reduced_loss_kernel", a.device):
        reduced_loss_kernel[(max(groups, 1),)](a, b, totals, loss, group_rows(a.shape[0], groups), count,
                                                DIVIDE_BY=divide_by, BLOCK=REDUCE_BLOCK, num_warps=4)
    return totals, loss


def cross_entropy_backward(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                           smoothing: float, stats: torch.Tensor, grad: torch.Tensor, reduction: str,
                           totals: torch.Tensor | None, groups: int = 0) -> torch.Tensor:
    """dx (N, C) contiguous in x's dtype. grad: the output gradient, (N,) for reduction "none", else a
    scalar, or (groups,) for a loss over each of `groups` equal groups of rows (groups > 0); totals: the
    forward's [sum of row losses, sum of w_y] ((groups, 2) for groups; read for "mean")."""
    rows, classes = x.shape
    dx = empty((rows, classes), device=x.device, dtype=x.dtype)
    if rows == 0 or classes == 0:
        return dx
    tiles = tile_constants(rows, classes, x.dtype)
    with launch("cross_entropy_backward_kernel", x.device):
        cross_entropy_backward_kernel[(cdiv(rows, tiles["BLOCK_R"]),)](
            x, x.stride(0), target, weight if weight is not None else x, stats, grad,
            grad.stride(0) if grad.dim() else 0, totals if totals is not None else stats, dx,
            rows, classes, ignore_index, group_rows(rows, groups),
            HAS_WEIGHT=weight is not None, SMOOTHING=float(smoothing),
            REDUCTION=REDUCTIONS[reduction], GROUPED=_grad_per_group(groups, reduction),
            COMPUTE=accumulator_dtype(x.dtype), **tiles, num_warps=WARPS,
        )
    return dx


@triton.jit
def cross_entropy_probs_forward_kernel(
    x_ptr, stride_x, t_ptr, stride_t, weight_ptr,
    row_loss_ptr, row_mass_ptr,  # (N,) each, in the compute dtype
    stats_ptr,  # (N, 2): each row's max and the log of its sum of exp(x - max)
    N, C,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Class-probability targets t, smoothed to q = (1 - e) t + e / C: loss_row = sum_j w_j q_j (lse - x_j)
    # = A log_sum + B with A = sum_j w_j q_j (the row's mass, kept for backward) and B = sum_j w_j q_j (max -
    # x_j) (_gap_step), both summed in the same pass over the row as its online logsumexp: x and t are read
    # once.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    cols = tl.arange(0, BLOCK_C)
    running_max = tl.full((BLOCK_R,), float("-inf"), COMPUTE)
    running_sum = tl.zeros((BLOCK_R,), COMPUTE)
    # The mass is summed lane by lane (each block's gap reduces what came before it): a row sum added to a
    # loop-carried value and used twice after the loop fails Triton 3.6's OptimizeThreadLocality pass (an
    # assertion).
    mass_lanes = tl.zeros((BLOCK_R, BLOCK_C), COMPUTE)
    gap = tl.zeros((BLOCK_R,), COMPUTE)
    for c0 in range(0, C, BLOCK_C):
        c_ok = c0 + cols < C
        ok = r_ok[:, None] & c_ok[None, :]
        previous_max = running_max
        x, running_max, running_sum = _logsumexp_step(x_ptr + rows[:, None] * stride_x + c0 + cols[None, :], ok,
                                                      r_ok, running_max, running_sum, COMPUTE)
        q = smoothed_target(t_ptr + rows[:, None] * stride_t + c0 + cols[None, :], ok, C, SMOOTHING, COMPUTE)
        if HAS_WEIGHT:
            q = q * tl.load(weight_ptr + c0 + cols, mask=c_ok, other=0.0).to(COMPUTE)[None, :]
        gap = _gap_step(gap, tl.sum(mass_lanes, axis=1), q, x, ok, previous_max, running_max)
        mass_lanes += q
    log_sum = _store_row_stats(stats_ptr, rows, r_ok, running_max, running_sum)
    mass = tl.sum(mass_lanes, axis=1)
    tl.store(row_loss_ptr + rows, mass * log_sum + gap, mask=r_ok)
    tl.store(row_mass_ptr + rows, mass, mask=r_ok)


@triton.jit
def smoothed_target(t_ptrs, ok, C, SMOOTHING: tl.constexpr, COMPUTE: tl.constexpr):
    """The target probabilities at t_ptrs with label smoothing, (1 - e) t + e / C; 0 where not ok."""
    t = tl.load(t_ptrs, mask=ok, other=0.0).to(COMPUTE)
    if SMOOTHING != 0.0:
        # e / C in the compute dtype: a constexpr over the runtime int C would be divided in fp32.
        t = tl.where(ok, t * (1.0 - SMOOTHING) + tl.full((), SMOOTHING, COMPUTE) / C, 0.0)
    return t


@triton.jit
def cross_entropy_probs_backward_kernel(
    x_ptr, stride_x, t_ptr, stride_t, weight_ptr, stats_ptr, row_mass_ptr, grad_ptr, stride_grad,
    dx_ptr, dt_ptr,  # (N, C) contiguous each
    N, C, GROUP_ROWS,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, MEAN: tl.constexpr, GROUPED: tl.constexpr,
    COMPUTE: tl.constexpr, INPUT_GRAD: tl.constexpr, TARGET_GRAD: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # dx_j = s (A p_j - w_j q_j) and dt_j = s (1 - e) w_j (lse - x_j), with s the row's output gradient
    # (over the rows for the mean, which divides by them whatever the weights, as torch's does; GROUPED: by
    # the GROUP_ROWS rows of the row's group, else GROUP_ROWS is N).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < N
    cols = tl.arange(0, BLOCK_C)
    scale = tl.load(grad_ptr + _output_gradient_of(rows, GROUP_ROWS, GROUPED) * stride_grad, mask=r_ok,
                    other=0.0).to(COMPUTE)
    if MEAN:
        scale = scale / GROUP_ROWS
    row_max, log_sum = row_stats(stats_ptr, rows, r_ok)
    mass = tl.load(row_mass_ptr + rows, mask=r_ok, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        c_ok = c0 + cols < C
        ok = r_ok[:, None] & c_ok[None, :]
        out = rows[:, None] * C + c0 + cols[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + c0 + cols[None, :], mask=ok, other=0.0).to(COMPUTE)
        w = tl.load(weight_ptr + c0 + cols, mask=c_ok, other=0.0).to(COMPUTE)[None, :] if HAS_WEIGHT else 1.0
        if INPUT_GRAD:
            q = smoothed_target(t_ptr + rows[:, None] * stride_t + c0 + cols[None, :], ok, C, SMOOTHING, COMPUTE)
            dx = mass[:, None] * tl.exp((x - row_max[:, None]) - log_sum[:, None]) - w * q
            tl.store(dx_ptr + out, (dx * scale[:, None]).to(dx_ptr.dtype.element_ty), mask=ok)
        if TARGET_GRAD:
            dt = w * ((row_max[:, None] - x) + log_sum[:, None]) * (scale[:, None] * (1.0 - SMOOTHING))
            tl.store(dt_ptr + out, dt.to(dt_ptr.dtype.element_ty), mask=ok)


def cross_entropy_probs_forward(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                                smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row loss, per-row mass A = sum_j w_j q_j), each (N,), and per-row stats (N, 2) as
    cross_entropy_forward's, in fp32 (fp64 for fp64), for class-probability targets. x and target (N, C) of
    one dtype, unit column stride; weight (C,) or None."""
    rows, classes = x.shape
    compute = state_dtype(x.dtype)
    if classes == 0:  # no classes: every row's loss is an empty sum (a logsumexp of nothing is -inf)
        return *(torch.zeros(rows, device=x.device, dtype=compute) for _ in range(2)), _stats(rows, x, compute, True)
    row_loss, row_mass = (empty((rows,), device=x.device, dtype=compute) for _ in range(2))
    stats = _stats(rows, x, compute)
    if rows:
        tiles = tile_constants(rows, classes, x.dtype, PROBABILITIES_TILE)
        with launch("cross_entropy_probs_forward_kernel", x.device):
            cross_entropy_probs_forward_kernel[(cdiv(rows, tiles["BLOCK_R"]),)](
                x, x.stride(0), target, target.stride(0), weight if weight is not None else x, row_loss, row_mass,
                stats, rows, classes,
                HAS_WEIGHT=weight is not None, SMOOTHING=float(smoothing), COMPUTE=accumulator_dtype(x.dtype), **tiles,
                num_warps=WARPS,
            )
    return row_loss, row_mass, stats


def cross_entropy_probs_backward(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                                 smoothing: float, stats: torch.Tensor, row_mass: torch.Tensor, grad: torch.Tensor,
                                 reduction: str, input_grad: bool, target_grad: bool, groups: int = 0
                                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dtarget), (N, C) contiguous in x's dtype, each None where not asked for, in one pass over the
    rows. grad: the output gradient, (N,) for reduction "none", else a scalar, or (groups,) for a loss over
    each of `groups` equal groups of rows (groups > 0)."""
    rows, classes = x.shape
    dx = empty((rows, classes), device=x.device, dtype=x.dtype) if input_grad else None
    dt = empty((rows, classes), device=x.device, dtype=x.dtype) if target_grad else None
    if rows == 0 or classes == 0 or not (input_grad or target_grad):
        return dx, dt
    tiles = tile_constants(rows, classes, x.dtype, PROBABILITIES_TILE)
    with launch("cross_entropy_probs_backward_kernel", x.device):
        cross_entropy_probs_backward_kernel[(cdiv(rows, tiles["BLOCK_R"]),)](
            x, x.stride(0), target, target.stride(0), weight if weight is not None else x, stats, row_mass, grad,
            grad.stride(0) if grad.dim() else 0, dx if dx is not None else x, dt if dt is not None else x,
            rows, classes, group_rows(rows, groups),
            HAS_WEIGHT=weight is not None, SMOOTHING=float(smoothing), MEAN=reduction == "mean",
            GROUPED=_grad_per_group(groups, reduction), COMPUTE=accumulator_dtype(x.dtype), INPUT_GRAD=input_grad,
            TARGET_GRAD=target_grad, **tiles,
            num_warps=WARPS,
        )
    return dx, dt


@triton.jit
def _difference(x_ptr, y_ptr, offsets, ok, COMPUTE: tl.constexpr):
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(COMPUTE)
    return x - tl.load(y_ptr + offsets, mask=ok, other=0.0).to(COMPUTE)


@triton.jit
def mse_forward_kernel(x_ptr, y_ptr, out_ptr, N, COMPUTE: tl.constexpr, ELEMENTWISE: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Over group g (grid axis 1) of N elements: ELEMENTWISE: out[i] = (x - y)^2 (reduction "none"); else
    out[g, block] = the block's sum of it (blocks: grid axis 0)."""
    block = tl.program_id(0)
    start = tl.program_id(1).to(tl.int64) * N
    within = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = within < N
    d = _difference(x_ptr, y_ptr, start + within, ok, COMPUTE)
    if ELEMENTWISE:
        tl.store(out_ptr + start + within, (d * d).to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out_ptr + tl.program_id(1).to(tl.int64) * tl.num_programs(0) + block, tl.sum(d * d, axis=0))


@triton.jit
def mse_backward_kernel(x_ptr, y_ptr, grad_ptr, stride_grad, dx_ptr, dy_ptr, N, GROUP_N,
                        COMPUTE: tl.constexpr, MEAN: tl.constexpr, GROUPED: tl.constexpr, INPUT_GRAD: tl.constexpr,
                        TARGET_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """dx = 2 (x - y) grad (/ GROUP_N for the mean), dy = -dx; grad per element (stride 1) or one value
    (stride 0), or GROUPED one for each group of GROUP_N elements (GROUP_N is N where not GROUPED)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < N
    d = _difference(x_ptr, y_ptr, offsets, ok, COMPUTE)
    g = tl.load(grad_ptr + _output_gradient_of(offsets, GROUP_N, GROUPED) * stride_grad, mask=ok, other=0.0)
    # (2 / n) (x - y) g, as torch: dividing last, 2 (x - y) g overflowed where the gradient itself is finite.
    norm = tl.full((), 2.0, COMPUTE) / GROUP_N if MEAN else tl.full((), 2.0, COMPUTE)
    dx = norm * d * g.to(COMPUTE)
    if INPUT_GRAD:
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if TARGET_GRAD:
        tl.store(dy_ptr + offsets, (-dx).to(dy_ptr.dtype.element_ty), mask=ok)


MSE_BLOCK = 1024 if INTERPRET else 2048


def mse_forward(x: torch.Tensor, y: torch.Tensor, reduction: str, groups: int = 0) -> torch.Tensor:
    """(x - y)^2 per element for "none" (x's shape and dtype), else its sum or mean (a scalar in x's dtype),
    or, for groups > 0, each of `groups` equal groups of consecutive elements' ((groups,)). x and y
    contiguous, of one shape."""
    n, copies = x.numel(), max(groups, 1)
    group_n = group_rows(n, groups)
    elementwise, blocks = reduction == "none", cdiv(group_n, MSE_BLOCK)
    # Per-block sums: zeros only where no kernel runs (no elements), a launch writes every block's.
    out = empty(x.shape, device=x.device, dtype=x.dtype) if elementwise else \
        (empty if n else torch.zeros)((copies, max(blocks, 1)), device=x.device, dtype=state_dtype(x.dtype))
    if n:
        with launch("mse_forward_kernel", x.device):
            mse_forward_kernel[(blocks, copies)](x, y, out, group_n, COMPUTE=accumulator_dtype(x.dtype),
                                                 ELEMENTWISE=elementwise, BLOCK=MSE_BLOCK, num_warps=WARPS)
    if elementwise:
        return out
    return reduced_loss(out.view(-1), out.view(-1), x.dtype, "count" if reduction == "mean" else "none",
                        count=group_n, groups=groups)[1]


def mse_backward(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, reduction: str, input_grad: bool,
                 target_grad: bool, groups: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dy) of the MSE loss for the output gradient grad (x's shape for "none", else a scalar, or
    (groups,) for the loss over each of `groups` equal groups of elements)."""
    n = x.numel()
    dx = empty(x.shape, device=x.device, dtype=x.dtype) if input_grad else None
    dy = empty(y.shape, device=y.device, dtype=y.dtype) if target_grad else None
    if n and (input_grad or target_grad):
        grad = grad.contiguous()
        with launch("mse_backward_kernel", x.device):
            mse_backward_kernel[(cdiv(n, MSE_BLOCK),)](
                x, y, grad, 1 if grad.dim() else 0, dx if input_grad else x, dy if target_grad else x, n,
                group_rows(n, groups), COMPUTE=accumulator_dtype(x.dtype), MEAN=reduction == "mean",
                GROUPED=_grad_per_group(groups, reduction), INPUT_GRAD=input_grad, TARGET_GRAD=target_grad,
                BLOCK=MSE_BLOCK, num_warps=WARPS)
    return dx, dy


def _grad_per_group(groups: int, reduction: str) -> bool:
    """Whether a backward kernel takes one output gradient a group of rows (elements): a reduced loss per
    group; "none" has one a row anyway."""
    return bool(groups) and reduction != "none"
