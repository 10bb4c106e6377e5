"""The fused dense layer and its masked (block-sparse) form as ops over gpunn.kernels.dense and
gpunn.kernels.masked: gpunn::linear (forward), gpunn::linear_grad_input and gpunn::linear_grad_weight, and
the dense layer's gpunn::linear_grad_preactivation (dz = dy * act'(z) and db, before its two GEMMs).

y = act(input @ (weight * mask)^T + bias): input (*, K), weight (N, K), bias (N,) or None, all of one
floating dtype -> output (*, N); mask None for the dense layer, or the mask as the kernels' layout is
found from it (a bool (N, K) mask, or a BlockLayout's own uint8 copy; see kernels.layout.layout_of) with
the layout's block (block_n, block_k). Masked-out weights are never read and get exactly zero gradient.

Saved for backward, the least that gives exact gradients: the input only if weight needs a gradient, the
weight only if input does, plus what the activation's derivative needs (nothing, the output, or act'(z),
written by the forward kernel when save_derivative; see gpunn.kernels.activations). No double backward.
"""
from __future__ import annotations

import math

import torch

from ..kernels import activations, dense, masked
from ..kernels.layout import layout_of
from ..kernels.runtime import Rows
from .library import Op, metadata_to_save, nothing, refuse_double_backward, saved_metadata


def _as_rows(saved: torch.Tensor | None, dy: Rows) -> torch.Tensor | None:
    """What forward saved (the output, or act'(z)) as (M, N), matching dy's rows."""
    return saved.reshape(dy.m, saved.shape[-1]) if saved is not None else None


def _layout(mask: torch.Tensor, block_n: int, block_k: int):
    return layout_of(mask, (block_n, block_k))


def _check_dense_takes_dz(saved: torch.Tensor | None, activation: str | None) -> None:
    if saved is not None or activation is not None:
        raise ValueError("gpunn's dense gradient GEMMs take dz (linear_grad_preactivation's), not an activation "
                         "and what its forward saved")


def _grad_preactivation(grad_output: torch.Tensor, saved: torch.Tensor | None, activation: str | None,
                        negative_slope: float, write_dz: bool, bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense layer's (dz (*, N) when write_dz, db (N,) when bias_grad), each nothing where not asked for."""
    if saved is None and activations.grad_source(activation, negative_slope) != activations.GRAD_IS_DY.value:
        raise ValueError(f"gpunn linear_grad_preactivation: {activation} needs the tensor its forward saved")
    dy = Rows.of(grad_output)
    dz, db = dense.grad_preactivation(dy, _as_rows(saved, dy), activation, negative_slope, write_dz, bias_grad)
    return (dz.view(grad_output.shape) if dz is not None else nothing(grad_output)), \
        (db if db is not None else nothing(grad_output))


def _grad_preactivation_fake(grad_output, saved, activation, negative_slope, write_dz, bias_grad):
    return (grad_output.new_empty(grad_output.shape) if write_dz else nothing(grad_output)), \
        (grad_output.new_empty(grad_output.shape[-1:]) if bias_grad else nothing(grad_output))


def _grad_input(grad_output: torch.Tensor, saved: torch.Tensor | None, weight: torch.Tensor,
                mask: torch.Tensor | None, block_n: int, block_k: int, activation: str | None,
                negative_slope: float) -> torch.Tensor:
    """dx (*, K) of grad_output (*, N): the dense layer's takes dz (activation None, nothing saved)."""
    dy = Rows.of(grad_output)
    if mask is None:
        _check_dense_takes_dz(saved, activation)
        dx = dense.grad_input(dy, weight)
    else:
        dx = masked.grad_input(dy, _as_rows(saved, dy), weight, activation, negative_slope,
                               layout=_layout(mask, block_n, block_k))
    return dx.view(*grad_output.shape[:-1], weight.shape[1])


def _grad_input_fake(grad_output, saved, weight, mask, block_n, block_k, activation, negative_slope):
    return grad_output.new_empty((*grad_output.shape[:-1], weight.shape[1]))


def _grad_weight(grad_output: torch.Tensor, saved: torch.Tensor | None, input: torch.Tensor | None,
                 weight_shape: list[int], mask: torch.Tensor | None, block_n: int, block_k: int,
                 activation: str | None, negative_slope: float, bias_grad: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW (N, K) when input is given, db (N,) when bias_grad), each nothing where not asked for. The dense
    layer's takes dz (activation None, nothing saved; its backward has db from _grad_preactivation's pass)."""
    dy = Rows.of(grad_output)
    x = Rows.of(input) if input is not None else None
    if mask is None:
        _check_dense_takes_dz(saved, activation)
        dw = dense.grad_weight(dy, x, tuple(weight_shape)) if x is not None else None
        db = dense.grad_bias(dy) if bias_grad else None
    else:
        dw, db = masked.grad_weight(dy, _as_rows(saved, dy), x, tuple(weight_shape), activation, negative_slope,
                                    bias_grad, layout=_layout(mask, block_n, block_k))
    return (dw if dw is not None else nothing(grad_output)), (db if db is not None else nothing(grad_output))


def _grad_weight_fake(grad_output, saved, input, weight_shape, mask, block_n, block_k, activation, negative_slope,
                      bias_grad):
    dw = grad_output.new_empty(weight_shape) if input is not None else nothing(grad_output)
    return dw, grad_output.new_empty(weight_shape[:1]) if bias_grad else nothing(grad_output)


grad_preactivation = Op("linear_grad_preactivation", _grad_preactivation, _grad_preactivation_fake)
grad_input = Op("linear_grad_input", _grad_input, _grad_input_fake)
grad_weight = Op("linear_grad_weight", _grad_weight, _grad_weight_fake)


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
            block_n: int, block_k: int, activation: str | None, negative_slope: float, save_derivative: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (*, N), act'(z) (M, N) when save_derivative, else nothing)."""
    x, out_shape = Rows.of(input), (*input.shape[:-1], weight.shape[0])
    if mask is None:
        output, derivative = dense.forward(x, weight, bias, activation, negative_slope, save_derivative, out_shape)
    else:
        output, derivative = masked.forward(x, weight, bias, activation, negative_slope, save_derivative, out_shape,
                                            layout=_layout(mask, block_n, block_k))
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
    options = ctx.options
    activation, negative_slope = options["activation"], options["negative_slope"]
    dx = dw = db = None
    if mask is None:
        # The dense layer forms dz = dy * act'(z) and db in one pass, then runs two plain GEMMs on dz. Formed
        # inside the GEMMs' loops instead, dz left the MMA operand in registers: 1.6-2.3x slower (bench/NOTES.md).
        shaped = activations.grad_source(activation, negative_slope) != activations.GRAD_IS_DY.value
        write_dz = shaped and (need_input or need_weight)
        if write_dz or need_bias:
            dz, db = grad_preactivation(grad_output, saved, activation, negative_slope, write_dz, need_bias)
            grad_output = dz if write_dz else grad_output
        saved, activation = None, None
    block_n, block_k = options["block_n"], options["block_k"]
    if need_input:
        dx = grad_input(grad_output, saved, weight, mask, block_n, block_k, activation, negative_slope)
    masked_bias = need_bias and mask is not None
    if need_weight or masked_bias:
        dw, masked_db = grad_weight(grad_output, saved, input if need_weight else None, ctx.weight_shape, mask,
                                    block_n, block_k, activation, negative_slope, masked_bias)
        db = masked_db if masked_bias else db
    return (dx, dw if need_weight else None, db if need_bias else None) + (None,) * 6


linear = Op("linear", _linear, _linear_fake, _setup_context, _backward)
