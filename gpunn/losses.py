"""gpunn.CrossEntropyLoss and gpunn.MSELoss: drop-ins for the torch.nn losses whose forward and backward
run as fused Triton kernels (gpunn.kernels.losses), with their functional forms."""
from __future__ import annotations

import math
import numbers
import warnings

import torch

from . import autocast
from .arguments import check_tensors, wrong_type
from .kernels import cross_entropy_double_backward as second_order, losses as kernels
from .kernels.runtime import capturing, group_rows, grouped, state_dtype, triton_runs_on
from .ops.library import Op, arrived, nothing, refuse_double_backward, requires_grad_within, saved_tensors, sum_of

REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def _legacy_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """The reduction asked for, checked: torch's deprecated size_average / reduce, where given, as torch reads
    them (with its warning), else reduction."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    _check_reduction(reduction)
    return reduction


def check_targets(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """IndexError, as torch's CPU loss raises, for a class index outside [0, classes) that is not ignore_index.
    One device sync; the kernels also never read through a bad index (that row's loss is NaN)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bad.any():
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def _cross_entropy_impl(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                   smoothing: float, reduction: str, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, each row's stats (N, 2): its max and log-sum, the weighted loss and weight totals (2,) or nothing
    for "none") of logits (N, C) (unit column stride) against class indices (N,) int64; see
    gpunn.kernels.losses. groups > 0: the mean or sum of each of `groups` equal groups of rows, (groups,),
    totals (groups, 2) (torch.func.vmap's per-sample losses, Op's groups)."""
    if not capturing(logits.device):  # a sync cannot be captured
        check_targets(target, logits.shape[1], ignore_index)
    row_loss, row_weight, stats = kernels.cross_entropy_forward(logits, target, weight, ignore_index, smoothing)
    if reduction == "none":
        return row_loss.to(logits.dtype), stats, nothing(stats)
    # torch's smoothed mean adds the class-index mean, 0 / 0 where no kept row has weight, to the smoothing's:
    # NaN there, where the one sum gpunn divides would give +-inf.
    mean = "sum_b_or_nan" if smoothing != 0.0 else "sum_b"
    totals, loss = kernels.reduced_loss(row_loss, row_weight, logits.dtype, mean if reduction == "mean" else "none",
                                        groups=groups)
    return loss, stats, totals


def _batch_shape(input: torch.Tensor) -> tuple[int, ...]:
    """The batch of a cross-entropy input (N, C, d1, ...): (N, d1, ...), or () for an unbatched (C,)."""
    return (input.shape[0], *input.shape[2:]) if input.dim() > 1 else ()


def _class_rows(input: torch.Tensor) -> torch.Tensor:
    """input (N, C), (C,) or (N, C, d1, ...) as rows of C classes (N * d1 * ..., C) with a unit column stride
    (a view where one exists)."""
    if input.dim() == 1:  # (1, C) spelled out: under vmap over no samples reshape cannot infer it
        return (input if input.stride(0) == 1 else input.contiguous()).reshape(1, input.shape[0])
    # The row count spelled out: reshape cannot infer it when there are no classes.
    rows = input.movedim(1, -1).reshape(math.prod(_batch_shape(input)), input.shape[1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _stats_fake(logits: torch.Tensor) -> torch.Tensor:
    """The (N, 2) per-row stats (max, log-sum) a cross-entropy forward keeps, in fp32 (fp64 for fp64)."""
    return logits.new_empty((logits.shape[0], 2), dtype=state_dtype(logits.dtype))


def _cross_entropy_fake(logits, target, weight, ignore_index, smoothing, reduction, groups):
    rows = logits.shape[0]
    stats = _stats_fake(logits)
    if reduction == "none":
        return logits.new_empty((rows,)), stats, nothing(stats)
    return logits.new_empty(grouped(groups)), stats, stats.new_empty(grouped(groups, (2,)))


def _cross_entropy_backward_impl(grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                            weight: torch.Tensor | None, ignore_index: int, smoothing: float, stats: torch.Tensor,
                            reduction: str, totals: torch.Tensor, groups: int) -> torch.Tensor:
    return kernels.cross_entropy_backward(logits, target, weight, ignore_index, smoothing, stats, grad.contiguous(),
                                          reduction, totals if reduction != "none" else None, groups)


def _cross_entropy_backward_fake(grad, logits, target, weight, ignore_index, smoothing, stats, reduction, totals,
                                 groups):
    return torch.empty_like(logits)


def _cross_entropy_backward_setup(ctx, inputs, output):
    grad, logits, target, weight, ignore_index, smoothing, stats, reduction, totals, _ = inputs
    ctx.save_for_backward(grad, logits, target, weight, stats, totals)
    ctx.ignore_index, ctx.smoothing, ctx.reduction = ignore_index, smoothing, reduction


def _cross_entropy_double_backward(ctx, grad_dx):
    """The gradients of (grad, logits) given dx's (gpunn.kernels.cross_entropy_double_backward). The stats
    and totals the backward read get none: the logits' gradient already counts every path through them."""
    refuse_double_backward("cross_entropy", "triple")  # groups is 0 here (library._ungrouped)
    grad, logits, target, weight, stats, totals = saved_tensors(ctx)
    need_grad, need_logits = ctx.needs_input_grad[:2]
    if grad_dx is None or not (need_grad or need_logits):
        return (None,) * 10
    gx, _, gg = second_order.cross_entropy_double_backward(
        logits, target, weight, ctx.ignore_index, ctx.smoothing, stats, None, grad, grad_dx.contiguous(), None,
        ctx.reduction, totals if ctx.reduction != "none" else None, need_logits, False, need_grad)
    return (gg, gx) + (None,) * 8


# Forward mode's rules (library.Op's jvp) for class indices. The loss's tangent is its gradient (the backward
# under an output gradient of one) dotted with the logits' tangent, by torch, row by row. The backward's,
# dx = g grad l(x), is g H x' + g' grad l(x) for the Hessian H of the loss, which is symmetric: H x' is double
# backward's logits gradient with x' as dx's (cross_entropy_backward_tangent), the other term the backward
# under g'. What forward kept (the row stats, the totals) gets none, as in double backward: the logits' path
# counts every path through them.

def _refuse_weight_tangent(tangent: torch.Tensor | None) -> None:
    if tangent is not None:
        raise NotImplementedError("gpunn cross_entropy: forward-mode AD through the class weights is not supported")


def _cross_entropy_jvp(args, outputs, tangents):
    logits, target, weight, ignore_index, smoothing, reduction, _ = args  # groups 0 (library._unrecorded_or_plain)
    t_logits = tangents[0]
    _refuse_weight_tangent(tangents[2])
    if t_logits is None:
        return None, None, None
    loss, stats, totals = outputs
    gradient = _cross_entropy_backward(torch.ones_like(loss), logits, target, weight, ignore_index, smoothing, stats,
                                       reduction, totals, 0)
    product = gradient * t_logits
    return (product.sum(1) if reduction == "none" else product.sum()), None, None


def _cross_entropy_backward_jvp(args, outputs, tangents):
    grad, logits, target, weight, ignore_index, smoothing, stats, reduction, totals, _ = args
    t_grad, t_logits = tangents[:2]
    _refuse_weight_tangent(tangents[3])
    return sum_of(_cross_entropy_backward_tangent(grad, logits, target, weight, ignore_index, smoothing, stats,
                                                  reduction, totals, t_logits) if t_logits is not None else None,
                  _cross_entropy_backward(t_grad, logits, target, weight, ignore_index, smoothing, stats, reduction,
                                          totals, 0) if t_grad is not None else None)


def _cross_entropy_backward_tangent_impl(grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                                         weight: torch.Tensor | None, ignore_index: int, smoothing: float,
                                         stats: torch.Tensor, reduction: str, totals: torch.Tensor,
                                         t_logits: torch.Tensor) -> torch.Tensor:
    """g H x' (N, C): the logits' tangent x' through the loss's Hessian, times the output gradient."""
    return second_order.cross_entropy_double_backward(
        logits, target, weight, ignore_index, smoothing, stats, None, grad, t_logits.contiguous(), None, reduction,
        totals if reduction != "none" else None, True, False, False)[0]


_cross_entropy_backward_tangent = Op("cross_entropy_backward_tangent", _cross_entropy_backward_tangent_impl,
                                     _cross_entropy_backward_fake)

# Under torch.func.vmap over the rows alone (logits, targets, what forward kept, the output gradient), each loss
# op folds the samples into its rows and reduces each sample's apart (Op's rows and groups): one launch each.
_cross_entropy_backward = Op("cross_entropy_backward", _cross_entropy_backward_impl, _cross_entropy_backward_fake,
                             _cross_entropy_backward_setup, _cross_entropy_double_backward,
                             rows={0: 0, 1: 1, 2: 0, 6: 1, 8: 1}, groups=9, jvp=_cross_entropy_backward_jvp)


def _cross_entropy_setup(ctx, inputs, output):
    logits, target, weight, ignore_index, smoothing, reduction, _ = inputs
    ctx.save_for_backward(logits, target, weight, output[1], output[2])
    ctx.ignore_index, ctx.smoothing, ctx.reduction = ignore_index, smoothing, reduction


def _cross_entropy_grad(ctx, grad, _, __):
    logits, target, weight, stats, totals = saved_tensors(ctx)
    dx = _cross_entropy_backward(grad, logits, target, weight, ctx.ignore_index, ctx.smoothing, stats, ctx.reduction,
                                 totals, 0)
    return dx, None, None, None, None, None, None


_cross_entropy = Op("cross_entropy", _cross_entropy_impl, _cross_entropy_fake, _cross_entropy_setup,
                    _cross_entropy_grad, rows={0: 1, 1: 0}, groups=6, jvp=_cross_entropy_jvp)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100, reduce: bool | None = None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.cross_entropy, in fused Triton kernels: one pass over the logits forward (and, for
    "mean" and "sum", one small launch that reduces the rows), one backward.

    Args:
        input: logits (N, C), unbatched (C,), or (N, C, d1, ...); any strides.
        target: class indices (N,), () or (1,) for unbatched logits, or (N, d1, ...), int64 (uint8 too), each
            in [0, C) or ignore_index;
            or class probabilities, a floating tensor of input's shape (differentiable too).
        weight: (C,) class weights or None. reduction: "mean" (over the weights of the rows kept; over the
            rows for class probabilities), "sum" or "none". label_smoothing: at most 1 (0 or less: none).
        ignore_index: a class index whose rows are left out (class-index targets only, as torch's).
        size_average, reduce: torch's deprecated forms of reduction, taken as torch takes them (with its
            warning); their place in the argument order is torch's.

    Returns:
        The loss: a scalar, or the shape of the batch (N, d1, ...) for "none"; in input's dtype (for class
        probabilities, the dtype input, target and weight promote to; float32 under autocast for 16-bit
        inputs, as torch).

    Raises:
        The errors torch raises for these arguments, with its types, before any kernel runs: TypeError for
        an argument of the wrong type, ValueError for a bad reduction, a batch-size mismatch or an
        ignore_index past int64, RuntimeError for a bad target dtype, weight shape,
        label_smoothing, a non-negative ignore_index given with class probabilities or class weights that
        require grad with class indices, IndexError for a target out of range (checked with one device
        sync). NotImplementedError for class weights that require grad with class probabilities (torch
        differentiates them; gpunn's kernels do not).
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    ignore_index, label_smoothing = _parsed_arguments(input, target, weight, ignore_index, label_smoothing)
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    # As torch: only the upper bound is checked, and a smoothing of 0 or less (or NaN) smooths nothing.
    label_smoothing = float(label_smoothing) if label_smoothing > 0.0 else 0.0
    # torch's checks, in its order: a target of input's shape is class probabilities.
    probabilities = target.shape == input.shape
    if probabilities and not target.is_floating_point():
        raise RuntimeError(f"Expected floating point type for target with class probabilities, got "
                           f"{_scalar_type_name(target.dtype)}")
    if input.dim() == 0:
        raise IndexError("Dimension specified as 1 but tensor has no dimensions")
    if input.dim() == 1 and target.dim() == 1 and not probabilities:
        _check_index_dtype(target)  # before the size, for unbatched logits
        if target.shape[0] != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
        target = target.reshape(())  # torch takes a (1,) target of unbatched logits as their class
    if input.dim() > 1 and target.dim() == 0 and input.shape[0] == 0:
        raise IndexError("Dimension specified as 0 but tensor has no dimensions")
    if input.dim() > 1 and (target.dim() == 0 or target.shape[0] != input.shape[0]):
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                         f"({target.shape[0] if target.dim() else 0}).")
    classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if weight is not None and tuple(weight.shape) != (classes,):
        raise RuntimeError(f"weight tensor should be defined either for all {classes} classes or no classes but "
                           f"got weight tensor of shape: {list(weight.shape)}")
    if weight is not None and requires_grad_within(weight) and torch.is_grad_enabled():
        # torch refuses this for class indices; for class probabilities it differentiates the weights, which
        # gpunn's kernels do not: refused, rather than a gradient silently missing.
        if probabilities:
            raise NotImplementedError("gpunn cross_entropy does not differentiate the class weights; pass "
                                      "weight.detach()")
        raise RuntimeError("The function 'nll_loss_forward' is not differentiable with respect to argument 'weight'. "
                           "This input cannot have requires_grad True.")
    if probabilities:
        return _cross_entropy_probabilities(input, target, weight, ignore_index, reduction, label_smoothing)
    _check_index_dtype(target)
    expected_target = _batch_shape(input)
    if tuple(target.shape) != expected_target:
        raise RuntimeError(f"expected target of shape {list(expected_target)} for input of shape "
                           f"{list(input.shape)}, got {list(target.shape)}")
    input, weight = autocast.cast(input.device.type, input, weight, to_float32=True)
    if weight is not None and weight.dtype != input.dtype and input.is_floating_point():
        # torch promotes them only for class probabilities (integer logits: its log_softmax refuses them first)
        raise RuntimeError(f"expected scalar type {_scalar_type_name(input.dtype)} but found "
                           f"{_scalar_type_name(weight.dtype)}")
    if not triton_runs_on(input.device) or not input.is_floating_point():
        return torch.nn.functional.cross_entropy(input, target, weight, ignore_index=ignore_index,
                                                 reduction=reduction, label_smoothing=label_smoothing)
    flat_target = target.reshape(target.numel()).to(torch.int64)  # not -1: vmap over no samples cannot infer it
    logits = _class_rows(input)
    if weight is not None:
        weight = weight.to(input.dtype).contiguous()
    loss, _, _ = _cross_entropy(logits, flat_target.contiguous(), weight, ignore_index, label_smoothing,
                                reduction, 0)
    return loss.reshape(target.shape) if reduction == "none" else loss


