"""The Elman RNN over a whole sequence (torch.nn.RNN's computation) as custom ops, one call per layer with
both directions in it: gpunn::rnn_layer and gpunn::rnn_layer_backward.

Per layer, forward is one dense GEMM for the input projection of every step and direction (with both
biases), then one recurrence launch per direction (kernels/rnn_sequence.py). Backward is one
backward-through-time launch per direction, then dense kernels over all steps: dX, and dW_ih with the
biases' gradient (a column sum of its own) for both directions at once, and dW_hh per direction.
Launches per layer: 1 + D forward, 2D + 3 backward (D = 1 or 2 directions; fewer where a gradient is not
needed), whatever the sequence length, except that over many rows (T * B) each weight gradient and the
biases' sum may add a launch that adds its row splits' partial sums (at most 3D + 5; see kernels/dense.py),
and that the recurrence launches once a step where its split grid exceeds the GPU (see
kernels/rnn_sequence.py).

Sequences are time-major and packed (see kernels/rnn_sequence.py): a PackedSequence's batch_sizes say which
rows belong to which step (`Steps` holds them on the device). Saved for backward: the layer's output (each
act'(z) comes from it), x only if a W_ih needs a gradient, h0, W_hh, and W_ih only if x needs a gradient.

Double backward (create_graph=True) recomputes the layer step by step with the cell op (gpunn::rnn_cell,
whose backward is differentiable: see gpunn.ops.rnn) and differentiates that graph with create_graph, so
its gradients are differentiable in turn. Launches then grow with the T steps (a cell forward and three
backward kernels a step and direction for the first order, about seven more a step for the second), and in
fp16/bf16 the recomputed state rounds to the dtype every step where the sequence kernel carries it in fp32.
References to x and the weights are kept for it where first order does not save them (checked unchanged).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from ..kernels import dense, rnn_sequence
from ..kernels.runtime import Recent, Rows, empty, hold_for_graphs, state_dtype
from . import linear, rnn
from .library import (Fold, Op, batched, first_order_saved, kept, metadata_to_save, nothing, save_for_orders,
                      saved_metadata, sum_of, took_duals, under_transform)


@dataclass(frozen=True)
class Steps:
    """The time structure of a packed batch, on the device, shared by every layer and call with the same
    batch_sizes (see of()).

    batch_sizes: (T,) int64 on the CPU, non-increasing (a PackedSequence's); sizes_on_device and
    offsets_on_device: the same and the first row of each step, (T,) int64 each, on the device.
    """

    batch_sizes: torch.Tensor
    sizes_on_device: torch.Tensor
    offsets_on_device: torch.Tensor
    _previous: dict = field(default_factory=dict, compare=False)  # reverse -> previous_rows
    _final: list = field(default_factory=list, compare=False)  # [final_rows(False)] once built

    @staticmethod
    def of(batch_sizes: torch.Tensor | None, shape: list[int], device: torch.device) -> "Steps":
        """The Steps of a PackedSequence's batch_sizes, or, when None, of T steps of B rows (shape (T, B, ...)),
        on device. Built once per (batch sizes, device) and cached: the layers of a network, their backward
        and later calls with the same lengths copy nothing to the device (so a warmed-up step can be
        captured in a CUDA graph)."""
        sizes = tuple(batch_sizes.tolist()) if batch_sizes is not None else (shape[1],) * shape[0]
        key = (device, sizes)
        steps = _STEPS.lookup(key)
        if steps is None:
            on_host = torch.tensor(sizes, dtype=torch.int64)
            offsets = torch.cumsum(on_host, 0) - on_host
            steps = Steps(on_host, on_host.to(device, non_blocking=True), offsets.to(device, non_blocking=True))
            _STEPS.keep(key, steps)
        hold_for_graphs(steps, device)
        return steps

    @property
    def batch(self) -> int:
        """B, the rows of the first (longest) step."""
        return int(self.batch_sizes[0]) if len(self.batch_sizes) else 0

    def previous_rows(self, reverse: bool) -> torch.Tensor:
        """(rows,) index into cat(h0, output) of the state each row's step started from: the same batch
        row at the step before (after, for the reverse direction) or, where there is none, h0's row. On the
        device, built once."""
        if reverse not in self._previous:
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
            self._previous[reverse] = index.to(self.sizes_on_device.device, non_blocking=True)
        return self._previous[reverse]

    def previous_states(self, h0: torch.Tensor, out: torch.Tensor, reverse: bool) -> torch.Tensor:
        """(rows, H): the state each row's step started from, of one direction's h0 (B, H) and output (rows,
        H)."""
        return torch.cat([h0, out])[self.previous_rows(reverse)]

    def final_rows(self, reverse: bool) -> torch.Tensor | slice:
        """The rows of the output that hold each batch row's final state: its last step's (step 0's in
        reverse). On the device, built once."""
        if reverse:
            return slice(0, self.batch)
        if not self._final:
            sizes = self.batch_sizes.tolist()
            offsets = list(itertools.accumulate(sizes, initial=0))
            ends = [offsets[t] + row for t in reversed(range(len(sizes)))
                    for row in range(sizes[t + 1] if t + 1 < len(sizes) else 0, sizes[t])]
            self._final.append(torch.tensor(ends, dtype=torch.int64).to(self.sizes_on_device.device,
                                                                         non_blocking=True))
        return self._final[0]


_STEPS_KEPT = 32
_STEPS = Recent(_STEPS_KEPT)  # (device, batch sizes) -> Steps


def _directions(weights: tuple, count: int) -> list[tuple]:
    per = len(weights) // count
    return [weights[d * per:(d + 1) * per] for d in range(count)]


def _projection_weights(weights: list[torch.Tensor], directions: int, with_bias: bool = True):
    """(W_ih of every direction stacked (D*H, I), b_ih + b_hh stacked (D*H,) in the state's dtype or None
    (None too without with_bias: backward has no use for it), [W_hh per direction])."""
    per_direction = _directions(weights, directions)
    w_ih = torch.cat([w[0] for w in per_direction]) if directions > 1 else per_direction[0][0]
    bias = None
    if with_bias and len(per_direction[0]) == 4:  # both biases enter every z: add them once, in the projection
        state = state_dtype(w_ih.dtype)
        bias = torch.cat([w[2].to(state) + w[3].to(state) for w in per_direction])
    return w_ih, bias, [w[1] for w in per_direction]


def _rnn_layer(x: torch.Tensor, h0: torch.Tensor, batch_sizes: torch.Tensor | None, activation: str,
               directions: int, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer, D directions: (output (rows, D*H), h_n (D, B, H)) from h0 (D, B, H) and x (rows, I) packed
    with batch_sizes as a PackedSequence's (CPU int64, (T,)), or x (T, B, I) (any strides) and batch_sizes
    None.

    weights: per direction (weight_ih (H, I), weight_hh (H, H)[, bias_ih (H,), bias_hh (H,)]).
    """
    steps = Steps.of(batch_sizes, list(x.shape), x.device)
    w_ih, bias, w_hh = _projection_weights(weights, directions)
    hidden = w_hh[0].shape[0]
    # z_t = u_t + h_{t-1} W_hh^T + b is rounded once, by the recurrence: u_t, the projection of every step
    # (rows, D*H), stays in the state's dtype (fp32 for fp16 / bf16), as the biases' sum. Rounded to fp16 first,
    # a z within that rounding of 0 had crossed relu's kink, and the wrong derivative ran back through time.
    projected, _ = dense.forward(Rows.of(x), w_ih, bias, None, 0.0, False, out_dtype=state_dtype(x.dtype))
    out = empty(projected.shape, device=x.device, dtype=x.dtype)
    finals = []
    for d in range(directions):
        columns = slice(d * hidden, (d + 1) * hidden)
        state = torch.empty((2, *h0.shape[1:]), device=x.device, dtype=state_dtype(x.dtype))
        state[0] = h0[d]
        final = rnn_sequence.forward(projected[:, columns], w_hh[d], out[:, columns], state,
                                     steps.sizes_on_device, steps.offsets_on_device, activation, reverse=d == 1)
        finals.append(final.to(x.dtype))
    return out, torch.stack(finals)


def _rnn_layer_fake(x, h0, batch_sizes, activation, directions, weights):
    return x.new_empty((math.prod(x.shape[:-1]), directions * weights[1].shape[0])), h0.new_empty(h0.shape)


def _rnn_layer_backward(grad_out: torch.Tensor, grad_hn: torch.Tensor | None, out: torch.Tensor,
                        x: torch.Tensor | None, h0: torch.Tensor, batch_sizes: torch.Tensor | None, activation: str,
                        directions: int, weights: list[torch.Tensor], input_shape: list[int],
                        needs: list[bool], groups: int) -> list[torch.Tensor]:
    """[dx, dh0, then a gradient per weight], each nothing where `needs` (for x, h0, then each weight) says
    it is not needed. x is given when a W_ih needs its gradient. groups > 0 (padded sequences only): the
    batch is `groups` equal groups of consecutive batch rows (torch.func's samples, folded), and each
    weight's gradient is (groups, *shape), each group's own sum."""
    if groups and batch_sizes is not None:
        raise ValueError("rnn_layer_backward: groups of batch rows are for padded sequences (batch_sizes None)")
    steps = Steps.of(batch_sizes, input_shape, out.device)
    w_ih, _, w_hh = _projection_weights(weights, directions, with_bias=False)
    hidden = w_hh[0].shape[0]
    per = len(weights) // directions
    need_weight = [needs[2 + d * per:2 + (d + 1) * per] for d in range(directions)]
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
                              steps.sizes_on_device, steps.offsets_on_device, activation, reverse=d == 1)
        dh0.append(dh.to(out.dtype))
    grads = [nothing(out) for _ in weights]
    dx = dense.grad_input(Rows.of(dz), w_ih).view(input_shape) if needs[0] else nothing(out)

    def by_group(t: torch.Tensor) -> torch.Tensor:
        """t (time-major rows (T * B, C), or x (T, B, I)) with, under groups, each group's rows of every step
        together: a view where Rows reads it in place (one batch row a group, as per-sample sequences have),
        else a copy."""
        if not groups:
            return t
        time, batch = input_shape[:2]
        grouped = t.view(time, batch, t.shape[-1]) if t.dim() == 2 else t
        grouped = grouped.unflatten(1, (groups, batch // groups)).transpose(0, 1)
        return grouped if batch == groups else grouped.reshape(time * batch, t.shape[-1])

    want_w_ih = any(n[0] for n in need_weight)
    want_bias = per == 4 and any(n[2] or n[3] for n in need_weight)
    dz_grouped = by_group(dz) if want_w_ih or want_bias or any(n[1] for n in need_weight) else None
    if want_w_ih or want_bias:
        dw_ih = dense.grad_weight(Rows.of(dz_grouped), Rows.of(by_group(x)), tuple(w_ih.shape),
                                  groups) if want_w_ih else None
        db = dense.grad_bias(Rows.of(dz_grouped), groups) if want_bias else None
        # A custom op's outputs may not share storage: two directions' parts of one tensor get their own, and
        # so do the two biases' (equal) gradients.
        for d in range(directions):
            rows = slice(d * hidden, (d + 1) * hidden)
            if need_weight[d][0]:
                grads[d * per] = dw_ih[..., rows, :].clone() if directions > 1 else dw_ih
            if want_bias and need_weight[d][2]:
                grads[d * per + 2] = db[..., rows].clone() if directions > 1 else db
            if want_bias and need_weight[d][3]:
                grads[d * per + 3] = db[..., rows].clone()
    for d in range(directions):
        if need_weight[d][1]:
            columns = slice(d * hidden, (d + 1) * hidden)
            previous = steps.previous_states(h0[d], out[:, columns], d == 1)
            grads[d * per + 1] = dense.grad_weight(Rows.of(dz_grouped[..., columns]), Rows.of(by_group(previous)),
                                                   (hidden, hidden), groups)
    return [dx, torch.stack(dh0) if needs[1] else nothing(out), *grads]


def _rnn_layer_backward_fake(grad_out, grad_hn, out, x, h0, batch_sizes, activation, directions, weights, input_shape,
                             needs, groups):
    shapes = [input_shape, h0.shape, *((groups, *w.shape) if groups else w.shape for w in weights)]
    return [out.new_empty(shape) if need else nothing(out) for shape, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, h0, batch_sizes, activation, directions, weights = inputs
    per = len(weights) // directions
    needs = list(ctx.needs_input_grad[:2]) + list(ctx.needs_input_grad[5:5 + len(weights)])
    need_w_ih = any(needs[2 + d * per] for d in range(directions))
    # First order reads W_hh (backward through time) and, for dx, W_ih; the biases, and W_ih otherwise, only
    # double backward's recompute reads: kept by reference (as x where first order does not save it), so
    # that first order allows an in-place change of them after the forward, as torch's CPU RNN does.
    first = [w if i % per == 1 or (i % per == 0 and needs[0]) else None for i, w in enumerate(weights)]
    save_for_orders(ctx, (output[0], x if need_w_ih else None, h0, metadata_to_save(ctx, "batch_sizes", batch_sizes),
                          *first), (x if not need_w_ih else None,
                                    *(w if saved is None else None for w, saved in zip(weights, first))))
    ctx.activation, ctx.directions, ctx.input_shape, ctx.needs = activation, directions, list(x.shape), needs
    ctx.weight_shapes = [w.shape for w in weights]


WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # a direction's, in torch.nn.RNN's order


def _backward(ctx, grad_out, grad_hn):
    out, x, h0, batch_sizes, *weights = first_order_saved(ctx)
    batch_sizes = saved_metadata(ctx, "batch_sizes", batch_sizes)
    # create_graph=True, or eager forward mode (a dual reaching the backward: the cell's ops carry its tangent).
    # Not under torch.func, whose backward runs in grad mode: the recorded steps' gradients come from
    # torch.autograd.grad, which the transforms do not take; there the first-order op runs, and it refuses a
    # further order.
    create_graph = torch.is_grad_enabled()
    if (create_graph or took_duals(ctx, grad_out, grad_hn)) and not under_transform():
        x = kept(ctx, 0, x, "RNN", "input")
        per = len(weights) // ctx.directions
        weights = [kept(ctx, 1 + i, w, "RNN", WEIGHT_NAMES[i % per] + ("_reverse" if i >= per else ""))
                   for i, w in enumerate(weights)]
        with torch.enable_grad():
            return _differentiable_backward(ctx, grad_out, grad_hn, x, h0, batch_sizes, weights, create_graph)
    if grad_out is None:  # only h_n was used
        grad_out = torch.zeros_like(out)
    # Where first order did not save a weight, it reads none of its values: a stand-in of its shape, made from
    # W_hh (always saved), so that under vmap it is batched where the weights are (an ensemble's) and only there.
    weights = [w if w is not None else weights[1].new_zeros(()).expand(shape)
               for w, shape in zip(weights, ctx.weight_shapes)]
    grads = rnn_layer_backward(grad_out, grad_hn, out, x, h0, batch_sizes, ctx.activation, ctx.directions, weights,
                               ctx.input_shape, ctx.needs, 0)
    dx, dh0, *dweights = (g if need else None for g, need in zip(grads, ctx.needs))
    return dx, dh0, None, None, None, dweights


def _by_steps(x: torch.Tensor, h0: torch.Tensor, sizes: list[int], activation: str, directions: int,
              weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """_rnn_layer's (output (rows, D*H), h_n (D, B, H)) as one cell op a step and direction, from x (rows, I)
    packed with the steps' batch sizes `sizes` (non-increasing): autograd records every step."""
    offsets = list(itertools.accumulate(sizes, initial=0))
    outputs, finals = [], []
    for d, w in enumerate(_directions(weights, directions)):
        bias = (w[2], w[3]) if len(w) == 4 else (None, None)
        by_step = [None] * len(sizes)
        if d == 0:  # forward in time; a row's state ends at its last step, where the batch shrinks past it
            state = h0[d]
            for t, size in enumerate(sizes):
                h = rnn.rnn_cell(x[offsets[t]:offsets[t] + size], state[:size], w[0], w[1], *bias, activation)
                state = torch.cat([h, state[size:]]) if size < len(state) else h
                by_step[t] = h
        else:  # backward in time; a row starts from h0 at its last step
            state = h0[d][:0]
            for t in reversed(range(len(sizes))):
                size = sizes[t]
                state = torch.cat([state, h0[d][len(state):size]]) if len(state) < size else state
                state = by_step[t] = rnn.rnn_cell(x[offsets[t]:offsets[t] + size], state, w[0], w[1], *bias,
                                                  activation)
            state = torch.cat([state, h0[d][len(state):]]) if len(state) < len(h0[d]) else state
        outputs.append(torch.cat(by_step) if by_step else x.new_empty((0, w[1].shape[0])))
        finals.append(state)
    return torch.cat(outputs, 1), torch.stack(finals)


def _differentiable_backward(ctx, grad_out, grad_hn, x, h0, batch_sizes, weights, create_graph=True):
    """The gradients through _by_steps' graph, made with create_graph (see the module docstring); without it
    for forward mode alone, whose tangents the ops carry either way."""
    sizes = batch_sizes.tolist() if batch_sizes is not None else [ctx.input_shape[1]] * ctx.input_shape[0]
    # One alias per argument: a tensor passed twice (one bias as both b_ih and b_hh, one weight for both
    # directions) would otherwise get its whole gradient in each place, and autograd would add them up. A
    # needed one that autograd does not track here (torch.func.vjp's vjp_fn, called after vjp returned, runs
    # this with grad mode on over the transform's tensors) is a leaf of its own: its gradient is a value. One
    # neither needed nor tracked stays as it is (detached, a dual would lose its tangent).
    x, h0, *weights = (t.view_as(t) if t.requires_grad else t if not need else
                       (t.clone() if t.is_inference() else t.detach()).requires_grad_()
                       for t, need in zip((x, h0, *weights), ctx.needs))
    out, h_n = _by_steps(x.reshape(-1, x.shape[-1]), h0, sizes, ctx.activation, ctx.directions, weights)
    pairs = [(t, g) for t, g in ((out, grad_out), (h_n, grad_hn)) if g is not None]
    wanted = [t for t, need in zip((x, h0, *weights), ctx.needs) if need]
    grads = iter(torch.autograd.grad([t for t, _ in pairs], wanted, [g for _, g in pairs],
                                     create_graph=create_graph, allow_unused=True))
    results = []
    for like, need in zip((x, h0, *weights), ctx.needs):
        grad = next(grads) if need else None
        results.append(torch.zeros_like(like) if need and grad is None else grad)  # needed, but not reached
    dx, dh0, *dweights = results
    return dx, dh0, None, None, None, dweights


# torch.func.vmap over padded sequences folds the samples into the batch (dim 1 of (T, B, ...)): each sample's
# batch rows become consecutive batch rows of one call, and backward sums each sample's weight gradients
# apart (groups). Packed sequences and batched weights (an ensemble of RNNs) run once per sample.

def _folds(batch_sizes, weight_dims) -> bool:
    """Whether vmap may fold the samples into the batch: padded sequences, and one set of weights."""
    return batch_sizes is None and not batched(weight_dims)


def _into_batch(tensor: torch.Tensor | None, dim: int | None, samples: int, shape) -> torch.Tensor | None:
    """A per-sample (L, B, C) (shape; the tensor may hold it as rows (L * B, C)) with its samples (batch dim
    `dim`, None: the same for all) folded into the batch: (L, samples * B, C), each sample's rows together."""
    if tensor is None:
        return None
    tensor = tensor.movedim(dim, 0) if dim is not None else tensor.expand(samples, *tensor.shape)
    length, batch, *rest = shape
    return tensor.reshape(samples, *shape).movedim(0, 1).reshape(length, samples * batch, *rest)


def _sample_shape(tensor: torch.Tensor, dim: int | None) -> list[int]:
    """A sample's shape of a tensor batched at dim (None: not batched)."""
    return list(tensor.shape[:dim] + tensor.shape[dim + 1:] if dim is not None else tensor.shape)


def _fold_layer(samples: int, args: list, dims: list) -> tuple:
    """vmap's (outputs, out_dims) of rnn_layer run once, x's and h0's samples folded into the batch."""
    x, h0, batch_sizes, activation, directions, weights = args
    shape = _sample_shape(x, dims[0])
    out, h_n = rnn_layer(_into_batch(x, dims[0], samples, shape),
                         _into_batch(h0, dims[1], samples, _sample_shape(h0, dims[1])), None, activation, directions,
                         weights)
    time, batch = shape[:2]
    # out: time-major rows of the folded batch, made each sample's (T * B, D * H) again; h_n (D, S * B, H) is
    # each sample's (D, B, H) at dim 1 as it is.
    out = out.view(time, samples, batch, out.shape[-1]).movedim(1, 0).reshape(samples, time * batch, out.shape[-1])
    return (out, h_n.unflatten(1, (samples, batch))), (0, 1)


def _fold_layer_backward(samples: int, args: list, dims: list) -> tuple:
    """vmap's (outputs, out_dims) of rnn_layer_backward run once, the samples folded into the batch as
    _fold_layer folds them, each sample's weight gradients summed apart (its groups, each of a sample's
    groups where an inner fold made some)."""
    grad_out, grad_hn, out, x, h0, batch_sizes, activation, directions, weights, input_shape, needs, groups = args
    time, batch, features = input_shape
    hidden = weights[1].shape[0]
    out_shape, state_shape = (time, batch, directions * hidden), (directions, batch, hidden)
    rows = lambda t, dim: _into_batch(t, dim, samples, out_shape).flatten(0, 1)  # noqa: E731
    grads = rnn_layer_backward(rows(grad_out, dims[0]), _into_batch(grad_hn, dims[1], samples, state_shape),
                               rows(out, dims[2]), _into_batch(x, dims[3], samples, input_shape),
                               _into_batch(h0, dims[4], samples, state_shape), None, activation, directions, weights,
                               [time, samples * batch, features], needs, samples * max(groups, 1))
    dx, dh0, *dweights = grads
    # dx (T, S * B, I) and dh0 (D, S * B, H): each sample's at dim 1; weight gradients (S * max(groups, 1),
    # ...): each sample's, its groups' where it has some, at dim 0.
    dx = dx.unflatten(1, (samples, batch)) if needs[0] else dx.expand(samples, 0)
    dh0 = dh0.unflatten(1, (samples, batch)) if needs[1] else dh0.expand(samples, 0)
    dweights = [(g.unflatten(0, (samples, groups)) if groups else g) if need else g.expand(samples, 0)
                for g, need in zip(dweights, needs[2:])]
    return (dx, dh0, *dweights), (1 if needs[0] else 0, 1 if needs[1] else 0, *(0,) * len(dweights))


# Forward mode. A direction's tangent obeys h'_t = act'(z_t) (u_t + h'_{t-1} W_hh^T), where
# u_t = x'_t W_ih^T + x_t W_ih'^T + h_{t-1} W_hh'^T + b_ih' + b_hh' takes only what forward computed: one GEMM
# over every step of the direction. That recurrence is backward through time's, dz_t = act'(z_t) (dout_t + dh) with
# dh = dz_t W_hh carried, run the other way in time over W_hh^T: the backward kernel computes it, with u as
# dout, h'_t as dz and h'_0 W_hh^T as the carried dh it starts from (rows that start later, a packed reverse
# direction's, keep it until then).

def _rnn_layer_tangent(x: torch.Tensor, h0: torch.Tensor, batch_sizes: torch.Tensor | None, activation: str,
                       directions: int, weights: list[torch.Tensor], out: torch.Tensor, t_x: torch.Tensor | None,
                       t_h0: torch.Tensor | None, t_weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tangents (output' (rows, D*H), h_n' (D, B, H)) of rnn_layer's outputs, given its args, its output
    and the tangents of x and h0 (None for none) and of each weight (an empty tensor for none)."""
    steps = Steps.of(batch_sizes, list(x.shape), x.device)
    hidden = weights[1].shape[0]
    rows = out.shape[0]
    x_rows, t_x_rows = (t.reshape(rows, t.shape[-1]) if t is not None else None for t in (x, t_x))
    t_out = empty(out.shape, device=out.device, dtype=out.dtype)
    finals = []
    for d, (w, t_w) in enumerate(zip(_directions(weights, directions), _directions(t_weights, directions))):
        t_w = [t if t.shape == like.shape else None for t, like in zip(t_w, w)]
        columns = slice(d * hidden, (d + 1) * hidden)
        previous = steps.previous_states(h0[d], out[:, columns], d == 1) if t_w[1] is not None else None
        u = linear.sum_of_products([(t_x_rows, w[0]), (x_rows, t_w[0]), (previous, t_w[1])], sum_of(*t_w[2:]),
                                   rows, hidden, None)
        u = u.tensor if u is not None else out.new_zeros((1, hidden)).expand(rows, hidden)  # h0' alone
        u = u if u.stride(-1) == 1 else u.contiguous()  # the kernel reads rows at column stride 1 (a strided b')
        carried = torch.zeros((steps.batch, hidden), device=out.device, dtype=state_dtype(out.dtype))
        if t_h0 is not None:
            carried.copy_(dense.forward(Rows.of(t_h0[d]), w[1], None, None, 0.0, False)[0])
        rnn_sequence.backward(u, out[:, columns], w[1].t().contiguous(), t_out[:, columns], carried,
                              steps.sizes_on_device, steps.offsets_on_device, activation, reverse=d == 0)
        finals.append(t_out[steps.final_rows(d == 1), columns] if rows else
                      (t_h0[d] if t_h0 is not None else h0.new_zeros(h0.shape[1:])))
    return t_out, torch.stack(finals)


def _rnn_layer_tangent_fake(x, h0, batch_sizes, activation, directions, weights, out, t_x, t_h0, t_weights):
    return out.new_empty(out.shape), h0.new_empty(h0.shape)


rnn_layer_tangent = Op("rnn_layer_tangent", _rnn_layer_tangent, _rnn_layer_tangent_fake)


def _jvp(args, outputs, tangents):
    """Forward mode's rule: rnn_layer_tangent's (an empty tensor standing in for a weight's missing tangent)."""
    x, h0, batch_sizes, activation, directions, weights = args
    t_x, t_h0, *_, t_weights = tangents
    if t_x is None and t_h0 is None and all(t is None for t in t_weights):
        return None, None
    t_weights = [t if t is not None else nothing(w) for t, w in zip(t_weights, weights)]
    return rnn_layer_tangent(x, h0, batch_sizes, activation, directions, weights, outputs[0], t_x, t_h0, t_weights)


rnn_layer_backward = Op("rnn_layer_backward", _rnn_layer_backward, _rnn_layer_backward_fake, groups=11,
                        fold=Fold(lambda args, dims: _folds(args[5], dims[8]), _fold_layer_backward))
rnn_layer = Op("rnn_layer", _rnn_layer, _rnn_layer_fake, _setup_context, _backward,
               fold=Fold(lambda args, dims: _folds(args[2], dims[5]), _fold_layer), jvp=_jvp)
