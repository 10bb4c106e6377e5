"""The locally connected layer as a torch.autograd.Function over gpunn.kernels.local."""
from __future__ import annotations

import torch

from ..kernels import local


class LocallyConnectedFunction(torch.autograd.Function):
    """y = locally connected layer of x, forward and backward in Triton.

    input (N, C, H, W), weight (O, L, R) (L = OH * OW positions, R = C * KH * KW taps), bias (O, L) or
    None, geometry a kernels.local.Geometry -> output (N, O, OH, OW). Saved for backward: the input only if
    the weight needs a gradient, the weight only if the input does. No double backward.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, geometry):
        need_input, need_weight = ctx.needs_input_grad[:2]
        ctx.save_for_backward(input if need_weight else None, weight if need_input else None)
        ctx.geometry, ctx.input_shape, ctx.weight_shape = geometry, tuple(input.shape), tuple(weight.shape)
        return local.forward(input, weight, bias, geometry)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError("gpunn locally connected layers do not support double backward (create_graph=True)")
        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if need_input:
            grad_input = local.grad_input(grad_output, weight, ctx.input_shape, ctx.geometry)
        if need_weight or need_bias:
            grad_weight, grad_bias = local.grad_weight(input if need_weight else None, grad_output, ctx.input_shape,
                                                       ctx.weight_shape, ctx.geometry, need_bias)
        return grad_input, grad_weight, grad_bias, None
