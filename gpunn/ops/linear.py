"""The fused dense layer and its masked (block-sparse) form as ops over gpunn.kernels.dense and
gpunn.kernels.masked: gpunn::linear (forward), gpunn::linear_grad_input and gpunn::linear_grad_weight, and
the dense layer's gpunn::linear_grad_preactivation (dz = dy * act'(z) and db, before its two GEMMs).

y = act(input @ (weight * mask)^T + bias): input (*, K), weight (N, K), bias (N,) or None, all of one
floating dtype -> output (*, N); mask None for the dense layer, or the mask as the kernels' layout is
found from it (a bool (N, K) mask, or a BlockLayout's own uint8 copy; see kernels.layout.layout_of) with
the layout's block (block_n, block_k). Masked-out weights are never read and get exactly zero gradient.
`members` (0, or E > 0 for an ensemble that torch.func.vmap folds: weight (E, N, K), bias (E, N), and the
rows E members' rows one after another) is set by the vmap fold only (library.Op's weights and members).

Saved for backward, the least that gives exact gradients: the input only if weight needs a gradient, the
weight only if input does, plus what the activation's derivative needs (nothing, the output, or act'(z),
written by the forward kernel when save_derivative; see gpunn.kernels.activations). Double backward
(create_graph=True): the first-order backward runs as gpunn::linear_backward, whose own gradient is
gpunn.kernels.dense_double_backward's pass between GEMMs (masked GEMMs under the same mask for the masked
layer); no triple backward. Double backward needs the weight where the input takes a gradient, and, with
an activation (it recomputes z), the weight, bias and input: the layer keeps references to those first
order does not save (the input, then, only where the weight is frozen), outside save_for_backward, so that
first-order backward allows an in-place change of them after the forward, as torch.nn.Linear does; double
backward checks their versions itself. Forward mode: gpunn::linear_tangent (the output's tangent) and
gpunn::linear_backward_tangent (linear_backward's, for forward over reverse: torch.func.hessian), over double
backward's kernels.
"""
from __future__ import annotations

import math

import torch

from ..kernels import activations, dense, dense_double_backward, masked
from ..kernels.layout import layout_of, repeated
from ..kernels.runtime import Rows, grouped
from .library import (Op, arrived, differentiable_backward, first_order_saved, kept, metadata_to_save, nothing,
                      refuse_double_backward, save_for_orders, saved_metadata, saved_tensors, took_duals)


def _as_rows(saved: torch.Tensor | None, dy: Rows) -> torch.Tensor | None:
    """What forward saved (the output, or act'(z)) as (M, N), matching dy's rows."""
    return saved.reshape(dy.m, saved.shape[-1]) if saved is not None else None


def _layout(mask: torch.Tensor, block_n: int, block_k: int):
    return layout_of(mask, (block_n, block_k))


def _mask_to_save(ctx, mask: torch.Tensor | None, block_n: int, block_k: int) -> torch.Tensor | None:
    """What backward finds the mask in (library.metadata_to_save): the mask, whose version counter refuses a
    change since the forward; for one made under inference_mode, which has none (a change there would go
    unseen and backward would use the new mask), the copy that the forward's layout holds."""
    if mask is not None and mask.is_inference():
        mask = _layout(mask, block_n, block_k).mask
    return metadata_to_save(ctx, "mask", mask)


def _check_dense_takes_dz(saved: torch.Tensor | None, activation: str | None) -> None:
    if saved is not None or activation is not None:
        raise ValueError("gpunn's dense gradient GEMMs take dz (linear_grad_preactivation's), not an activation "
                         "and what its forward saved")


