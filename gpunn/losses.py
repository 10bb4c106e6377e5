"""gpunn.CrossEntropyLoss and gpunn.MSELoss: drop-ins for the torch.nn losses whose forward and backward
run as fused Triton kernels (gpunn.kernels.losses), with their functional forms."""
from __future__ import annotations

import warnings

import torch

from .kernels import losses as kernels
from .kernels.runtime import triton_runs_on

REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


class CrossEntropyFunction(torch.autograd.Function):
    """The loss of logits (N, C) (unit column stride) against class indices (N,) int64; see
    gpunn.kernels.losses. Saved for backward: the logits, targets, weight and each row's logsumexp."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, smoothing, reduction):
        row_loss, row_weight, lse = kernels.cross_entropy_forward(logits, target, weight, ignore_index, smoothing)
        totals = None
        if reduction == "none":
            out = row_loss.to(logits.dtype)
        else:
            totals = kernels.sums(row_loss, row_weight)
            out = (totals[0] / totals[1] if reduction == "mean" else totals[0]).to(logits.dtype)
        ctx.save_for_backward(logits, target, weight, lse, totals)
        ctx.ignore_index, ctx.smoothing, ctx.reduction = ignore_index, smoothing, reduction
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("gpunn cross_entropy does not support double backward (create_graph=True)")
        logits, target, weight, lse, totals = ctx.saved_tensors
        dx = kernels.cross_entropy_backward(logits, target, weight, ctx.ignore_index, ctx.smoothing, lse,
                                            grad.contiguous(), ctx.reduction, totals)
        return dx, None, None, None, None, None


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.cross_entropy for class-index targets, in two fused Triton kernels (one pass
    over the logits forward, one backward).

    Args:
        input: logits (N, C), unbatched (C,), or (N, C, d1, ...); any strides.
        target: class indices (N,), (), or (N, d1, ...), int64 (uint8 too), each in [0, C) or ignore_index.
        weight: (C,) class weights or None. reduction: "mean" (over the weights of the rows kept), "sum" or
            "none". label_smoothing: in [0, 1].

    Returns:
        The loss: a scalar, or target's shape for "none"; in input's dtype.

    Raises:
        The errors torch raises for these arguments, with its types, before any kernel runs: ValueError for
        a bad reduction or batch-size mismatch, RuntimeError for a bad target dtype, weight shape or
        label_smoothing, IndexError for a target out of range (checked with one device sync).
        NotImplementedError for class-probability targets (a floating target of input's shape).
    """
    _check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if target.is_floating_point():
        raise NotImplementedError("gpunn cross_entropy takes class-index targets; class probabilities are not "
                                  "supported")
    if target.dtype not in (torch.int64, torch.uint8):
        name = str(target.dtype).split(".")[-1].title()
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {name}")
    if input.dim() == 0:
        raise IndexError("Dimension specified as 1 but tensor has no dimensions")
    classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    expected_target = (input.shape[0], *input.shape[2:]) if input.dim() > 1 else ()
    if input.dim() > 1 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                         f"({target.shape[0]}).")
    if tuple(target.shape) != expected_target:
        raise RuntimeError(f"expected target of shape {list(expected_target)} for input of shape "
                           f"{list(input.shape)}, got {list(target.shape)}")
    if weight is not None and tuple(weight.shape) != (classes,):
        raise RuntimeError(f"weight tensor should be defined either for all {classes} classes or no classes but "
                           f"got weight tensor of shape: {list(weight.shape)}")
    if not triton_runs_on(input.device) or not input.is_floating_point():
        return torch.nn.functional.cross_entropy(input, target, weight, ignore_index=ignore_index,
                                                 reduction=reduction, label_smoothing=label_smoothing)
    flat_target = target.reshape(-1).to(torch.int64)
    bad = ((flat_target < 0) & (flat_target != ignore_index)) | (flat_target >= classes)
    if bad.any():  # one sync: a bad index must not reach the kernels
        raise IndexError(f"Target {int(flat_target[bad][0])} is out of bounds.")
    logits = input.movedim(1, -1).reshape(-1, classes) if input.dim() > 1 else input.reshape(1, classes)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if weight is not None:
        weight = weight.to(input.dtype).contiguous()
    loss = CrossEntropyFunction.apply(logits, flat_target.contiguous(), weight, int(ignore_index),
                                      float(label_smoothing), reduction)
    return loss.reshape(target.shape) if reduction == "none" else loss


class MSEFunction(torch.autograd.Function):
    """The mean squared error of two contiguous tensors of one shape and dtype."""

    @staticmethod
    def forward(ctx, input, target, reduction):
        ctx.save_for_backward(input, target)
        ctx.reduction = reduction
        return kernels.mse_forward(input, target, reduction)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("gpunn mse_loss does not support double backward (create_graph=True)")
        input, target = ctx.saved_tensors
        dx, dy = kernels.mse_backward(input, target, grad, ctx.reduction, *ctx.needs_input_grad[:2])
        return dx, dy, None


def mse_loss(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """torch.nn.functional.mse_loss: (input - target)^2, reduced, forward and backward in Triton.

    input and target: any shapes that broadcast (with torch's warning when they differ) and floating dtypes
    (promoted as torch does). Returns a scalar, or the broadcast shape for "none".
    """
    _check_reduction(reduction)
    if input.shape != target.shape:
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. Please ensure they have "
                      "the same size.", stacklevel=2)
    if not triton_runs_on(input.device) or not (input.is_floating_point() and target.is_floating_point()):
        return torch.nn.functional.mse_loss(input, target, reduction=reduction)
    dtype = torch.result_type(input, target)
    input, target = torch.broadcast_tensors(input.to(dtype), target.to(dtype))
    return MSEFunction.apply(input.contiguous(), target.contiguous(), reduction)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """A drop-in for torch.nn.CrossEntropyLoss (it subclasses it) over class-index targets: the same
    constructor (weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
    label_smoothing=0.0), buffer and behaviour; see gpunn.losses.cross_entropy for shapes and errors."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing)


class MSELoss(torch.nn.MSELoss):
    """A drop-in for torch.nn.MSELoss (it subclasses it); see gpunn.losses.mse_loss."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_loss(input, target, self.reduction)


__all__ = ["CrossEntropyLoss", "MSELoss", "cross_entropy", "mse_loss"]
