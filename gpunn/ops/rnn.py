"""The Elman RNN step as custom ops over gpunn.kernels.rnn: gpunn::rnn_cell (forward),
gpunn::rnn_cell_grad_input and gpunn::rnn_cell_grad_weight.

h' = act(input W_ih^T + b_ih + hx W_hh^T + b_hh): input (B, I), hx (B, H), weight_ih (H, I), weight_hh
(H, H), bias_ih and bias_hh (H,) or both None; activation "tanh" or "relu". Saved for backward: h' (its
derivative comes from it), the input only if weight_ih needs a gradient, hx only if weight_hh does, the
weights only if input or hx need theirs.

Double backward (create_graph=True): the step is the dense layer act([x | hx] [W_ih | W_hh]^T + b_ih + b_hh),
so its backward then runs as the dense layer's differentiable backward op (gpunn::linear_backward) over the
operands side by side, and the gradients split back; no third order. For that the cell keeps references to
what first order does not save (inputs, weights, biases), as the dense layer does (gpunn.ops.linear).
Forward mode: the dense layer's tangent over the same operands side by side (and, through double backward's
op, forward mode over the first-order backward: torch.func.hessian).
"""
from __future__ import annotations

import torch

from ..kernels import rnn
from . import linear
from .library import (Op, differentiable_backward, first_order_saved, kept, nothing, save_for_orders, sum_of,
                      took_duals)


def _rnn_cell(input: torch.Tensor, hx: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
             bias_ih: torch.Tensor | None, bias_hh: torch.Tensor | None, activation: str) -> torch.Tensor:
    """h' (B, H) from input (B, I), hx (B, H), weight_ih (H, I), weight_hh (H, H), biases (H,) (both or neither)."""
    return rnn.forward(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, activation)


def _rnn_cell_fake(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, activation):
    return input.new_empty((input.shape[0], weight_ih.shape[0]))


def _grad_input(grad_output: torch.Tensor, output: torch.Tensor, weight_ih: torch.Tensor | None,
               weight_hh: torch.Tensor | None, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (B, I) when weight_ih is given, dh (B, H) when weight_hh is given), each nothing otherwise."""
    dx, dh = rnn.grad_input(grad_output.contiguous(), output, weight_ih, weight_hh, activation)
    return (dx if dx is not None else nothing(output)), (dh if dh is not None else nothing(output))


def _grad_input_fake(grad_output, output, weight_ih, weight_hh, activation):
    dx = output.new_empty((output.shape[0], weight_ih.shape[1])) if weight_ih is not None else nothing(output)
    return dx, output.new_empty(output.shape) if weight_hh is not None else nothing(output)


def _grad_weight(grad_output: torch.Tensor, output: torch.Tensor, input: torch.Tensor | None, hx: torch.Tensor | None,
                input_size: int, activation: str, bias_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dW_ih (H, I) when input is given, dW_hh (H, H) when hx is given, db_ih and db_hh (H,) when bias_grad),
    each nothing otherwise."""
    grads = rnn.grad_weight(grad_output.contiguous(), output, input, hx, input_size, activation, bias_grad)
    return tuple(g if g is not None else nothing(output) for g in grads)


def _grad_weight_fake(grad_output, output, input, hx, input_size, activation, bias_grad):
    hidden = output.shape[1]
    shapes = ((hidden, input_size) if input is not None else None, (hidden, hidden) if hx is not None else None,
              *(((hidden,),) * 2 if bias_grad else (None, None)))
    return tuple(output.new_empty(s) if s is not None else nothing(output) for s in shapes)


grad_input = Op("rnn_cell_grad_input", _grad_input, _grad_input_fake)
grad_weight = Op("rnn_cell_grad_weight", _grad_weight, _grad_weight_fake)


def _setup_context(ctx, inputs, output):
    input, hx, weight_ih, weight_hh, bias_ih, bias_hh, activation = inputs
    need_x, need_h, need_wih, need_whh = ctx.needs_input_grad[:4]
    save_for_orders(ctx, (output, input if need_wih else None, hx if need_whh else None,
                          weight_ih if need_x else None, weight_hh if need_h else None),
                    (input if not need_wih else None, hx if not need_whh else None,
                     weight_ih if not need_x else None, weight_hh if not need_h else None, bias_ih, bias_hh))
    ctx.activation, ctx.input_size = activation, weight_ih.shape[1]


