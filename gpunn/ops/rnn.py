"""The Elman RNN step as a torch.autograd.Function over gpunn.kernels.rnn."""
from __future__ import annotations

import torch

from ..kernels import rnn


class RNNCellFunction(torch.autograd.Function):
    """h' = act(input W_ih^T + b_ih + hx W_hh^T + b_hh), forward and backward in Triton.

    input (B, I), hx (B, H), weight_ih (H, I), weight_hh (H, H), bias_ih and bias_hh (H,) or both None;
    activation "tanh" or "relu". Saved for backward: h' (its derivative comes from it), the input only if
    weight_ih needs a gradient, hx only if weight_hh does, the weights only if input or hx need theirs.
    No double backward.
    """

    @staticmethod
    def forward(ctx, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, activation):
        out = rnn.forward(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, activation)
        need_x, need_h, need_wih, need_whh = ctx.needs_input_grad[:4]
        ctx.save_for_backward(out, input if need_wih else None, hx if need_whh else None,
                              weight_ih if need_x else None, weight_hh if need_h else None)
        ctx.activation, ctx.shapes = activation, (tuple(weight_ih.shape), tuple(weight_hh.shape))
        return out

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError("gpunn RNNCell does not support double backward (create_graph=True)")
        out, input, hx, weight_ih, weight_hh = ctx.saved_tensors
        need_x, need_h, _, _, need_bih, need_bhh = ctx.needs_input_grad[:6]
        dy = grad_output.contiguous()
        dx = dh = dw_ih = dw_hh = db_ih = db_hh = None
        if need_x or need_h:
            dx, dh = rnn.grad_input(dy, out, weight_ih, weight_hh, ctx.activation)
        if input is not None or hx is not None or need_bih or need_bhh:
            dw_ih, dw_hh, db_ih, db_hh = rnn.grad_weight(dy, out, input, hx, ctx.shapes, ctx.activation,
                                                         need_bih or need_bhh)
        return dx, dh, dw_ih, dw_hh, db_ih if need_bih else None, db_hh if need_bhh else None, None
