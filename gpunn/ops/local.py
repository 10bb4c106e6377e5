"""The locally connected layer as custom ops over gpunn.kernels.local: gpunn::locally_connected (forward),
gpunn::locally_connected_grad_input and gpunn::locally_connected_grad_weight.

input (N, C, H, W), weight (O, L, R) (L = OH * OW positions, R = C * KH * KW taps), bias (O, L) or None,
window the kernels.local.Geometry as a list (Geometry.as_list) -> output (N, O, OH, OW).
Saved for backward: the input only if the weight needs a gradient, the weight only if the input does.

The layer is bilinear in (input, weight), so each gradient op is a product of the same three kinds, and its
gradient is one of them again: derivatives of every order (create_graph=True) run on the three kernels.
With z = forward(x, W) + b:
    grad_input(dz, W)  = dx    gives g_dz = forward(g_dx, W), g_W = grad_weight(g_dx, dz)
    grad_weight(x, dz) = dW    gives g_dz = forward(x, g_dW) + g_db, g_x = grad_input(dz, g_dW)
"""
from __future__ import annotations

import torch

from ..kernels import local
from ..kernels.local import Geometry
from .library import Op, arrived, nothing


def _locally_connected(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      window: list[int]) -> torch.Tensor:
    return local.forward(input, weight, bias, Geometry.of_list(window))


def _locally_connected_fake(input, weight, bias, window):
    oh, ow = Geometry.of_list(window).output_size(*input.shape[2:])
    return input.new_empty((input.shape[0], weight.shape[0], oh, ow))


def _grad_input(grad_output: torch.Tensor, weight: torch.Tensor, input_shape: list[int],
               window: list[int]) -> torch.Tensor:
    return local.grad_input(grad_output, weight, tuple(input_shape), Geometry.of_list(window))


def _grad_input_fake(grad_output, weight, input_shape, window):
    return grad_output.new_empty(input_shape)


def _grad_weight(input: torch.Tensor | None, grad_output: torch.Tensor, input_shape: list[int],
                weight_shape: list[int], window: list[int], bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW (O, L, R) when input is given, db (O, L) when bias_grad), each nothing where not asked for."""
    dw, db = local.grad_weight(input, grad_output, tuple(input_shape), tuple(weight_shape), Geometry.of_list(window),
                               bias_grad)
    return (dw if dw is not None else nothing(grad_output)), (db if db is not None else nothing(grad_output))


def _grad_weight_fake(input, grad_output, input_shape, weight_shape, window, bias_grad):
    dw = grad_output.new_empty(weight_shape) if input is not None else nothing(grad_output)
    return dw, grad_output.new_empty(weight_shape[:2]) if bias_grad else nothing(grad_output)


def _setup_context(ctx, inputs, output):
    input, weight, _, window = inputs
    need_input, need_weight = ctx.needs_input_grad[:2]
    ctx.save_for_backward(input if need_weight else None, weight if need_input else None)
    ctx.window, ctx.input_shape, ctx.weight_shape = window, list(input.shape), list(weight.shape)


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    dx = dw = db = None
    if need_input:
        dx = grad_input(grad_output, weight, ctx.input_shape, ctx.window)
    if need_weight or need_bias:
        dw, db = grad_weight(input if need_weight else None, grad_output, ctx.input_shape, ctx.weight_shape,
                             ctx.window, need_bias)
    return dx, dw if need_weight else None, db if need_bias else None, None


def _grad_input_setup_context(ctx, inputs, output):
    grad_output, weight, input_shape, window = inputs
    need_grad_output, need_weight = ctx.needs_input_grad[:2]
    ctx.save_for_backward(grad_output if need_weight else None, weight if need_grad_output else None)
    ctx.window, ctx.input_shape, ctx.weight_shape = window, input_shape, list(weight.shape)


def _grad_input_backward(ctx, grad_dx):
    grad_output, weight = ctx.saved_tensors
    need_grad_output, need_weight = ctx.needs_input_grad[:2]
    grad_dx = arrived(grad_dx, ctx.input_shape)
    if grad_dx is None:
        return None, None, None, None
    grad_grad_output = locally_connected(grad_dx, weight, None, ctx.window) if need_grad_output else None
    grad_weight_ = grad_weight(grad_dx, grad_output, ctx.input_shape, ctx.weight_shape, ctx.window,
                               False)[0] if need_weight else None
    return grad_grad_output, grad_weight_, None, None


def _grad_weight_setup_context(ctx, inputs, output):
    input, grad_output, input_shape, weight_shape, window, _ = inputs
    need_input, need_grad_output = ctx.needs_input_grad[:2]
    ctx.save_for_backward(input if need_grad_output else None, grad_output if need_input else None)
    ctx.window, ctx.input_shape, ctx.weight_shape = window, input_shape, weight_shape
    ctx.output_shape = list(grad_output.shape)


def _grad_weight_backward(ctx, grad_dw, grad_db):
    input, grad_output = ctx.saved_tensors
    need_input, need_grad_output = ctx.needs_input_grad[:2]
    grad_dw, grad_db = arrived(grad_dw, ctx.weight_shape), arrived(grad_db, ctx.weight_shape[:2])
    grad_input_ = grad_grad_output = None
    if need_input and grad_dw is not None:
        grad_input_ = grad_input(grad_output, grad_dw, ctx.input_shape, ctx.window)
    if need_grad_output and grad_dw is not None:
        grad_grad_output = locally_connected(input, grad_dw, grad_db, ctx.window)
    elif need_grad_output and grad_db is not None:  # db sums dz over the batch: g_db reaches every sample
        grad_grad_output = grad_db.view(1, *ctx.output_shape[1:]).expand(ctx.output_shape)
    return grad_input_, grad_grad_output, None, None, None, None


grad_input = Op("locally_connected_grad_input", _grad_input, _grad_input_fake, _grad_input_setup_context,
                _grad_input_backward)
grad_weight = Op("locally_connected_grad_weight", _grad_weight, _grad_weight_fake, _grad_weight_setup_context,
                 _grad_weight_backward)


locally_connected = Op("locally_connected", _locally_connected, _locally_connected_fake, _setup_context, _backward,
                       rows={0: 3})