def _parsed_arguments(input, target, weight, ignore_index, label_smoothing) -> tuple[int, float]:
    """(ignore_index, label_smoothing) as cross_entropy's arguments are read by torch's parser, with its
    TypeError for an argument of the wrong type (a list for a tensor, a float or bool index, a tensor of
    more than one value for the smoothing) and ValueError for an index past int64."""
    op = "cross_entropy_loss"
    check_tensors(op, ("input", input, False), ("target", target, False), ("weight", weight, True))
    if (isinstance(ignore_index, (bool, float)) or not hasattr(type(ignore_index), "__index__")
            or (isinstance(ignore_index, torch.Tensor) and (ignore_index.is_floating_point()
                                                            or ignore_index.dtype == torch.bool))):
        raise wrong_type(op, "ignore_index", 5, "int", ignore_index)
    ignore_index = int(ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError("Overflow when unpacking long long")
    if (not isinstance(label_smoothing, (numbers.Real, torch.Tensor))
            or (isinstance(label_smoothing, torch.Tensor) and label_smoothing.dim())):
        raise wrong_type(op, "label_smoothing", 6, "float", label_smoothing)
    return ignore_index, float(label_smoothing)


def _cross_entropy_probabilities(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                                 ignore_index: int, reduction: str, label_smoothing: float) -> torch.Tensor:
    """cross_entropy for class-probability targets (a floating target of input's shape), arguments checked."""
    if ignore_index >= 0:  # torch's check: any negative index (never a class) is accepted
        raise RuntimeError("ignore_index is not supported for floating point target")
    input, target, weight = autocast.cast(input.device.type, input, target, weight, to_float32=True)
    if not triton_runs_on(input.device) or not input.is_floating_point():
        return torch.nn.functional.cross_entropy(input, target, weight, reduction=reduction,
                                                 label_smoothing=label_smoothing)
    dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
    logits, probabilities = _class_rows(input.to(dtype)), _class_rows(target.to(dtype))
    if weight is not None:
        weight = weight.to(dtype).contiguous()
    loss = _cross_entropy_probs(logits, probabilities, weight, label_smoothing, reduction, input.numel() == 0, 0)[0]
    return loss.reshape(_batch_shape(input)) if reduction == "none" else loss


def _cross_entropy_probs_impl(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                              smoothing: float, reduction: str, empty: bool, groups: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, each row's stats (N, 2): its max and log-sum, each row's mass sum_j w_j q_j (N,)) of logits and class
    probabilities (N, C), unit column stride; see gpunn.kernels.losses. empty: the input had no elements,
    whose mean torch makes NaN. groups > 0: each of `groups` equal groups of rows reduced apart, (groups,)."""
    row_loss, row_mass, stats = kernels.cross_entropy_probs_forward(logits, target, weight, smoothing)
    if reduction == "none":
        return row_loss.to(logits.dtype), stats, row_mass
    count = 0 if empty else group_rows(logits.shape[0], groups)
    _, loss = kernels.reduced_loss(row_loss, row_loss, logits.dtype, "count" if reduction == "mean" else "none",
                                   count=count, groups=groups)
    return loss, stats, row_mass


def _cross_entropy_probs_fake(logits, target, weight, smoothing, reduction, empty, groups):
    stats = _stats_fake(logits)
    loss = logits.new_empty((logits.shape[0],) if reduction == "none" else grouped(groups))
    return loss, stats, stats.new_empty(stats.shape[:1])


def _cross_entropy_probs_backward_impl(grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                                       weight: torch.Tensor | None, smoothing: float, stats: torch.Tensor,
                                       row_mass: torch.Tensor, reduction: str, input_grad: bool, target_grad: bool,
                                       groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d logits, d target), each nothing where not asked for."""
    dx, dt = kernels.cross_entropy_probs_backward(logits, target, weight, smoothing, stats, row_mass, grad.contiguous(),
                                                  reduction, input_grad, target_grad, groups)
    return (dx if dx is not None else nothing(logits)), (dt if dt is not None else nothing(logits))


def _cross_entropy_probs_backward_fake(grad, logits, target, weight, smoothing, stats, row_mass, reduction, input_grad,
                                       target_grad, groups):
    return tuple(torch.empty_like(logits) if need else nothing(logits) for need in (input_grad, target_grad))


def _cross_entropy_probs_backward_setup(ctx, inputs, output):
    grad, logits, target, weight, smoothing, stats, row_mass, reduction, *_ = inputs
    ctx.save_for_backward(grad, logits, target, weight, stats, row_mass)
    ctx.smoothing, ctx.reduction = smoothing, reduction


def _cross_entropy_probs_double_backward(ctx, grad_dx, grad_dt):
    """The gradients of (grad, logits, target) given dx's, as the class-index form's (the row mass and stats
    get none: the logits' and target's gradients count every path through them)."""
    refuse_double_backward("cross_entropy", "triple")
    grad, logits, target, weight, stats, row_mass = saved_tensors(ctx)
    need_grad, need_logits, need_target = ctx.needs_input_grad[:3]
    grad_dx, grad_dt = (g.contiguous() if g is not None else None
                        for g in (arrived(grad_dx, logits.shape), arrived(grad_dt, logits.shape)))
    if (grad_dx is None and grad_dt is None) or not (need_grad or need_logits or need_target):
        return (None,) * 11
    gx, gt, gg = second_order.cross_entropy_double_backward(
        logits, target, weight, 0, ctx.smoothing, stats, row_mass, grad, grad_dx, grad_dt, ctx.reduction, None,
        need_logits, need_target and grad_dx is not None, need_grad)
    return (gg, gx, gt) + (None,) * 8


_cross_entropy_probs_backward = Op("cross_entropy_probs_backward", _cross_entropy_probs_backward_impl,
                                   _cross_entropy_probs_backward_fake, _cross_entropy_probs_backward_setup,
                                   _cross_entropy_probs_double_backward, rows={0: 0, 1: 1, 2: 1, 5: 1, 6: 0},
                                   groups=10)


def _cross_entropy_probs_setup(ctx, inputs, output):
    logits, target, weight, smoothing, reduction, *_ = inputs
    ctx.save_for_backward(logits, target, weight, output[1], output[2])
    ctx.smoothing, ctx.reduction = smoothing, reduction


def _cross_entropy_probs_grad(ctx, grad, _, __):
    logits, target, weight, stats, row_mass = saved_tensors(ctx)
    need_input, need_target = ctx.needs_input_grad[:2]
    dx, dt = _cross_entropy_probs_backward(grad, logits, target, weight, ctx.smoothing, stats, row_mass, ctx.reduction,
                                           need_input, need_target, 0)
    return dx if need_input else None, dt if need_target else None, None, None, None, None, None


_cross_entropy_probs = Op("cross_entropy_probs", _cross_entropy_probs_impl, _cross_entropy_probs_fake,
                          _cross_entropy_probs_setup, _cross_entropy_probs_grad, rows={0: 1, 1: 1}, groups=6)


_SCALAR_TYPE_NAMES = {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
                      torch.uint8: "Byte", torch.bool: "Bool", torch.float64: "Double", torch.float32: "Float",
                      torch.float16: "Half", torch.bfloat16: "BFloat16"}


def _check_index_dtype(target: torch.Tensor) -> None:
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_scalar_type_name(target.dtype)}")