def _grad_preactivation(grad_output: torch.Tensor, saved: torch.Tensor | None, activation: str | None,
                        write_dz: bool, bias_grad: bool, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense layer's (dz (*, N) when write_dz, db (N,), or (groups, N) (see kernels.runtime.grouped), when
    bias_grad), each nothing where not asked for."""
    if saved is None and activations.grad_source(activation) != activations.GRAD_IS_DY.value:
        raise ValueError(f"gpunn linear_grad_preactivation: {activation} needs the tensor its forward saved")
    dy = Rows.of(grad_output)
    dz, db = dense.grad_preactivation(dy, _as_rows(saved, dy), activation, write_dz, bias_grad, groups)
    return (dz.view(grad_output.shape) if dz is not None else nothing(grad_output)), \
        (db if db is not None else nothing(grad_output))


def _grad_preactivation_fake(grad_output, saved, activation, write_dz, bias_grad, groups):
    return (grad_output.new_empty(grad_output.shape) if write_dz else nothing(grad_output)), \
        (grad_output.new_empty(grouped(groups, grad_output.shape[-1:])) if bias_grad else nothing(grad_output))


def _grad_input(grad_output: torch.Tensor, saved: torch.Tensor | None, weight: torch.Tensor,
                mask: torch.Tensor | None, block_n: int, block_k: int, activation: str | None, members: int
                ) -> torch.Tensor:
    """dx (*, K) of grad_output (*, N): the dense layer's takes dz (activation None, nothing saved). members
    E > 0: weight (E, N, K), grad_output E members' rows one after another (an ensemble under vmap)."""
    dy = Rows.of(grad_output)
    if mask is None:
        _check_dense_takes_dz(saved, activation)
        dx = dense.grad_input(dy, weight, members)
    else:
        layout = _layout(mask, block_n, block_k)
        if not members:
            dx = masked.grad_input(dy, _as_rows(saved, dy), weight, activation, layout=layout)
        else:  # the masked kernels take one weight: members one after another
            dx = torch.cat([masked.grad_input(Rows.of(part), saved_part, weight[member], activation, layout=layout)
                            for member, (part, saved_part) in enumerate(zip(
                                _member_parts(grad_output, dy.m, members), _member_parts(saved, dy.m, members)))])
    return dx.view(*grad_output.shape[:-1], weight.shape[-1])


def _grad_input_fake(grad_output, saved, weight, mask, block_n, block_k, activation, members):
    return grad_output.new_empty((*grad_output.shape[:-1], weight.shape[-1]))


def _member_parts(tensor: torch.Tensor | None, rows: int, members: int) -> tuple:
    """Each member's rows of an (M, ...) tensor of E members' rows one after another (Nones for None)."""
    return tensor.reshape(rows, tensor.shape[-1]).chunk(members) if tensor is not None else (None,) * members


def _grad_weight(grad_output: torch.Tensor, saved: torch.Tensor | None, input: torch.Tensor | None,
                 weight_shape: list[int], mask: torch.Tensor | None, block_n: int, block_k: int,
                 activation: str | None, bias_grad: bool, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW (N, K) when input is given, db (N,) when bias_grad; each with a leading groups dim where groups > 0,
    see kernels.runtime.grouped), each nothing where not asked for. The dense layer's takes dz (activation None, nothing
    saved; its backward has db from _grad_preactivation's pass)."""
    dy = Rows.of(grad_output)
    x = Rows.of(input) if input is not None else None
    if mask is None:
        _check_dense_takes_dz(saved, activation)
        dw = dense.grad_weight(dy, x, tuple(weight_shape), groups) if x is not None else None
        db = dense.grad_bias(dy, groups) if bias_grad else None
    else:
        dw, db = masked.grad_weight(dy, _as_rows(saved, dy), x, tuple(weight_shape), activation, bias_grad, groups,
                                    layout=_layout(mask, block_n, block_k))
    return (dw if dw is not None else nothing(grad_output)), (db if db is not None else nothing(grad_output))


def _grad_weight_fake(grad_output, saved, input, weight_shape, mask, block_n, block_k, activation, bias_grad, groups):
    dw = grad_output.new_empty(grouped(groups, weight_shape)) if input is not None else nothing(grad_output)
    return dw, grad_output.new_empty(grouped(groups, weight_shape[:1])) if bias_grad else nothing(grad_output)


# Under torch.func.vmap over their row arguments (dy, what forward saved, the input) alone, these fold the
# samples into their rows, and the weight and bias gradients come out per sample (Op's rows and groups); over
# the weight too (an ensemble), each sample is a member (Op's weights and members).
grad_preactivation = Op("linear_grad_preactivation", _grad_preactivation, _grad_preactivation_fake,
                        rows={0: 1, 1: 1}, groups=5)
