"""The locally connected layer as custom ops over gpunn.kernels.local: gpunn::locally_connected (forward),
gpunn::locally_connected_grad_input and gpunn::locally_connected_grad_weight.

input (N, C, H, W), weight (O, L, R) (L = OH * OW positions, R = C * KH * KW taps), bias (O, L) or None,
window the kernels.local.Geometry as a list (Geometry.as_list) -> output (N, O, OH, OW).
Saved for backward: the input only if the weight needs a gradient, the weight only if the input does.
The gradient ops take the input's size without its batch, (C, H, W), and grad_weight a `groups` (see
library.Op): under torch.func.vmap over their batch arguments alone (the weight unbatched) each op folds the
samples into the batch, and the weight gradient sums each sample's images apart (per-sample gradients in one
launch a kernel; a call autograd records runs once per sample instead, see library._foldable).

The layer is bilinear in (input, weight), so each gradient op is a product of the same three kinds, and its
gradient is one of them again: derivatives of every order (create_graph=True) run on the three kernels.
With z = forward(x, W) + b:
    grad_input(dz, W)  = dx    gives g_dz = forward(g_dx, W), g_W = grad_weight(g_dx, dz)
    grad_weight(x, dz) = dW    gives g_dz = forward(x, g_dW) + g_db, g_x = grad_input(dz, g_dW)
Forward mode (jvp, first order) likewise: each op's tangent is the sum of the op over each tangent and the
other operand.
"""
from __future__ import annotations

import torch

from ..kernels import local
from ..kernels.local import Geometry
from ..kernels.runtime import grouped
from .library import Op, arrived, nothing, save, saved_tensors, sum_of


def _locally_connected(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      window: list[int]) -> torch.Tensor:
    """y (N, O, OH, OW) from input (N, C, H, W), weight (O, L, R), bias (O, L) or None; window: Geometry.as_list."""
    return local.forward(input, weight, bias, Geometry.of_list(window))


def _locally_connected_fake(input, weight, bias, window):
    oh, ow = Geometry.of_list(window).output_size(*input.shape[2:])
    return input.new_empty((input.shape[0], weight.shape[0], oh, ow))


def _grad_input(grad_output: torch.Tensor, weight: torch.Tensor, input_size: list[int],
                window: list[int]) -> torch.Tensor:
    """dx (N, C, H, W) of grad_output (N, O, OH, OW); input_size is (C, H, W)."""
    return local.grad_input(grad_output, weight, _input_shape(grad_output, input_size), Geometry.of_list(window))


def _grad_input_fake(grad_output, weight, input_size, window):
    return grad_output.new_empty(_input_shape(grad_output, input_size))