def _backward(ctx, grad_output):
    if differentiable_backward(ctx) or took_duals(ctx, grad_output):  # create_graph=True, or a dual reaching it
        return _differentiable_backward(ctx, grad_output)
    output, input, hx, weight_ih, weight_hh = first_order_saved(ctx)
    need_x, need_h, _, _, need_bih, need_bhh = ctx.needs_input_grad[:6]
    dx = dh = dw_ih = dw_hh = db_ih = db_hh = None
    if need_x or need_h:
        dx, dh = grad_input(grad_output, output, weight_ih, weight_hh, ctx.activation)
    if input is not None or hx is not None or need_bih or need_bhh:
        dw_ih, dw_hh, db_ih, db_hh = grad_weight(grad_output, output, input, hx, ctx.input_size, ctx.activation,
                                                 need_bih or need_bhh)
    return (dx if need_x else None, dh if need_h else None, dw_ih if input is not None else None,
            dw_hh if hx is not None else None, db_ih if need_bih else None, db_hh if need_bhh else None, None)


def _differentiable_backward(ctx, grad_output):
    """The gradients as the dense layer's backward op over [x | hx] and [W_ih | W_hh] (see the module docstring)."""
    output, *saved = first_order_saved(ctx)
    input, hx, weight_ih, weight_hh, bias_ih, bias_hh = (
        kept(ctx, i, tensor, "RNNCell", name) for i, (tensor, name) in enumerate(zip(
            (*saved, None, None), ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"))))
    need_x, need_h, need_wih, need_whh, need_bih, need_bhh = ctx.needs_input_grad[:6]
    bias = bias_ih + bias_hh if bias_ih is not None else None
    joined_input, joined_weight = torch.cat([input, hx], 1), torch.cat([weight_ih, weight_hh], 1)
    dx_dh, dw, db = linear.backward(grad_output, output, joined_input, joined_weight, bias, None, 0, 0, ctx.activation,
                                    0.0, need_x or need_h, need_wih or need_whh, need_bih or need_bhh, 0, 0)
    sizes = [ctx.input_size, hx.shape[1]]
    dx, dh = dx_dh.split(sizes, 1) if need_x or need_h else (None, None)
    dw_ih, dw_hh = dw.split(sizes, 1) if need_wih or need_whh else (None, None)
    return (dx if need_x else None, dh if need_h else None, dw_ih if need_wih else None, dw_hh if need_whh else None,
            db if need_bih else None, (db.clone() if need_bih else db) if need_bhh else None, None)


def _jvp(args, outputs, tangents):
    """Forward mode's rule: the step's tangent as the dense layer's (linear_tangent) over [x | hx] and
    [W_ih | W_hh] (see the module docstring), zeros standing in for the tangent of one operand of a pair."""
    input, hx, weight_ih, weight_hh, bias_ih, bias_hh, activation = args
    t_input, t_hx, t_weight_ih, t_weight_hh, t_bias_ih, t_bias_hh = tangents[:6]
    pairs = ((t_input, input), (t_hx, hx)), ((t_weight_ih, weight_ih), (t_weight_hh, weight_hh))
    t_joined_input, t_joined_weight = (
        torch.cat([t if t is not None else torch.zeros_like(like) for t, like in pair], 1)
        if any(t is not None for t, _ in pair) else None for pair in pairs)
    t_bias = sum_of(t_bias_ih, t_bias_hh)
    if t_joined_input is None and t_joined_weight is None and t_bias is None:
        return None
    return linear.tangent(torch.cat([input, hx], 1), torch.cat([weight_ih, weight_hh], 1), outputs[0], None, 0, 0,
                          activation, t_joined_input, t_joined_weight, t_bias)


rnn_cell = Op("rnn_cell", _rnn_cell, _rnn_cell_fake, _setup_context, _backward, rows={0: 1, 1: 1}, jvp=_jvp)