grad_input = Op("linear_grad_input", _grad_input, _grad_input_fake, rows={0: 1, 1: 1}, weights={2: 2}, members=7)
grad_weight = Op("linear_grad_weight", _grad_weight, _grad_weight_fake, rows={0: 1, 1: 1, 2: 1}, groups=9)


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
            block_n: int, block_k: int, activation: str | None, negative_slope: float, save_derivative: bool,
            members: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (*, N), act'(z) (M, N) when save_derivative, else nothing). members E > 0: weight (E, N, K),
    bias (E, N), input E members' rows one after another (an ensemble under vmap)."""
    x, out_shape = Rows.of(input), (*input.shape[:-1], weight.shape[-2])
    if mask is None:
        output, derivative = dense.forward(x, weight, bias, activation, negative_slope, save_derivative, out_shape,
                                           members)
    elif not members:
        output, derivative = masked.forward(x, weight, bias, activation, negative_slope, save_derivative, out_shape,
                                            layout=_layout(mask, block_n, block_k))
    else:  # the masked kernels take one weight: members one after another
        layout = _layout(mask, block_n, block_k)
        parts = [masked.forward(Rows.of(part), weight[member], bias[member] if bias is not None else None,
                                activation, negative_slope, save_derivative, layout=layout)
                 for member, part in enumerate(_member_parts(input, x.m, members))]
        output = torch.cat([y for y, _ in parts]).view(out_shape)
        derivative = torch.cat([g for _, g in parts]) if save_derivative else None
    return output, derivative if derivative is not None else nothing(output)


def _linear_fake(input, weight, bias, mask, block_n, block_k, activation, negative_slope, save_derivative, members):
    output = input.new_empty((*input.shape[:-1], weight.shape[-2]))
    rows = math.prod(input.shape[:-1])
    return output, input.new_empty((rows, weight.shape[-2])) if save_derivative else nothing(output)


def _setup_context(ctx, inputs, output):
    input, weight, bias, mask, block_n, block_k, activation, negative_slope, *_ = inputs
    need_input, need_weight = ctx.needs_input_grad[:2]
    # What double backward needs beyond first order (see the module docstring): with an activation, what
    # recomputes z (the weight and bias, free: a layer holds them anyway; the input where first order does not
    # save it). Without one it reads nothing more, and so, as torch's, allows in-place changes of the rest.
    recompute = activation is not None
    save_for_orders(ctx, (input if need_weight else None, weight if need_input else None,
                          _derivative_source(activation, *output),
                          _mask_to_save(ctx, mask, block_n, block_k)),
                    (input if recompute and not need_weight else None, weight if recompute and not need_input else None,
                     bias if recompute else None))
    ctx.options = dict(block_n=block_n, block_k=block_k, activation=activation, negative_slope=negative_slope)
    ctx.weight_shape = list(weight.shape)


def _derivative_source(activation: str | None, output: torch.Tensor, derivative: torch.Tensor) -> torch.Tensor | None:
    """What act'(z) comes from, of the forward's (output, act'(z) or its placeholder): the output, act'(z), or
    None where act' needs nothing (activations.grad_source)."""
    source = activations.grad_source(activation)
    return {activations.GRAD_FROM_OUTPUT.value: output, activations.GRAD_FROM_SAVED.value: derivative}.get(source)


def _first_order(grad_output, saved, input, weight, mask, weight_shape, block_n, block_k, activation, need_input,
                 need_weight, need_bias, groups=0, members=0):
    """(dx, dW, db) of grad_output, each None where not needed; dW and db per group where groups > 0 (each
    member's, for members > 0: the fold makes each member's rows a group)."""
    if activations.grad_source(activation) != activations.GRAD_IS_DY.value and (
            saved is None or saved.numel() != grad_output.numel()):
        # The forward saves act'(z) only where it sees autograd record the call: a kernel reading the
        # placeholder instead would read past it.
        raise RuntimeError(f"gpunn linear: backward of {activation} needs what its forward saved, which it did not "
                           f"save (the forward did not see a tensor that requires grad)")
    dx = dw = db = None
    if mask is None:
        # The dense layer forms dz = dy * act'(z) and db in one pass, then runs two plain GEMMs on dz. Formed
        # inside the GEMMs' loops instead, dz left the MMA operand in registers: 1.6-2.3x slower (bench/NOTES.md).
        shaped = activations.grad_source(activation) != activations.GRAD_IS_DY.value
        write_dz = shaped and (need_input or need_weight)
        if write_dz or need_bias:
            dz, db = grad_preactivation(grad_output, saved, activation, write_dz, need_bias, groups)
            grad_output = dz if write_dz else grad_output
        saved, activation = None, None
    if need_input:
        dx = grad_input(grad_output, saved, weight, mask, block_n, block_k, activation, members)
    masked_bias = need_bias and mask is not None
    if need_weight or masked_bias:
        dw, masked_db = grad_weight(grad_output, saved, input if need_weight else None, weight_shape, mask,
                                    block_n, block_k, activation, masked_bias, groups)
        db = masked_db if masked_bias else db
    return dx, dw if need_weight else None, db if need_bias else None


