"""How gpunn's ops meet torch: each one is a torch.library custom op, `gpunn::<name>`, with a fast eager path.

A custom op is one opaque node to torch.compile (fullgraph included): its fake implementation gives the
tracer output shapes, its real one launches the Triton kernels, and the gradient formula registered with it
calls the backward ops, which are ops of this kind too. Custom ops take tensors, numbers, strings and lists
of them, and return new tensors; where an output exists only on request (act'(z) when asked to save it, a
weight's gradient when it needs one), an op returns an empty tensor in its place and the caller, which made
the request, ignores it.

Going through torch's custom-op machinery costs host time on every call (argument normalisation, alias
checks, a redispatch: about twice the wrapper time of a plain autograd.Function for a layer's forward and
backward, measured on a CPU). Ops are therefore called through `Op`: on plain tensors outside compilation
it runs the implementation directly, or through an autograd.Function made of the very same setup_context
and backward when autograd records the call; anything else (the compiler's fake and functional tensors,
other tensor subclasses) goes through the custom op.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import forward_ad

NAMESPACE = "gpunn"
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class Op:
    """A gpunn op: `op(*args)` runs it. See the module docstring for the two paths.

    name: the op's name in the gpunn namespace; fn: the implementation, with type annotations (the schema
    is inferred from them); fake: the fake implementation; setup_context and backward: the gradient formula
    as torch.library.register_autograd takes it (None for an op without one). A list-of-tensors argument
    counts as its tensors, in order, in ctx.needs_input_grad, and backward returns a list for it.
    """

    def __init__(self, name: str, fn: Callable, fake: Callable, setup_context: Callable | None = None,
                 backward: Callable | None = None):
        self.name, self.fn = name, fn
        self.custom_op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        self.custom_op.register_fake(fake)
        self.function = None
        if backward is not None:
            self.custom_op.register_autograd(backward, setup_context=setup_context)
            self.function = _eager_function(name, fn, setup_context, backward)

    def __call__(self, *args):
        if forward_ad._current_level >= 0 and _any_dual(args):
            # The kernels see only the primal: a tangent would be dropped without a word.
            raise NotImplementedError(f"gpunn::{self.name} does not support forward-mode AD (a dual tensor "
                                      f"reached it)")
        if torch.compiler.is_compiling() or not _all_plain(args):
            return self.custom_op(*args)
        if self.function is None or not (torch.is_grad_enabled() and _any_requires_grad(args)):
            return self.fn(*args)
        flat, lengths = _flatten(args)
        return self.function.apply(lengths, *flat)


def _all_plain(args) -> bool:
    for arg in args:
        kind = type(arg)
        if kind in _PLAIN:
            continue
        if kind is list:
            if not _all_plain(arg):
                return False
        elif isinstance(arg, torch.Tensor):
            return False
    return True


def _any_dual(args) -> bool:
    return any((isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None)
               or (isinstance(a, list) and _any_dual(a)) for a in args)


def _any_requires_grad(args) -> bool:
    return any((isinstance(a, torch.Tensor) and a.requires_grad)
               or (isinstance(a, list) and _any_requires_grad(a)) for a in args)


def _flatten(args) -> tuple[list, tuple]:
    """args with each list of tensors spliced in, and the list lengths (-1 for an argument that is not one)."""
    flat, lengths = [], []
    for arg in args:
        if isinstance(arg, list) and arg and isinstance(arg[0], torch.Tensor):
            flat += arg
            lengths.append(len(arg))
        else:
            flat.append(arg)
            lengths.append(-1)
    return flat, tuple(lengths)


def _unflatten(flat, lengths) -> tuple:
    args, i = [], 0
    for length in lengths:
        if length < 0:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + length]))
            i += length
    return tuple(args)


def _eager_function(name: str, fn: Callable, setup_context: Callable, backward: Callable):
    """An autograd.Function with fn as forward and the custom op's own setup_context and backward: the eager
    twin of the custom op's autograd, on list arguments flattened (as ctx.needs_input_grad sees them). The
    forward takes ctx itself (a separate setup_context staticmethod makes autograd bind the signature on
    every call)."""

    def forward(ctx, lengths, *flat):
        args = _unflatten(flat, lengths)
        output = fn(*args)
        # An output nobody differentiates (act'(z), a logsumexp) gets None, not a tensor of zeros, in backward.
        ctx.set_materialize_grads(False)
        ctx.needs_input_grad = ctx.needs_input_grad[1:]  # as the custom op's: without `lengths`
        ctx.lengths = lengths
        setup_context(ctx, args, output)
        return output

    def backward_flat(ctx, *grads):
        if all(grad is None for grad in grads):  # no gradient reached any output: none to pass on
            return (None,) * (1 + sum(max(length, 1) for length in ctx.lengths))
        flat = []
        for grad, length in zip(backward(ctx, *grads), ctx.lengths):
            flat += [grad] if length < 0 else grad if grad is not None else [None] * length
        return (None, *flat)

    return type(f"{name}_function", (torch.autograd.Function,), dict(
        forward=staticmethod(forward), backward=staticmethod(backward_flat)))


def metadata_to_save(ctx, name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """What to pass to save_for_backward for a non-differentiable metadata tensor (a mask, batch sizes):
    the tensor, except one made under torch.inference_mode, which autograd refuses to save (a layout cached
    during an evaluation pass holds one): that one is kept as ctx.<name> (it has no version counter to
    check anyway) and None is saved. saved_metadata() gives it back in backward."""
    inference = tensor is not None and tensor.is_inference()
    setattr(ctx, name, tensor if inference else None)
    return None if inference else tensor


def saved_metadata(ctx, name: str, saved: torch.Tensor | None) -> torch.Tensor | None:
    kept = getattr(ctx, name)
    return kept if kept is not None else saved


def nothing(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an output that was not requested."""
    return like.new_empty(0)


def arrived(grad: torch.Tensor | None, shape) -> torch.Tensor | None:
    """A gradient handed to a double backward, or None where none reached its output: autograd passes None
    there, or (the custom op's path) zeros the size of the `nothing` placeholder."""
    return grad if grad is not None and grad.numel() and tuple(grad.shape) == tuple(shape) else None


def refuse_double_backward(op: str, order: str = "double") -> None:
    """Where the kernels' gradients are not differentiable, refuse create_graph=True rather than hand back
    gradients that would silently act as constants in a further differentiation."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"gpunn {op} does not support {order} backward (create_graph=True)")


def keep_for_second_order(ctx, tensors) -> None:
    """Keep references to what double backward needs beyond what first order saves, with their versions.
    Outside save_for_backward, so that first-order backward allows an in-place change of them after the
    forward, as torch's layers do; kept() checks their versions when double backward needs them."""
    ctx.for_second_order = [(t, None if t is None or t.is_inference() else t._version) for t in tensors]


def kept(ctx, index: int, saved: torch.Tensor | None, op: str, name: str) -> torch.Tensor | None:
    """A tensor first order saved, or else the reference keep_for_second_order kept at `index`, checked
    unchanged since the forward."""
    if saved is not None:
        return saved
    tensor, version = ctx.for_second_order[index]
    if tensor is not None and version is not None and tensor._version != version:
        raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an inplace "
                           f"operation: gpunn {op}'s {name} is at version {tensor._version}; expected version "
                           f"{version} instead (double backward needs it)")
    return tensor
