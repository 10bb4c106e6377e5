"""The Elman RNN over a whole sequence (torch.nn.RNN's computation): one torch.autograd.Function per layer,
both directions in it.

Per layer, forward is one dense GEMM for the input projection of every step and direction (with both
biases), then one recurrence launch per direction (kernels/rnn_sequence.py). Backward is one
backward-through-time launch per direction, then dense GEMMs over all steps: dX and dW_ih (with the
biases) for both directions at once, and dW_hh per direction. Launches per layer: 1 + D forward,
D + 2 + D backward (D = 1 or 2 directions), whatever the sequence length.

Sequences are time-major and packed (see kernels/rnn_sequence.py): `Steps` describes which rows belong to
which step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import dense, rnn_sequence
from ..kernels.runtime import Rows, empty, state_dtype


@dataclass(frozen=True)
class Steps:
    """The time structure of a packed batch, shared by every layer.

    batch_sizes: (T,) int64 on the CPU, non-increasing (a PackedSequence's); on_device: the same and the
    first row of each step, (T,) int64 each, on the device the kernels run on.
    """

    batch_sizes: torch.Tensor
    sizes_on_device: torch.Tensor
    offsets_on_device: torch.Tensor

    @staticmethod
    def of(batch_sizes: torch.Tensor, device: torch.device) -> "Steps":
        sizes = batch_sizes.to(torch.int64)
        offsets = torch.cumsum(sizes, 0) - sizes
        return Steps(sizes, sizes.to(device, non_blocking=True), offsets.to(device, non_blocking=True))

    @staticmethod
    def uniform(steps: int, batch: int, device: torch.device) -> "Steps":
        return Steps.of(torch.full((steps,), batch, dtype=torch.int64), device)

    @property
    def batch(self) -> int:
        return int(self.batch_sizes[0]) if len(self.batch_sizes) else 0

    def previous_rows(self, reverse: bool, device: torch.device) -> torch.Tensor:
        """(rows,) index into cat(h0, output) of the state each row's step started from: the same batch
        row at the step before (after, for the reverse direction) or, where there is none, h0's row."""
        sizes = self.batch_sizes
        steps = len(sizes)
        offsets = torch.cumsum(sizes, 0) - sizes
        step_of = torch.repeat_interleave(torch.arange(steps), sizes)
        row_in_step = torch.arange(int(sizes.sum())) - offsets[step_of]
        neighbour = step_of + (1 if reverse else -1)
        inside = (neighbour >= 0) & (neighbour < steps)
        neighbour = neighbour.clamp(0, max(steps - 1, 0))
        has = inside & (row_in_step < sizes[neighbour])
        index = torch.where(has, self.batch + offsets[neighbour] + row_in_step, row_in_step)
        return index.to(device, non_blocking=True)


def _directions(weights: tuple, count: int) -> list[tuple]:
    per = len(weights) // count
    return [weights[d * per:(d + 1) * per] for d in range(count)]


class RNNLayerFunction(torch.autograd.Function):
    """One layer, D directions: output (rows, D*H) and h_n (D, B, H) from x (rows, I) (or (T, B, I), any
    strides) and h0 (D, B, H).

    weights: per direction (weight_ih (H, I), weight_hh (H, H)[, bias_ih (H,), bias_hh (H,)]).
    Saved for backward: the layer's output (each act'(z) comes from it), x only if W_ih needs a gradient,
    h0 only if W_hh does. No double backward.
    """

    @staticmethod
    def forward(ctx, x, h0, steps: Steps, activation: str, directions: int, *weights):
        per_direction = _directions(weights, directions)
        hidden = per_direction[0][1].shape[0]
        w_ih = torch.cat([w[0] for w in per_direction]) if directions > 1 else per_direction[0][0]
        bias = None
        if len(per_direction[0]) == 4:  # both biases enter every z: add them once, in the projection
            bias = torch.cat([w[2] + w[3] for w in per_direction])
        projected, _ = dense.forward(Rows.of(x), w_ih, bias, None, 0.0, False)  # (rows, D*H)
        out = empty(projected.shape, device=x.device, dtype=x.dtype)
        finals = []
        for d, (_, w_hh, *_) in enumerate(per_direction):
            columns = slice(d * hidden, (d + 1) * hidden)
            state = torch.empty((2, *h0.shape[1:]), device=x.device, dtype=state_dtype(x.dtype))
            state[0] = h0[d]
            final = rnn_sequence.forward(projected[:, columns], w_hh, out[:, columns], state,
                                         steps.sizes_on_device, steps.offsets_on_device, activation, reverse=d == 1)
            finals.append(final.to(x.dtype))
        per = len(weights) // directions
        need_w_ih = any(ctx.needs_input_grad[5 + d * per] for d in range(directions))
        need_w_hh = any(ctx.needs_input_grad[6 + d * per] for d in range(directions))
        ctx.save_for_backward(out, x if need_w_ih else None, h0 if need_w_hh else None, w_ih,
                              *(w[1] for w in per_direction))
        ctx.steps, ctx.activation, ctx.directions, ctx.has_bias = steps, activation, directions, bias is not None
        ctx.input_shape = x.shape
        return out, torch.stack(finals)

    @staticmethod
    def backward(ctx, grad_out, grad_hn):
        if torch.is_grad_enabled():
            raise RuntimeError("gpunn RNN does not support double backward (create_graph=True)")
        out, x, h0, w_ih, *w_hh = ctx.saved_tensors
        steps, directions = ctx.steps, ctx.directions
        hidden = w_hh[0].shape[0]
        per = len(ctx.needs_input_grad[5:]) // directions
        needs = [ctx.needs_input_grad[5 + d * per:5 + (d + 1) * per] for d in range(directions)]
        dz = empty(out.shape, device=out.device, dtype=out.dtype)
        if grad_out.stride(1) != 1:
            grad_out = grad_out.contiguous()
        dh0 = []
        for d in range(directions):
            columns = slice(d * hidden, (d + 1) * hidden)
            # dh_n in, dh0 out (the kernel updates it in place): always a fresh buffer.
            dh = torch.zeros((steps.batch, hidden), device=out.device, dtype=state_dtype(out.dtype))
            if grad_hn is not None:
                dh.copy_(grad_hn[d])
            rnn_sequence.backward(grad_out[:, columns], out[:, columns], w_hh[d], dz[:, columns], dh,
                                  steps.sizes_on_device, steps.offsets_on_device, ctx.activation, reverse=d == 1)
            dh0.append(dh.to(out.dtype))
        grads = [None] * (directions * per)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dense.grad_input(Rows.of(dz), None, w_ih, None, 0.0).view(ctx.input_shape)
        want_w_ih = any(n[0] for n in needs)
        want_bias = ctx.has_bias and any(n[2] or n[3] for n in needs)
        if want_w_ih or want_bias:
            dw_ih, db = dense.grad_weight(Rows.of(dz), None, Rows.of(x) if want_w_ih else None, tuple(w_ih.shape),
                                          None, 0.0, want_bias)
            for d in range(directions):
                rows = slice(d * hidden, (d + 1) * hidden)
                if needs[d][0]:
                    grads[d * per] = dw_ih[rows]
                if want_bias:  # the same values, in tensors of their own (a .grad may be changed in place)
                    grads[d * per + 2] = db[rows] if needs[d][2] else None
                    grads[d * per + 3] = db[rows].clone() if needs[d][3] else None
        for d in range(directions):
            if needs[d][1]:
                columns = slice(d * hidden, (d + 1) * hidden)
                previous = torch.cat([h0[d], out[:, columns]])[steps.previous_rows(d == 1, out.device)]
                grads[d * per + 1], _ = dense.grad_weight(Rows.of(dz[:, columns]), None, Rows.of(previous),
                                                          (hidden, hidden), None, 0.0, False)
        return (dx, torch.stack(dh0) if ctx.needs_input_grad[1] else None, None, None, None, *grads)