def _backward(ctx, grad_output, _):
    input, weight, saved, mask = first_order_saved(ctx)
    mask = saved_metadata(ctx, "mask", mask)
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    options = ctx.options
    # create_graph=True, or forward mode (a dual reaching a plain backward): the gradients as an op autograd
    # can differentiate and forward mode carry a tangent through.
    if differentiable_backward(ctx) or took_duals(ctx, grad_output):
        input, weight = kept(ctx, 0, input, "linear", "input"), kept(ctx, 1, weight, "linear", "weight")
        if weight is None:  # no input gradient and no activation: its values are read by neither order
            weight = torch.zeros((), dtype=grad_output.dtype, device=grad_output.device).expand(ctx.weight_shape)
        grads = backward(grad_output, saved, input, weight, kept(ctx, 2, None, "linear", "bias"), mask,
                         options["block_n"], options["block_k"], options["activation"], options["negative_slope"],
                         need_input, need_weight, need_bias, 0, 0)
        grads = [grad if need else None for grad, need in zip(grads, (need_input, need_weight, need_bias))]
    else:
        grads = _first_order(grad_output, saved, input, weight, mask, ctx.weight_shape, options["block_n"],
                             options["block_k"], options["activation"], need_input, need_weight, need_bias)
    return (*grads,) + (None,) * 7


def _jvp(args, outputs, tangents):
    """Forward mode's rule (library.Op's jvp): the output's tangent, linear_tangent's."""
    input, weight, _, mask, block_n, block_k, activation, *_ = args
    t_input, t_weight, t_bias = tangents[:3]
    if t_input is None and t_weight is None and t_bias is None:
        return None, None
    output = outputs[0]
    saved = _derivative_source(activation, *outputs)
    if saved is not None and saved.numel() != output.numel():
        raise RuntimeError(f"gpunn linear: forward mode through {activation} needs act'(z), which its forward did "
                           f"not save (it did not see forward mode)")
    return tangent(input, weight, saved, mask, block_n, block_k, activation, t_input, t_weight, t_bias), None


linear = Op("linear", _linear, _linear_fake, _setup_context, _backward, rows={0: 1}, weights={1: 2, 2: 1}, members=9,
            jvp=_jvp)


def _backward_op(grad_output: torch.Tensor, saved: torch.Tensor | None, input: torch.Tensor | None,
                 weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None, block_n: int,
                 block_k: int, activation: str | None, negative_slope: float, need_input: bool, need_weight: bool,
                 need_bias: bool, groups: int, members: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's (dx (*, K), dW (N, K), db (N,); dW and db per group where groups > 0, see
    kernels.runtime.grouped), each nothing where not needed: its first-order backward as an op of its own, which
    double backward differentiates (used under create_graph=True, and under torch.func, whose vmap folds it as
    linear_grad_weight). The input may be None where neither order needs it (no activation, a frozen weight).
    members > 0: an ensemble's weight (E, N, K) and bias (E, N), its members' rows one after another, each
    member's rows a group."""
    grads = _first_order(grad_output, saved, input, weight, mask, list(weight.shape[-2:]), block_n, block_k,
                         activation, need_input, need_weight, need_bias, groups, members)
    return tuple(grad if grad is not None else nothing(grad_output) for grad in grads)


def _backward_op_fake(grad_output, saved, input, weight, bias, mask, block_n, block_k, activation, negative_slope,
                      need_input, need_weight, need_bias, groups, members):
    dx_shape = (*grad_output.shape[:-1], weight.shape[-1])
    return (grad_output.new_empty(dx_shape) if need_input else nothing(grad_output),
            weight.new_empty(grouped(groups, weight.shape[-2:])) if need_weight else nothing(grad_output),
            weight.new_empty(grouped(groups, weight.shape[-2:-1])) if need_bias else nothing(grad_output))


def _backward_op_setup_context(ctx, inputs, output):
    grad_output, _, input, weight, bias, mask, block_n, block_k, activation, negative_slope, *_ = inputs
    ctx.save_for_backward(grad_output, input, weight, bias, _mask_to_save(ctx, mask, block_n, block_k))
    ctx.block, ctx.activation, ctx.negative_slope = (block_n, block_k), activation, negative_slope