def _scalar_type_name(dtype: torch.dtype) -> str:
    """A dtype as torch's error messages name it (its C++ ScalarType)."""
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _mse_loss_impl(input: torch.Tensor, target: torch.Tensor, reduction: str, groups: int) -> torch.Tensor:
    """The mean squared error of two contiguous (N,) tensors of one dtype (each element a row of Op's rows:
    groups > 0 reduces each of `groups` equal groups of elements apart, (groups,))."""
    return kernels.mse_forward(input, target, reduction, groups)


def _mse_loss_fake(input, target, reduction, groups):
    return input.new_empty(input.shape if reduction == "none" else grouped(groups))


def _mse_loss_backward_impl(grad: torch.Tensor, input: torch.Tensor, target: torch.Tensor, reduction: str,
                       input_grad: bool, target_grad: bool, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d input, d target), each nothing where not asked for."""
    dx, dy = kernels.mse_backward(input, target, grad, reduction, input_grad, target_grad, groups)
    return (dx if dx is not None else nothing(input)), (dy if dy is not None else nothing(input))


def _mse_loss_backward_fake(grad, input, target, reduction, input_grad, target_grad, groups):
    return tuple(torch.empty_like(input) if need else nothing(input) for need in (input_grad, target_grad))


def _mse_loss_backward_setup(ctx, inputs, output):
    grad, input, target, reduction, *_ = inputs
    ctx.save_for_backward(grad, input, target)
    ctx.reduction = reduction


def _mse_loss_double_backward(ctx, grad_dx, grad_dy):
    """dx = 2 (x - y) g / n and dy = -dx are linear in x - y and in g. Given their gradients a and b, x's is
    2 (a - b) g / n and y's its negative: mse_backward itself, with (a, b) in place of (x, y). g's is
    2 (x - y)(a - b) / n: mse_backward's elementwise form with a - b as the output gradient, summed over
    the elements where g is one value (mean, sum)."""
    refuse_double_backward("mse_loss", "triple")
    grad, input, target = saved_tensors(ctx)
    need_grad, need_input, need_target = ctx.needs_input_grad[:3]
    grad_dx, grad_dy = (arrived(g, input.shape) for g in (grad_dx, grad_dy))
    if grad_dx is None and grad_dy is None:
        return (None,) * 7
    grad_dx, grad_dy = (g.contiguous() for g in _tangents_or_zeros(grad_dx, grad_dy))
    gx = gy = gg = None
    if need_input or need_target:
        gx, gy = kernels.mse_backward(grad_dx, grad_dy, grad, ctx.reduction, need_input, need_target)
    if need_grad:
        gg = _mse_reduced(kernels.mse_backward(input, target, grad_dx - grad_dy, "none", True, False)[0],
                          ctx.reduction)
    return gg, gx, gy, None, None, None, None


def _mse_reduced(elementwise: torch.Tensor, reduction: str) -> torch.Tensor:
    """A per-element term summed as the reduction sums the loss (torch sums it; one value, or as it is)."""
    if reduction == "none":
        return elementwise
    return elementwise.sum() / (elementwise.numel() if reduction == "mean" else 1)


def _tangents_or_zeros(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tangents of the same shape, zeros where one is None (not both)."""
    return (a if a is not None else torch.zeros_like(b)), (b if b is not None else torch.zeros_like(a))


