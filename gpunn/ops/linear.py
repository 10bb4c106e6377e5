"""The fused dense layer and its masked (block-sparse) form as ops over gpunn.kernels.dense and
gpunn.kernels.masked: gpunn::linear (forward), gpunn::linear_grad_input and gpunn::linear_grad_weight.

y = act(input @ (weight * mask)^T + bias): input (*, K), weight (N, K), bias (N,) or None, all of one
floating dtype -> output (*, N); mask None for the dense layer, or the mask as the kernels' layout is
found from it (a bool (N, K) mask, or a BlockLayout's own uint8 copy; see kernels.layout.layout_of) with
the layout's block (block_n, block_k). Masked-out weights are never read and get exactly zero gradient.

Saved for backward, the least that gives exact gradients: the input only if weight needs a gradient, the
weight only if input does, plus what the activation's derivative needs (nothing, the output, or act'(z),
written by the forward kernel when save_derivative; see gpunn.kernels.activations). No double backward.
"""
from __future__ import annotations

import functools
import math

import torch

from ..kernels import activations, dense, masked
from ..kernels.layout import layout_of
from ..kernels.runtime import Rows
from .library import Op, metadata_to_save, nothing, refuse_double_backward, saved_metadata


def _launcher(mask, block_n: int, block_k: int, name: str):
    """The dense launcher `name`, or the masked one bound to the mask's layout."""
    if mask is None:
        return getattr(dense, name)
    return functools.partial(getattr(masked, name), layout=layout_of(mask, (block_n, block_k)))


def _as_rows(saved: torch.Tensor | None, dy: Rows) -> torch.Tensor | None:
    """What forward saved (the output, or act'(z)) as (M, N), matching dy's rows."""
    return saved.reshape(dy.m, saved.shape[-1]) if saved is not None else None


def _grad_input(grad_output: torch.Tensor, saved: torch.Tensor | None, weight: torch.Tensor,
                mask: torch.Tensor | None, block_n: int, block_k: int, activation: str | None,
                negative_slope: float) -> torch.Tensor:
    """dx (*, K) of grad_output (*, N)."""
    dy = Rows.of(grad_output)
    dx = _launcher(mask, block_n, block_k, "grad_input")(dy, _as_rows(saved, dy), weight, activation, negative_slope)
    return dx.view(*grad_output.shape[:-1], weight.shape[1])


def _grad_input_fake(grad_output, saved, weight, mask, block_n, block_k, activation, negative_slope):
    return grad_output.new_empty((*grad_output.shape[:-1], weight.shape[1]))


def _grad_weight(grad_output: torch.Tensor, saved: torch.Tensor | None, input: torch.Tensor | None,
                 weight_shape: list[int], mask: torch.Tensor | None, block_n: int, block_k: int,
                 activation: str | None, negative_slope: float, bias_grad: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW (N, K) when input is given, db (N,) when bias_grad), each nothing where not asked for."""
    dy = Rows.of(grad_output)
    dw, db = _launcher(mask, block_n, block_k, "grad_weight")(
        dy, _as_rows(saved, dy), Rows.of(input) if input is not None else None, tuple(weight_shape),
        activation, negative_slope, bias_grad)
    return (dw if dw is not None else nothing(grad_output)), (db if db is not None else nothing(grad_output))


def _grad_weight_fake(grad_output, saved, input, weight_shape, mask, block_n, block_k, activation, negative_slope,
                      bias_grad):
    dw = grad_output.new_empty(weight_shape) if input is not None else nothing(grad_output)
    return dw, grad_output.new_empty(weight_shape[:1]) if bias_grad else nothing(grad_output)


grad_input = Op("linear_grad_input", _grad_input, _grad_input_fake)
grad_weight = Op("linear_grad_weight", _grad_weight, _grad_weight_fake)


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
            block_n: int, block_k: int, activation: str | None, negative_slope: float, save_derivative: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (*, N), act'(z) (M, N) when save_derivative, else nothing)."""
    output, derivative = _launcher(mask, block_n, block_k, "forward")(
        Rows.of(input), weight, bias, activation, negative_slope, save_derivative,
        out_shape=(*input.shape[:-1], weight.shape[0]))
    return output, derivative if derivative is not None else nothing(output)


def _linear_fake(input, weight, bias, mask, block_n, block_k, activation, negative_slope, save_derivative):
    output = input.new_empty((*input.shape[:-1], weight.shape[0]))
    rows = math.prod(input.shape[:-1])
    return output, input.new_empty((rows, weight.shape[0])) if save_derivative else nothing(output)


def _setup_context(ctx, inputs, output):
    input, weight, bias, mask, block_n, block_k, activation, negative_slope, _ = inputs
    need_input, need_weight = ctx.needs_input_grad[:2]
    grad_from = activations.grad_source(activation, negative_slope)
    saved = {activations.GRAD_FROM_OUTPUT.value: output[0], activations.GRAD_FROM_SAVED.value: output[1]}
    ctx.save_for_backward(input if need_weight else None, weight if need_input else None, saved.get(grad_from),
                          metadata_to_save(ctx, "mask", mask))
    ctx.options = dict(block_n=block_n, block_k=block_k, activation=activation, negative_slope=negative_slope)
    ctx.weight_shape = list(weight.shape)


def _backward(ctx, grad_output, _):
    refuse_double_backward("linear")
    input, weight, saved, mask = ctx.saved_tensors
    mask = saved_metadata(ctx, "mask", mask)
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    dx = dw = db = None
    options = ctx.options
    if need_input:
        dx = grad_input(grad_output, saved, weight, mask, options["block_n"], options["block_k"],
                        options["activation"], options["negative_slope"])
    if need_weight or need_bias:
        dw, db = grad_weight(grad_output, saved, input if need_weight else None, ctx.weight_shape, mask,
                             options["block_n"], options["block_k"], options["activation"], options["negative_slope"],
                             need_bias)
    return (dx, dw if need_weight else None, db if need_bias else None) + (None,) * 6


linear = Op("linear", _linear, _linear_fake, _setup_context, _backward)