def _double_backward(ctx, grad_dx, grad_dw, grad_db):
    """Gradients of (grad_output, input, weight, bias) given those of (dx, dW, db); see
    gpunn.kernels.dense_double_backward for the formulas. The masked layer's GEMMs run under its mask, so
    masked-out weights, and the parts of g_dW there (dW is constant zero there), are never read."""
    refuse_double_backward("linear", "triple")  # groups and members are 0 here: library._ungrouped
    dy, input, weight, bias, mask = saved_tensors(ctx)
    mask = saved_metadata(ctx, "mask", mask)
    layout = _layout(mask, *ctx.block) if mask is not None else None
    need_dy, _, need_input, need_weight, need_bias = ctx.needs_input_grad[:5]
    activation, negative_slope = ctx.activation, ctx.negative_slope
    n, k = weight.shape
    grad_dx, grad_dw, grad_db = (arrived(g, shape) for g, shape in ((grad_dx, (*dy.shape[:-1], k)),
                                                                     (grad_dw, weight.shape), (grad_db, (n,))))
    rows = math.prod(dy.shape[:-1])
    x = input.reshape(rows, k) if input is not None else None  # rows spelled out: none to infer when k is 0
    second = activations.has_second_derivative(activation) and (need_input or need_weight or need_bias)
    dz_for_input = grad_dw is not None and need_input  # dx = dz W: dz g_dW reaches the input
    dz_for_weight = grad_dx is not None and need_weight  # dW = dz^T x: dz^T g_dx reaches the weight
    if not (need_dy or second or dz_for_input or dz_for_weight):
        return (None, None, *_zero_where_connected(activation, (None,) * 3, ctx.needs_input_grad[2:5],
                                                   (input, weight, bias))) + (None,) * 10
    grad_dz = sum_of_products([(grad_dx.reshape(rows, k) if grad_dx is not None else None, weight),
                                (x, grad_dw)], grad_db, rows, n, layout)
    z = _product(Rows.of(x), weight, bias, layout) if activation is not None else None
    grad_dy, dz, grad_z, grad_b = dense_double_backward.elementwise(
        Rows.of(dy), grad_dz, z, activation, negative_slope, need_dy, dz_for_input or dz_for_weight, second,
        second and need_bias)
    grad_x = grad_w = None
    if need_input and (dz_for_input or second):
        # dx = dz W with z = x W^T + b: g_x = dz g_dW + g_z W, one GEMM over [dz | g_z] and [g_dW; W].
        terms = [(dz, grad_dw) if dz_for_input else None, (grad_z, weight) if second else None]
        grad_x = _input_product(*_joined(terms, 1), layout).view(input.shape)
    if need_weight and (dz_for_weight or second):
        # dW = dz^T x: g_W = dz^T g_dx + g_z^T x, one GEMM over the rows of both.
        terms = [(dz, grad_dx.reshape(rows, k)) if dz_for_weight else None, (grad_z, x) if second else None]
        grad_w = _weight_product(*_joined(terms, 0), (n, k), layout)
    grads = _zero_where_connected(activation, (grad_x, grad_w, grad_b), (need_input, need_weight, need_bias),
                                  (input, weight, bias))
    return (grad_dy.view(dy.shape) if grad_dy is not None else None, None, *grads) + (None,) * 10


def _zero_where_connected(activation, grads, needs, likes):
    """With an activation, z reaches the first-order gradients through act'(z), so every input of z is in
    their graph even where act'' is zero (relu, leaky_relu): zeros there, as torch gives, rather than None
    (which autograd reports as an input the graph never used)."""
    if activation is None:
        return grads
    return tuple(grad if grad is not None or not need else torch.zeros_like(like)
                 for grad, need, like in zip(grads, needs, likes))


def _joined(terms, weight_dim):
    """A sum of products a_i @ b_i as one GEMM's (Rows, operand): the a_i side by side (input gradient,
    weight_dim 1: b_i stacked along N) or stacked along the rows (weight gradient, weight_dim 0)."""
    terms = [term for term in terms if term is not None]
    if len(terms) == 1:
        a, b = terms[0]
        return Rows.of(a), (b if weight_dim else Rows.of(b))
    (dz, first), (grad_z, second) = terms
    pair = dz.as_strided((dz.shape[0], 2 * dz.shape[1]), (dz.stride(0), 1))  # [dz | g_z]: one buffer
    if weight_dim:
        return Rows.of(pair), torch.cat([first, second], 0)
    rows = pair.view(dz.shape[0], 2, dz.shape[1]).transpose(0, 1)  # (2, M, N): dz's rows, then g_z's
    return Rows.of(rows), Rows.of(torch.stack([first, second]))