# Forward mode's rules (library.Op's jvp). The loss's tangent is 2 (x - y)(x' - y') reduced: mse_backward's
# elementwise form with x' - y' as the output gradient, as double backward's g's gradient. The backward's
# (dx = 2 (x - y) g / n, dy = -dx) is mse_backward of (x', y') under g, plus mse_backward of (x, y) under g'.

def _mse_jvp(args, outputs, tangents):
    input, target, reduction, _ = args  # groups is 0: a fold with groups declines under forward mode
    if tangents[0] is None and tangents[1] is None:
        return None
    t_input, t_target = _tangents_or_zeros(*tangents[:2])
    return _mse_reduced(_mse_loss_backward(t_input - t_target, input, target, "none", True, False, 0)[0], reduction)


def _mse_backward_jvp(args, outputs, tangents):
    grad, input, target, reduction, input_grad, target_grad, _ = args
    t_grad, t_input, t_target = tangents[:3]
    terms = []
    if t_input is not None or t_target is not None:
        terms.append(_mse_loss_backward(grad, *_tangents_or_zeros(t_input, t_target), reduction, input_grad,
                                        target_grad, 0))
    if t_grad is not None:
        terms.append(_mse_loss_backward(t_grad, input, target, reduction, input_grad, target_grad, 0))
    if not terms:
        return None, None
    return tuple(sum_of(*column) for column in zip(*terms))  # the placeholders add to themselves