def _grad_weight(input: torch.Tensor | None, grad_output: torch.Tensor, input_size: list[int],
                 weight_shape: list[int], window: list[int], bias_grad: bool, groups: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW (O, L, R) when input is given, db (O, L) when bias_grad; each with a leading groups dim where
    groups > 0, see kernels.runtime.grouped), each nothing where not asked for."""
    dw, db = local.grad_weight(input, grad_output, _input_shape(grad_output, input_size), tuple(weight_shape),
                               Geometry.of_list(window), bias_grad, groups)
    return (dw if dw is not None else nothing(grad_output)), (db if db is not None else nothing(grad_output))


def _grad_weight_fake(input, grad_output, input_size, weight_shape, window, bias_grad, groups):
    dw = grad_output.new_empty(grouped(groups, weight_shape)) if input is not None else nothing(grad_output)
    return dw, grad_output.new_empty(grouped(groups, weight_shape[:2])) if bias_grad else nothing(grad_output)


def _input_shape(grad_output: torch.Tensor, input_size: list[int]) -> tuple[int, ...]:
    """(N, C, H, W): the batch is grad_output's (the gradient ops take the input's size without it, so that
    torch.func.vmap folds their samples into the batch)."""
    return (grad_output.shape[0], *input_size)


def _setup_context(ctx, inputs, output):
    input, weight, _, window = inputs
    need_input, need_weight = ctx.needs_input_grad[:2]
    save(ctx, input if need_weight else None, weight if need_input else None)
    ctx.window, ctx.input_size, ctx.weight_shape = window, list(input.shape[1:]), list(weight.shape)


def _backward(ctx, grad_output):
    input, weight = saved_tensors(ctx)
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    dx = dw = db = None
    if need_input:
        dx = grad_input(grad_output, weight, ctx.input_size, ctx.window)
    if need_weight or need_bias:
        dw, db = grad_weight(input if need_weight else None, grad_output, ctx.input_size, ctx.weight_shape,
                             ctx.window, need_bias, 0)
    return dx, dw if need_weight else None, db if need_bias else None, None


def _grad_input_setup_context(ctx, inputs, output):
    grad_output, weight, input_size, window = inputs
    need_grad_output, need_weight = ctx.needs_input_grad[:2]
    save(ctx, grad_output if need_weight else None, weight if need_grad_output else None)
    ctx.window, ctx.input_size, ctx.weight_shape = window, input_size, list(weight.shape)
    ctx.input_shape = _input_shape(grad_output, input_size)


def _grad_input_backward(ctx, grad_dx):
    grad_output, weight = saved_tensors(ctx)
    need_grad_output, need_weight = ctx.needs_input_grad[:2]
    grad_dx = arrived(grad_dx, ctx.input_shape)
    if grad_dx is None:
        return None, None, None, None
    grad_grad_output = locally_connected(grad_dx, weight, None, ctx.window) if need_grad_output else None
    grad_weight_ = grad_weight(grad_dx, grad_output, ctx.input_size, ctx.weight_shape, ctx.window,
                               False, 0)[0] if need_weight else None
    return grad_grad_output, grad_weight_, None, None


def _grad_weight_setup_context(ctx, inputs, output):
    input, grad_output, input_size, weight_shape, window, *_ = inputs
    need_input, need_grad_output = ctx.needs_input_grad[:2]
    save(ctx, input if need_grad_output else None, grad_output if need_input else None)
    ctx.window, ctx.input_size, ctx.weight_shape = window, input_size, weight_shape
    ctx.output_shape = list(grad_output.shape)


def _grad_weight_backward(ctx, grad_dw, grad_db):
    # groups is 0 here (library._ungrouped)
    input, grad_output = saved_tensors(ctx)
    need_input, need_grad_output = ctx.needs_input_grad[:2]
    grad_dw, grad_db = arrived(grad_dw, ctx.weight_shape), arrived(grad_db, ctx.weight_shape[:2])
    grad_input_ = grad_grad_output = None
    if need_input and grad_dw is not None:
        grad_input_ = grad_input(grad_output, grad_dw, ctx.input_size, ctx.window)
    if need_grad_output and grad_dw is not None:
        grad_grad_output = locally_connected(input, grad_dw, grad_db, ctx.window)
    elif need_grad_output and grad_db is not None:  # db sums dz over the batch: g_db reaches every sample
        grad_grad_output = grad_db.view(1, *ctx.output_shape[1:]).expand(ctx.output_shape)
    return grad_input_, grad_grad_output, None, None, None, None, None


# Forward mode's rules (library.Op's jvp): each op is bilinear, so its tangent is the sum of the op over one
# tangent and the other operand, term by term (added by torch).

def _jvp(args, outputs, tangents):
    input, weight, _, window = args
    t_input, t_weight, t_bias = tangents[:3]
    if t_input is None and t_weight is None:  # b' alone: the same for every image
        if t_bias is None:
            return None
        expanded = t_bias.view(1, *outputs[0].shape[1:]).expand(outputs[0].shape)
        return expanded.clone(memory_format=torch.contiguous_format)  # its own tensor, not a view of b'
    return sum_of(locally_connected(t_input, weight, t_bias, window) if t_input is not None else None,
                locally_connected(input, t_weight, t_bias if t_input is None else None, window)
                if t_weight is not None else None)


def _grad_input_jvp(args, outputs, tangents):
    grad_output, weight, input_size, window = args
    t_grad_output, t_weight = tangents[:2]
    return sum_of(grad_input(t_grad_output, weight, input_size, window) if t_grad_output is not None else None,
                grad_input(grad_output, t_weight, input_size, window) if t_weight is not None else None)


def _grad_weight_jvp(args, outputs, tangents):
    # groups is 0 here: a fold with groups declines under forward mode (library._unrecorded_or_plain)
    input, grad_output, input_size, weight_shape, window, bias_grad, _ = args
    t_input, t_grad_output = tangents[:2]
    t_dw = t_db = None
    if t_grad_output is not None:  # dW' = dW(x, dz') + dW(x', dz); db' = db(dz')
        t_dw, t_db = grad_weight(input, t_grad_output, input_size, weight_shape, window, bias_grad, 0)
    if t_input is not None and input is not None:
        t_dw = sum_of(t_dw, grad_weight(t_input, grad_output, input_size, weight_shape, window, False, 0)[0])
    return t_dw, t_db


# Under torch.func.vmap over their batch arguments (the input, grad_output) alone, these fold the samples into
# the batch, and the weight and bias gradients come out per sample (Op's rows and groups).
grad_input = Op("locally_connected_grad_input", _grad_input, _grad_input_fake, _grad_input_setup_context,
                _grad_input_backward, rows={0: 3}, jvp=_grad_input_jvp)
grad_weight = Op("locally_connected_grad_weight", _grad_weight, _grad_weight_fake, _grad_weight_setup_context,
                 _grad_weight_backward, rows={0: 3, 1: 3}, groups=6, jvp=_grad_weight_jvp)


locally_connected = Op("locally_connected", _locally_connected, _locally_connected_fake, _setup_context, _backward,
                       rows={0: 3}, jvp=_jvp)
