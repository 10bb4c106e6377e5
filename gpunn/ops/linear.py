"""The fused dense layer, and its masked (block-sparse) form, as one torch.autograd.Function over
gpunn.kernels.dense and gpunn.kernels.masked."""
from __future__ import annotations

import functools

import torch

from ..kernels import activations, dense, masked
from ..kernels.runtime import Rows


def _launcher(layout, name: str):
    """The dense launcher `name`, or the masked one bound to `layout`."""
    return getattr(dense, name) if layout is None else functools.partial(getattr(masked, name), layout=layout)


class LinearFunction(torch.autograd.Function):
    """y = act(input @ (weight * mask)^T + bias), forward and backward in Triton.

    input (*, K), weight (N, K), bias (N,) or None -> output (*, N), all of one floating dtype;
    activation and negative_slope as in gpunn.functional.linear; will_backward says whether autograd
    records the call (then forward writes act'(z) where backward needs it); layout: None for the dense
    layer, or the mask's kernels.layout.BlockLayout (masked-out weights are never read and get
    exactly zero gradient). No double backward.

    Saved for backward, the least that gives exact gradients: the input only if weight needs a
    gradient, the weight only if input does, plus what the activation's derivative needs (nothing,
    the output, or act'(z) written by the forward kernel; see gpunn.kernels.activations).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, activation, negative_slope, will_backward, layout):
        # will_backward: whether autograd records this call (grad mode on, some input requiring grad).
        # ctx.needs_input_grad alone cannot tell: it is set under no_grad too.
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_from = activations.grad_source(activation, negative_slope)
        save_derivative = will_backward and grad_from == activations.GRAD_FROM_SAVED.value
        output, derivative = _launcher(layout, "forward")(
            Rows.of(input), weight, bias, activation, negative_slope, save_derivative,
            out_shape=(*input.shape[:-1], weight.shape[0]))

        saved = {activations.GRAD_FROM_OUTPUT.value: output, activations.GRAD_FROM_SAVED.value: derivative}
        ctx.save_for_backward(input if need_weight else None, weight if need_input else None,
                              saved.get(grad_from))
        ctx.activation, ctx.negative_slope = activation, negative_slope
        ctx.input_shape, ctx.weight_shape, ctx.layout = input.shape, tuple(weight.shape), layout
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' gradients are not differentiable; refuse rather than hand
            # back gradients that silently act as constants in a second differentiation.
            raise RuntimeError("gpunn linear does not support double backward (create_graph=True)")
        input, weight, saved = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        n = ctx.weight_shape[0]
        dy = Rows.of(grad_output)
        saved = saved.reshape(dy.m, n) if saved is not None else None
        grad_input = grad_weight = grad_bias = None
        if need_input:
            grad_input = _launcher(ctx.layout, "grad_input")(dy, saved, weight, ctx.activation, ctx.negative_slope)
            grad_input = grad_input.view(ctx.input_shape)
        if need_weight or need_bias:
            grad_weight, grad_bias = _launcher(ctx.layout, "grad_weight")(
                dy, saved, Rows.of(input) if need_weight else None, ctx.weight_shape,
                ctx.activation, ctx.negative_slope, need_bias)
        return grad_input, grad_weight, grad_bias, None, None, None, None