def sum_of_products(terms, bias: torch.Tensor | None, rows: int, n: int, layout) -> Rows | None:
    """sum_i a_i @ (b_i * mask)^T + bias as Rows of (rows, n), over the terms (a_i (rows, K), b_i (n, K)) with
    neither None: one forward GEMM over the a_i side by side and the b_i side by side, the bias its own; the
    bias alone where no term is left, None where there is no bias either. (Double backward's g_dz, forward
    mode's z'.)"""
    terms = [(a, b) for a, b in terms if a is not None and b is not None]
    if terms:
        lhs, rhs = terms[0] if len(terms) == 1 else (torch.cat([a for a, _ in terms], 1),
                                                     torch.cat([b for _, b in terms], 1))
        return Rows.of(_product(Rows.of(lhs), rhs, bias, layout))
    return Rows.of(bias.expand(rows, n)) if bias is not None else None


# Double backward's GEMMs, dense, or masked under the layer's layout (None for the dense layer). A weight
# operand may hold copies of the layer's weight shape side by side (N, 2K) or stacked (2N, K), each under
# the same mask: the masked kernels then take the layout of the mask repeated as the operand is.
def _repeated_for(layout, weight: torch.Tensor):
    n, k = layout.shape
    return repeated(layout, (weight.shape[0] // n if n else 1, weight.shape[1] // k if k else 1))


def _product(a: Rows, weight: torch.Tensor, bias: torch.Tensor | None, layout) -> torch.Tensor:
    """a @ (weight * mask)^T + bias: (M, N') from a (M, K') and weight (N', K')."""
    if layout is None:
        return dense.forward(a, weight, bias, None, 0.0, False)[0]
    return masked.forward(a, weight, bias, None, 0.0, False, layout=_repeated_for(layout, weight))[0]


def _input_product(dz: Rows, weight: torch.Tensor, layout) -> torch.Tensor:
    """dz @ (weight * mask): (M, K') from dz (M, N') and weight (N', K')."""
    if layout is None:
        return dense.grad_input(dz, weight)
    return masked.grad_input(dz, None, weight, None, layout=_repeated_for(layout, weight))


def _weight_product(dz: Rows, x: Rows, shape: tuple[int, int], layout) -> torch.Tensor:
    """(dz^T x) * mask, (N, K), over the rows of dz (M, N) and x (M, K)."""
    if layout is None:
        return dense.grad_weight(dz, x, shape)
    return masked.grad_weight(dz, None, x, shape, None, False, layout=layout)[0]


def _backward_jvp(args, outputs, tangents):
    """Forward mode's rule for linear_backward: linear_backward_tangent's. What forward saved for act' (its
    second argument) is a cache of z, which the rule recomputes, as double backward does."""
    (grad_output, _, input, weight, bias, mask, block_n, block_k, activation, negative_slope, need_input,
     need_weight, need_bias, *_) = args
    t_grad_output, _, t_input, t_weight, t_bias = tangents[:5]
    if all(t is None for t in (t_grad_output, t_input, t_weight, t_bias)):
        return None, None, None
    return backward_tangent(grad_output, input, weight, bias, mask, block_n, block_k, activation, negative_slope,
                            need_input, need_weight, need_bias, t_grad_output, t_input, t_weight, t_bias)


backward = Op("linear_backward", _backward_op, _backward_op_fake, _backward_op_setup_context, _double_backward,
              rows={0: 1, 1: 1, 2: 1}, groups=13, weights={3: 2, 4: 1}, members=14, jvp=_backward_jvp)


# Forward mode (torch.func.jvp, jacfwd, hessian = jacfwd(jacrev), torch.autograd.forward_ad): the tangents of
# the layer's output and of its first-order backward, each an op of its own, made of double backward's GEMMs
# and elementwise pass (forward mode's z' = x' W^T + x W'^T + b' is double backward's g_dz). They have no
# rules of their own: a further order (jacfwd(jacfwd(f)), a gradient of a tangent) is refused.

def _tangent(input: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor | None, mask: torch.Tensor | None,
             block_n: int, block_k: int, activation: str | None, t_input: torch.Tensor | None,
             t_weight: torch.Tensor | None, t_bias: torch.Tensor | None) -> torch.Tensor:
    """y' (*, N) = act'(z) * z', z' = x' W^T + x W'^T + b', of the tangents of input (*, K), weight (N, K)
    (masked-out entries never read) and bias (N,), None for none, not all; saved: what the forward saved for
    act' (activations.grad_source: its output, or act'(z)), None where act' needs nothing."""
    n, k = weight.shape
    rows = math.prod(input.shape[:-1])
    layout = _layout(mask, block_n, block_k) if mask is not None else None
    t_z = sum_of_products([(t_input.reshape(rows, k) if t_input is not None else None, weight),
                            (input.reshape(rows, k), t_weight)], t_bias, rows, n, layout)
    if activation is None and (t_input is not None or t_weight is not None):  # y' = z', as the GEMM wrote it
        t_y = t_z.tensor
    else:
        t_y, _ = dense.grad_preactivation(t_z, _as_rows(saved, t_z), activation, True, False)
    return t_y.view(*input.shape[:-1], n)


def _tangent_fake(input, weight, saved, mask, block_n, block_k, activation, t_input, t_weight, t_bias):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _backward_tangent(grad_output: torch.Tensor, input: torch.Tensor | None, weight: torch.Tensor,
                      bias: torch.Tensor | None, mask: torch.Tensor | None, block_n: int, block_k: int,
                      activation: str | None, negative_slope: float, need_input: bool, need_weight: bool,
                      need_bias: bool, t_grad_output: torch.Tensor | None, t_input: torch.Tensor | None,
                      t_weight: torch.Tensor | None, t_bias: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx' (*, K), dW' (N, K), db' (N,)), the tangents of linear_backward's (dx, dW, db), each nothing where
    not needed, of the tangents of grad_output (*, N), input, weight and bias (None for none, not all). The
    input may be None where no tangent needs it (no activation, and no dW)."""
    n, k = weight.shape
    rows = math.prod(grad_output.shape[:-1])
    layout = _layout(mask, block_n, block_k) if mask is not None else None
    x = input.reshape(rows, k) if input is not None else None
    t_x = t_input.reshape(rows, k) if t_input is not None else None
    z = t_z = None
    if activation is not None:
        z = _product(Rows.of(x), weight, bias, layout)
        t_z = sum_of_products([(t_x, weight), (x, t_weight)], t_bias, rows, n, layout)
    # dz = dy * act'(z), and its tangent dz' in g_z's place (kernels.dense_double_backward), db' its column sums.
    dz_for_input, dz_for_weight = need_input and t_weight is not None, need_weight and t_x is not None
    _, dz, t_dz, t_db = dense_double_backward.elementwise(
        Rows.of(grad_output), t_z, z, activation, negative_slope, False, dz_for_input or dz_for_weight, True,
        need_bias, Rows.of(t_grad_output) if t_grad_output is not None else None)
    t_dx = t_dw = None
    if need_input:  # dx = dz W: dx' = dz W' + dz' W, one GEMM over [dz | dz'] and [W'; W]
        terms = [(dz, t_weight) if dz_for_input else None, (t_dz, weight)]
        t_dx = _input_product(*_joined(terms, 1), layout).view(*grad_output.shape[:-1], k)
    if need_weight:  # dW = dz^T x: dW' = dz^T x' + dz'^T x, one GEMM over the rows of both
        t_dw = _weight_product(*_joined([(dz, t_x) if dz_for_weight else None, (t_dz, x)], 0), (n, k), layout)
    return tuple(t if t is not None else nothing(grad_output) for t in (t_dx, t_dw, t_db if need_bias else None))


def _backward_tangent_fake(grad_output, input, weight, bias, mask, block_n, block_k, activation, negative_slope,
                           need_input, need_weight, need_bias, t_grad_output, t_input, t_weight, t_bias):
    return _backward_op_fake(grad_output, None, input, weight, bias, mask, block_n, block_k, activation,
                             negative_slope, need_input, need_weight, need_bias, 0, 0)


tangent = Op("linear_tangent", _tangent, _tangent_fake, rows={0: 1, 2: 1, 7: 1})
backward_tangent = Op("linear_backward_tangent", _backward_tangent, _backward_tangent_fake)