_mse_loss_backward = Op("mse_loss_backward", _mse_loss_backward_impl, _mse_loss_backward_fake,
                        _mse_loss_backward_setup, _mse_loss_double_backward, rows={0: 0, 1: 0, 2: 0}, groups=6,
                        jvp=_mse_backward_jvp)


def _mse_setup(ctx, inputs, output):
    input, target, reduction, _ = inputs
    ctx.save_for_backward(input, target)
    ctx.reduction = reduction


def _mse_grad(ctx, grad):
    input, target = saved_tensors(ctx)
    need_input, need_target = ctx.needs_input_grad[:2]
    dx, dy = _mse_loss_backward(grad, input, target, ctx.reduction, need_input, need_target, 0)
    return dx if need_input else None, dy if need_target else None, None, None


_mse_loss = Op("mse_loss", _mse_loss_impl, _mse_loss_fake, _mse_setup, _mse_grad, rows={0: 0, 1: 0}, groups=3,
               jvp=_mse_jvp)


def mse_loss(input: torch.Tensor, target: torch.Tensor, size_average: bool | None = None, reduce: bool | None = None,
             reduction: str = "mean", weight: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.mse_loss: (input - target)^2, reduced, forward and backward in Triton.

    input and target: any shapes that broadcast (with torch's warning when they differ) and floating dtypes
    (promoted as torch does; float32 under autocast for 16-bit inputs, as torch). Returns a scalar, or the
    broadcast shape for "none". size_average and reduce: torch's deprecated forms of reduction, taken as
    torch takes them. weight (torch's elementwise weights, computed by torch with plain ops): not supported,
    NotImplementedError.
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    if weight is not None:
        raise NotImplementedError("gpunn mse_loss does not support weight= (use torch.nn.functional.mse_loss)")
    input, target = autocast.cast(input.device.type, input, target, to_float32=True)
    if not triton_runs_on(input.device) or not (input.is_floating_point() and target.is_floating_point()):
        return torch.nn.functional.mse_loss(input, target, reduction=reduction)  # which warns as below
    if input.shape != target.shape:
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. Please ensure they have "
                      "the same size.", stacklevel=2)
    dtype = torch.promote_types(input.dtype, target.dtype)  # torch broadcasts first: a 0-dim operand counts too
    input, target = torch.broadcast_tensors(input.to(dtype), target.to(dtype))
    # As (N,) vectors, each element a row for the ops' vmap fold (a view of the contiguous tensors; N spelled
    # out: under vmap over no samples a view cannot infer it).
    elements = input.numel()
    loss = _mse_loss(input.contiguous().view(elements), target.contiguous().view(elements), reduction, 0)
    return loss.view(input.shape) if reduction == "none" else loss


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """A drop-in for torch.nn.CrossEntropyLoss (it subclasses it) over class-index or class-probability
    targets: the same constructor (weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
    label_smoothing=0.0), buffer and behaviour; see gpunn.losses.cross_entropy for shapes and errors."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing)


class MSELoss(torch.nn.MSELoss):
    """A drop-in for torch.nn.MSELoss (it subclasses it); see gpunn.losses.mse_loss."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_loss(input, target, reduction=self.reduction)


__all__ = ["CrossEntropyLoss", "MSELoss", "cross_entropy", "mse_loss"]
