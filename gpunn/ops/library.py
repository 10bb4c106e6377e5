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

torch.func's transforms (grad, vjp, jacrev, vmap) refuse the custom op's autograd and take only an
autograd.Function with a separate setup_context; under them an op runs through a third form, with the same
setup_context and backward, whose vmap rule folds the samples into the rows where only an op's row
arguments are batched (what an op sums over rows, such as a weight's gradient or a loss, it then sums for
each sample apart: Op's `groups`; an op may bring a fold of its own, as the RNN's into its batch), and
otherwise runs the op once per sample. Each transform's rule unwraps its own tensors, so the kernels still
see plain ones. Forward mode (torch.func.jvp and eager dual tensors alike) runs an op's jvp rule where it has
one (Op's `jvp`), through the same Function. A second order under the transforms is refused (the first-order
backward ops are not differentiable there), as are forward mode through an op without a jvp rule, forward
mode over forward mode, and torch's legacy batched gradients (is_grads_batched). A call
under no_grad inside a grad-type transform is detached (see Op.__call__), and a backward run after its
transform ended reads the saved tensors unwrapped (saved_tensors).
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, NamedTuple

import torch
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

NAMESPACE = "gpunn"
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class Op:
    """A gpunn op: `op(*args)` runs it. See the module docstring for its three paths.

    name: the op's name in the gpunn namespace; fn: the implementation, with type annotations (the schema
    is inferred from them); fake: the fake implementation; setup_context and backward: the gradient formula
    as torch.library.register_autograd takes it (None for an op without one). A list-of-tensors argument
    counts as its tensors, in order, in ctx.needs_input_grad, and backward returns a list for it. rows: for
    an op that treats the leading dims of some tensor arguments as rows (every one of them with the same
    rows), those arguments' indices, each with its number of trailing (per-row) dims: torch.func.vmap over
    those alone then folds the samples into the rows, one launch for the batch. Either every output row is
    computed from those rows alone, or the op sums over rows and takes an int argument at index `groups`:
    0 sums over all rows, g > 0 sums each of g equal groups of consecutive rows apart, into outputs with a
    leading dim g (a per-sample weight gradient: the fold makes each sample a group). weights and members: for
    an op whose kernels also take a weight per group of rows (an ensemble's members), the weight arguments'
    indices, each with its number of per-member dims, and the index of its int argument `members` (0: one
    weight; E > 0: E members' weights stacked, each member's rows one after another): vmap over the weights
    too then folds each sample into a member. fold: for an op whose samples fold otherwise than into leading
    rows (an RNN's, into its batch, the second dim), its own Fold; `groups` then gives the index of its int
    argument counting the groups of its sums, as for `rows` (MOST_GROUPS bounds a fold's groups).
    jvp: forward mode's rule, jvp(args, outputs, tangents) -> a tangent (or None) for each output (one, for an
    op of one output), given the op's args, its outputs (a tuple, of one for an op of one output) and a tangent
    (or None) for each arg (lists as lists); it runs gpunn ops, as a backward does, so that outer transforms
    still fold. An op without one refuses forward mode.
    """

    def __init__(self, name: str, fn: Callable, fake: Callable, setup_context: Callable | None = None,
                 backward: Callable | None = None, rows: dict[int, int] | None = None, groups: int | None = None,
                 weights: dict[int, int] | None = None, members: int | None = None, fold: "Fold | None" = None,
                 jvp: Callable | None = None):
        self.name, self.fn, self.fake, self.rows, self.groups, self.jvp = name, fn, fake, rows, groups, jvp
        self.weights, self.members, self.fold = weights or {}, members, fold
        self.custom_op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        self.custom_op.register_fake(fake)
        self.function = None
        counts = tuple(index for index in (groups, members) if index is not None)
        if setup_context is not None and counts:
            setup_context = _ungrouped(name, counts, setup_context)
        if backward is not None:
            self.custom_op.register_autograd(_releasing(backward), setup_context=setup_context)
            self.function = _eager_function(name, fn, setup_context, backward)
        else:  # recorded only to refuse a further order (see __call__)
            self.refusing_function = _eager_function(name, fn, None, _refused(name))
        self.transform_function = _transform_function(self, setup_context)

    def __call__(self, *args):
        if forward_ad._current_level >= 0 and not torch.compiler.is_compiling() and self._forward_mode_meets(args):
            if self.jvp is None:  # the kernels see only the primal: a tangent would be dropped without a word
                raise forward_mode_refused(self.name)
            if _tracing():
                # A tracer (make_fx: torch.func.linearize) would record the kernels' outputs as allocations alone
                raise NotImplementedError(f"gpunn {self.name}: forward-mode AD under a tracing mode (torch.func."
                                          f"linearize, make_fx) is not supported; torch.func.jvp works")
            flat, lengths = _flatten(args)
            return self.transform_function.apply(lengths, *flat)  # the form with a jvp rule (and the backward)
        if torch.compiler.is_compiling() or not _all_plain(args) or _tracing():
            # (A tracer, make_fx, records the custom op; the kernels' launches it would not see.)
            return self.custom_op(*args)
        transform = torch._C._functorch.peek_interpreter_stack()
        if transform is not None:
            if transform.key() == torch._C._functorch.TransformType.Functionalize:
                return self.custom_op(*args)  # functionalize has no rule for an autograd.Function (torch: NYI)
            if not torch.is_grad_enabled() and _grad_without_forward_mode(args):
                # torch.func's grad rule runs a Function's forward with grad mode on, so every autograd around the
                # transform would record a call made under no_grad (where torch's layers are constants): what any
                # of them tracks is detached. (Not under forward mode, which no_grad does not stop: detaching
                # would drop the tangent its jvp rule carries.)
                args = _detached(args)
            function = self.transform_function
        elif torch.is_grad_enabled() and _any_requires_grad(args):
            # An op without a gradient formula (a backward op) meets tensors autograd records where a
            # transform's rule (vmap's) runs it for gradients an outer autograd tracks (or where it is called
            # directly on such tensors): recorded, so that differentiating them is refused, not silently lost.
            function = self.function or self.refusing_function
        else:
            return self.fn(*args)
        flat, lengths = _flatten(args)
        return function.apply(lengths, *flat)

    def _forward_mode_meets(self, args) -> bool:
        """Whether eager forward mode (a dual level) meets this call, to be run here, or refused before any launch
        where the op has no jvp rule: a dual argument, outside the transforms or right under torch.func's jvp
        (whose duals unpack_dual sees; beneath a vmap it cannot look). Under the transforms an op with a rule
        takes the transform path, whose jvp rule runs where forward mode reaches it."""
        transform = torch._C._functorch.peek_interpreter_stack()
        if transform is not None and (self.jvp is not None
                                      or transform.key() != torch._C._functorch.TransformType.Jvp):
            return False
        if _any_legacy_batched(args):  # which unpack_dual cannot look into
            raise NotImplementedError(f"gpunn {self.name}: vectorized forward-mode Jacobians (torch.autograd."
                                      f"functional.jacobian or hessian with vectorize=True and a forward-mode "
                                      f"strategy, gradcheck's check_batched_forward_grad) are not supported; "
                                      f"torch.func.jacfwd, or vectorize=False, work")
        return _any_dual(args)


def under_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, jvp, functionalize) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


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


def _grad_without_forward_mode(args) -> bool:
    """Whether a torch.func grad-type transform (grad, vjp, jacrev) is running and forward mode does not reach
    args (no jvp transform, no eager dual among them)."""
    kinds = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
    return torch._C._functorch.TransformType.Grad in kinds and not forward_mode_reaches(*args)


def _detached(args) -> tuple:
    """args with every tensor some autograd tracks (requires_grad_within; lists included) detached, the others
    (a mask, a target) as they are, so that caches keyed on them still hit. Outside inference mode, where a
    transform's wrapper cannot be detached (inference_mode(False) turns grad mode on too: detach ignores it)."""
    def detached(tensor):
        return tensor.detach() if isinstance(tensor, torch.Tensor) and requires_grad_within(tensor) else tensor

    with torch.inference_mode(False):
        return tuple([detached(t) for t in arg] if isinstance(arg, list) else detached(arg) for arg in args)


def _any_legacy_batched(args) -> bool:
    return any((isinstance(a, torch.Tensor) and torch._C._functorch.is_legacy_batchedtensor(a))
               or (isinstance(a, list) and _any_legacy_batched(a)) for a in args)


def _any_dual(args) -> bool:
    """Whether a tensor of args (lists included) carries a tangent at the current dual level, or wraps one that
    does: an eager dual carried into torch.func.vmap or grad is beneath their wrappers (and unpack_dual has no
    batching rule)."""
    return any(_dual(a) if isinstance(a, torch.Tensor) else isinstance(a, list) and _any_dual(a) for a in args)


def _dual(tensor: torch.Tensor) -> bool:
    return any(not torch._C._functorch.is_batchedtensor(level) and _tangent_of(level) is not None
               for level in _levels(tensor))


def _levels(tensor: torch.Tensor):
    """tensor, then each tensor the torch.func wrappers (vmap's batched tensors, grad's and jvp's) hold
    beneath it, outermost first."""
    functorch = torch._C._functorch
    while True:
        yield tensor
        if not (functorch.is_batchedtensor(tensor) or functorch.is_gradtrackingtensor(tensor)):
            return
        tensor = functorch.get_unwrapped(tensor)


def _tangent_of(tensor: torch.Tensor) -> torch.Tensor | None:
    try:
        return forward_ad.unpack_dual(tensor).tangent
    except RuntimeError:
        # unpack_dual asserts on an inference tensor where inference mode is on (a vmap rule may have left
        # it): such a tensor carries no tangent. (One made a dual outside inference mode does carry one.)
        if tensor.is_inference():
            return None
        raise


def _any_requires_grad(args, within=False) -> bool:
    """Whether a tensor of args (lists included) requires grad; within: or a tensor a torch.func transform
    wraps in it (see requires_grad_within)."""
    test = requires_grad_within if within else (lambda tensor: tensor.requires_grad)
    return any((isinstance(a, torch.Tensor) and test(a)) or (isinstance(a, list) and _any_requires_grad(a, within))
               for a in args)


def requires_grad_within(tensor: torch.Tensor | None) -> bool:
    """Whether tensor, or a tensor a torch.func transform wraps in it, requires grad: under nested transforms a
    tensor is the next level's wrapper (a vmap's batched tensor), which reports False even where autograd, or
    a torch.func grad further out, records the tensor inside it."""
    if tensor is None:
        return False
    if tensor.requires_grad or torch.compiler.is_compiling() or not under_transform():
        return tensor.requires_grad  # wrappers exist only while a transform runs (compiled code takes none)
    return any(level.requires_grad for level in _levels(tensor))


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
        _setup_flat(ctx, lengths, args, output, setup_context)
        return tuple(output) if isinstance(output, list) else output  # autograd tracks no tensor in a list

    return type(f"{name}_function", (torch.autograd.Function,), dict(
        forward=staticmethod(forward), backward=staticmethod(_flat_backward(name, backward))))


def _refused(name: str) -> Callable:
    """A backward that refuses: a further order than gpunn's gradients take (see second_order_under_transform),
    or, for a forward-mode rule's op (named *_tangent), outside the transforms, than its tangents take."""

    def backward(ctx, *grads):
        if name.endswith("_tangent") and not under_transform():
            raise NotImplementedError(f"gpunn::{name}: differentiating a forward-mode tangent (a further order) "
                                      f"is not supported")
        raise second_order_under_transform(name)

    return backward


def _transform_function(op: Op, setup_context: Callable | None):
    """The autograd.Function that runs op under torch.func transforms, which take only this form (a separate
    setup_context) and the custom op's not at all (torch refuses its autograd there). Each transform takes
    its rule from it: grad and its kin the op's own setup_context and the eager form's backward (for an op
    without one, the first-order backward ops, a backward that refuses: a further order under the
    transforms), jvp the op's jvp rule (refused without one), vmap the op over the samples' rows folded
    together, or once per sample. The rules unwrap each transform's tensors before the next one's, so the
    forward, and so the kernels, see plain tensors. Eager forward-mode AD (torch.autograd.forward_ad) runs
    through it too."""

    def forward(lengths, *flat):
        output = op.fn(*_unflatten(flat, lengths))
        return tuple(output) if isinstance(output, list) else output  # autograd tracks no tensor in a list

    def setup(ctx, inputs, output):
        lengths, *flat = inputs
        _setup_flat(ctx, lengths, _unflatten(flat, lengths), output, setup_context)
        if op.jvp is not None and forward_ad._current_level >= 0:
            # (torch.func's jvp runs this at each level, with the tangents out of sight beneath its own)
            _save_for_forward(ctx, flat, output)
            ctx.took_duals = not under_transform() and _any_dual(flat)

    def jvp(ctx, _, *tangents):
        if op.jvp is None:
            raise forward_mode_refused(op.name)
        if _jvp_levels() > 1:
            # torch runs a jvp rule with forward grad off: torch ops inside one would drop an outer level's tangents
            raise NotImplementedError(f"gpunn {op.name}: forward mode over forward mode (jvp of jvp, "
                                      f"jacfwd(jacfwd(f))) is not supported; torch.func.hessian (jacfwd over "
                                      f"jacrev) is")
        args, outputs = _saved_for_forward(ctx)
        results = op.jvp(_unflatten(args, ctx.lengths), outputs, _unflatten(tangents, ctx.lengths))
        results = (results,) if ctx.single_output else results
        # Every output needs a tangent (torch fails on None): an output without one gets zeros, expanded.
        results = tuple(tangent if tangent is not None else output.new_zeros(()).expand_as(output)
                        for tangent, output in zip(results, outputs))
        return results[0] if ctx.single_output else results

    def vmap(info, in_dims, lengths, *flat):
        """The op once over the samples' rows folded together where only its row arguments are batched (see
        Op's `rows`; or as the op's own Fold folds them); else once per sample, each output stacked along a
        new first dim, an output left empty (see `nothing`) stacking to (B, 0), again empty per sample.
        (torch's fallback for a custom op, which does the same, takes no list arguments.)"""
        args, dims = _unflatten(flat, lengths), _unflatten(in_dims[1:], lengths)
        if info.batch_size and _foldable(op, args, dims):
            return _folded_in_chunks(op, info.batch_size, args, dims)
        if info.batch_size:
            samples, stack = [op(*_sample(args, dims, i)) for i in range(info.batch_size)], torch.stack
        else:  # no sample to run: the fake implementation gives the shapes
            samples = [op.fake(*_sample(args, dims, None))]
            stack = lambda column, dim: column[0].new_empty((0, *column[0].shape))  # noqa: E731
        return _joined(samples, stack)

    return type(f"{op.name}_transform_function", (torch.autograd.Function,), dict(
        forward=staticmethod(forward), setup_context=staticmethod(setup),
        backward=staticmethod(op.function.backward if op.function is not None else _refused(op.name)),
        jvp=staticmethod(jvp), vmap=staticmethod(vmap)))


def forward_mode_reaches(*tensors) -> bool:
    """Whether forward-mode AD may reach a call on these tensors (lists included): torch.func's jvp running, or
    a dual tensor among them, or beneath a transform's wrapper of one (an open dual level alone changes
    nothing)."""
    if forward_ad._current_level < 0 or torch.compiler.is_compiling():  # (dynamo cannot trace the queries)
        return False
    return _jvp_levels() > 0 or _any_dual(tensors)  # (torch.func's jvp: its duals are beneath its wrappers)


def took_duals(ctx, *tensors) -> bool:
    """Whether forward mode reaches a backward: its forward took eager dual tensors (the transform Function's
    setup records it), or forward mode reaches `tensors` (a gradient arriving: forward_mode_reaches). The
    dense, masked and recurrent layers' backward then runs as their differentiable op, whose jvp rule gives
    the gradient its tangent."""
    return forward_ad._current_level >= 0 and (getattr(ctx, "took_duals", False) or forward_mode_reaches(*tensors))


def _tracing() -> bool:
    """Whether make_fx traces (its proxy mode, or a fake mode, is active), not a pass-through dispatch mode.
    (Every op call asks: without any dispatch mode, the stack's length answers at a tenth of the cost.)"""
    return bool(torch._C._len_torch_dispatch_stack()) and any(
        torch._C._get_dispatch_mode(key) is not None
        for key in (torch._C._TorchDispatchModeKey.PROXY, torch._C._TorchDispatchModeKey.FAKE))


def _jvp_levels() -> int:
    """How many torch.func jvp transforms are running (a jvp rule runs with its own still on the stack)."""
    return sum(interpreter.key() == torch._C._functorch.TransformType.Jvp
               for interpreter in retrieve_all_functorch_interpreters())


_SAVED = object()  # marks, in ctx.for_forward, a value that went through save_for_forward


def _save_for_forward(ctx, flat: list, output) -> None:
    """What an op's jvp rule reads, its flattened args and its outputs, for _saved_for_forward: tensors
    through save_for_forward; an inference tensor (a mask cached under inference_mode: autograd refuses to
    save one), and every other value, as it is."""
    ctx.single_output = isinstance(output, torch.Tensor)
    outputs = (output,) if ctx.single_output else tuple(output)
    values = [*flat, *outputs]
    saved = [isinstance(value, torch.Tensor) and not value.is_inference() for value in values]
    ctx.save_for_forward(*(value for value, save in zip(values, saved) if save))
    ctx.for_forward = ([_SAVED if save else value for value, save in zip(values, saved)], len(outputs))


def _saved_for_forward(ctx) -> tuple[list, tuple]:
    """(the flattened args, the outputs) _save_for_forward kept, once."""
    values, count = ctx.for_forward
    ctx.for_forward = None
    tensors = iter(ctx.saved_tensors)
    values = [next(tensors) if value is _SAVED else value for value in values]
    return values[:-count], tuple(values[-count:])


def _setup_flat(ctx, lengths: tuple, args: tuple, output, setup_context: Callable | None) -> None:
    """The op's setup_context, for a Function whose inputs are `lengths` and the flattened args."""
    # An output nobody differentiates (act'(z), a logsumexp) gets None, not a tensor of zeros, in backward.
    ctx.set_materialize_grads(False)
    ctx.needs_input_grad = ctx.needs_input_grad[1:]  # as the custom op's: without `lengths`
    ctx.lengths = lengths
    if setup_context is not None:
        setup_context(ctx, args, output)


def _flat_backward(name: str, backward: Callable) -> Callable:
    """The op's backward, for a Function whose inputs are `lengths` and the flattened args."""

    def backward_flat(ctx, *grads):
        if all(grad is None for grad in grads):  # no gradient reached any output: none to pass on
            return (None,) * (1 + sum(max(length, 1) for length in ctx.lengths))
        first = grads[0] if grads[0] is not None else next(grad for grad in grads if grad is not None)
        if torch._C._functorch.is_legacy_batchedtensor(first):
            # torch's legacy vmap (not torch.func's; it batches every gradient) has no rules gpunn could give:
            # the kernels would get its batched tensors
            raise NotImplementedError(f"gpunn {name}: batched gradients (torch.autograd.grad with "
                                      f"is_grads_batched=True, torch.autograd.functional.jacobian or hessian "
                                      f"with vectorize=True) are not supported; torch.func.jacrev and "
                                      f"torch.func.vmap over torch.func.vjp, or jacobian without vectorize, work")
        flat = []
        for grad, length in zip(backward(ctx, *grads), ctx.lengths):
            flat += [grad] if length < 0 else grad if grad is not None else [None] * length
        return (None, *flat)

    return _releasing(backward_flat)


def _releasing(backward: Callable) -> Callable:
    """backward, then release_kept, however it ends."""

    def run(ctx, *grads):
        try:
            return backward(ctx, *grads)
        finally:
            release_kept(ctx)

    return run


def _ungrouped(name: str, counts: tuple[int, ...], setup_context: Callable) -> Callable:
    """setup_context, refusing a call autograd records with per-group sums or members (its groups or members
    argument > 0): the op's backward takes one sum over all rows and one weight, and would misread them
    (torch.func's fold makes no such call; see _foldable)."""

    def setup(ctx, inputs, output):
        if any(inputs[index] for index in counts):
            raise NotImplementedError(f"gpunn {name}: sums over groups of rows or members (groups > 0, members > 0) "
                                      f"are not differentiable")
        setup_context(ctx, inputs, output)

    return setup


def _foldable(op: Op, args: list, dims: list) -> bool:
    """Whether vmap may fold op's samples into its rows (or as its own Fold says): only its row arguments are
    batched (or its weights too: each sample a member), and, for an op that sums over rows or takes members,
    no autograd records the call (eager autograd, or a torch.func grad beneath this vmap: either makes the
    arguments, or the tensors their outer transforms' wrappers hold, require grad).
    Its backward takes the sums over all rows (groups 0) and one weight, so it would misread per-sample sums
    or members; recorded, the op runs once per sample."""
    if op.fold is not None:
        return op.fold.applies(args, dims) and _unrecorded_or_plain(op, args, op.groups is not None)
    if not op.rows or any(batched(dim) for i, dim in enumerate(dims) if i not in op.rows and i not in op.weights):
        return False
    member_fold = _member_fold(op, dims)
    if op.members is not None and args[op.members] and not member_fold:
        # An inner vmap's members, each a run of rows: folding these samples into the rows would interleave
        # the members' rows, and making each sample a member would copy every weight once a sample.
        return False
    return _unrecorded_or_plain(op, args, op.groups is not None or member_fold)


def _unrecorded_or_plain(op: Op, args: list, splits: bool) -> bool:
    """Whether a fold that splits op's sums into groups or members (splits) may run: op's backward (if it has
    one) would misread them, so only where autograd does not record the call."""
    if not splits or op.function is None:
        return True
    # Forward mode (jacfwd(jacrev(f)), an eager dual carried into vmap) runs the op's jvp rule, which takes sums
    # over all rows and one weight too.
    return not (torch.is_grad_enabled() and _any_requires_grad(args, within=True)) and not forward_mode_reaches(*args)


class Fold(NamedTuple):
    """An op's own vmap fold (Op's `fold`): applies(args, in_dims) says whether vmap may fold the samples, and
    run(batch, args, in_dims) runs the op once for them all and returns vmap's (outputs, out_dims). As for
    Op's `rows`, a fold of an op with groups and a gradient formula runs only where autograd does not record
    the call (_foldable); one without a formula is recorded as refusing a further order (Op.__call__)."""

    applies: Callable[[list, list], bool]
    run: Callable[[int, list, list], tuple]


def _member_fold(op: Op, dims: list) -> bool:
    """Whether a fold makes each sample a member (of each sample's members): some weight argument is batched."""
    return any(batched(dims[i]) for i in op.weights)


def _folded(op: Op, batch: int, args: list, dims: list) -> tuple:
    """vmap's (outputs, out_dims) of op run once, its row arguments' samples folded into their rows: each
    batched one's batch dim moved to the front and merged with its leading dims, an unbatched one expanded
    to every sample first; an op that sums over rows sums each sample's apart (its groups, each of a sample's
    groups, or the sample's rows); where a weight is batched, each sample is a member (its weights folded as
    the rows are, its members each of a sample's members, or the sample). Each output is the samples' rows,
    or sums, again, shaped per sample as the fake implementation says (the placeholder of an output not
    asked for, (0,), becomes (B, 0), again empty per sample)."""
    folded = list(args)
    merged = dict(op.rows)
    if op.groups is not None:
        folded[op.groups] = batch * max(args[op.groups], 1)
    if _member_fold(op, dims):
        folded[op.members] = batch * max(args[op.members], 1)
        merged.update(op.weights)
    for i, trailing in merged.items():
        arg, dim = args[i], dims[i]
        if arg is not None:
            arg = arg.movedim(dim, 0) if dim is not None else arg.expand(batch, *arg.shape)
            lead = arg.dim() - trailing
            # Contiguous: some kernels index their rows densely (a loss's elements, targets and totals; what a
            # forward saved, act'(z)), and a sample's rows folded from a strided batch (a column, x[:, 0]; one
            # sample of a chunk) or an expanded one (an unbatched argument, stride 0) reshape to a view at other
            # strides: read densely, other samples' values, or past the tensor's end.
            rows = math.prod(arg.shape[:lead])  # not -1: rows of nothing
            folded[i] = arg.reshape(rows, *arg.shape[lead:]).contiguous()
    outputs, shapes = op(*folded), op.fake(*_sample(args, dims, None, "meta"))  # shapes only: nothing allocated
    single = isinstance(outputs, torch.Tensor)
    outputs, shapes = ((outputs,), (shapes,)) if single else (outputs, shapes)
    results = tuple(out.reshape(batch, *like.shape) for out, like in zip(outputs, shapes))
    return (results[0], 0) if single else (results, (0,) * len(results))


# The most groups (or members) one fold makes: kernels put them on a grid axis CUDA limits to 65535 blocks.
MOST_GROUPS = 65535


def _folded_in_chunks(op: Op, batch: int, args: list, dims: list) -> tuple:
    """_folded (or op's own Fold), over as many samples at a time as make at most MOST_GROUPS groups or
    members, each output joined along its out_dim."""
    fold = op.fold.run if op.fold else lambda batch, args, dims: _folded(op, batch, args, dims)
    counts = [args[op.groups]] if op.groups is not None else []
    counts += [args[op.members]] if _member_fold(op, dims) else []
    per = MOST_GROUPS // max(1, *counts) if counts else batch
    if batch <= per:
        return fold(batch, args, dims)
    chunks = [(start, min(per, batch - start)) for start in range(0, batch, per)]
    outputs, out_dims = zip(*(fold(length, _narrowed(args, dims, start, length), dims) for start, length in chunks))
    return _joined(list(outputs), torch.cat, out_dims[0])


def _narrowed(args, in_dims, start: int, length: int) -> list:
    """args with samples [start, start + length) of each batched tensor, lists included."""
    return [arg if dim is None else arg.narrow(dim, start, length) if isinstance(arg, torch.Tensor)
            else _narrowed(arg, dim, start, length) for arg, dim in zip(args, in_dims)]


def _joined(parts: list, join: Callable, dims: int | tuple = 0) -> tuple:
    """vmap's (outputs, out_dims) from per-part results (a tensor each, or a tuple of them), each output the
    join (stack, cat) of its parts along its batch dim: dims, one for all outputs or one each."""
    if isinstance(parts[0], torch.Tensor):
        return join(parts, dims), dims
    dims = dims if isinstance(dims, tuple) else (dims,) * len(parts[0])
    return tuple(join(column, dim) for column, dim in zip(zip(*parts), dims)), dims


def batched(dim) -> bool:
    """Whether an argument's in_dims entry batches it (a list's entry is one per element)."""
    return any(batched(d) for d in dim) if isinstance(dim, (list, tuple)) else dim is not None


def _sample(args, in_dims, i: int | None, device=None) -> list:
    """args with sample i taken from each batched tensor (in_dims: its batch dim, or None), lists included;
    i None: an empty tensor of a sample's shape in its place (on `device`, else the tensor's)."""
    def one(tensor, dim):
        if i is not None:
            return tensor.select(dim, i)
        return tensor.new_empty(tensor.shape[:dim] + tensor.shape[dim + 1:], device=device)

    return [arg if dim is None else one(arg, dim) if isinstance(arg, torch.Tensor) else _sample(arg, dim, i, device)
            for arg, dim in zip(args, in_dims)]


def sum_of(*terms):
    """The sum of the terms not None, by torch (None where every one is): a jvp rule's terms."""
    terms = [term for term in terms if term is not None]
    return sum(terms[1:], terms[0]) if terms else None


def forward_mode_refused(op: str) -> NotImplementedError:
    """The error for a tangent reaching an op: its kernels would drop it."""
    return NotImplementedError(f"gpunn::{op} does not support forward-mode AD (a dual tensor reached it)")


def second_order_under_transform(op: str) -> NotImplementedError:
    """The error for differentiating gradients an op's backward computed under torch.func transforms."""
    return NotImplementedError(f"gpunn {op}: differentiating gradients computed under torch.func transforms (a "
                               f"second order) is not supported here; without the transforms, torch.autograd.grad "
                               f"with create_graph=True and torch.autograd.functional.hessian take it")


def metadata_to_save(ctx, name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """What to pass to save_for_backward for a non-differentiable metadata tensor (a mask, batch sizes):
    the tensor, except one made under torch.inference_mode, which autograd refuses to save (a layout cached
    during an evaluation pass holds one): that one is kept as ctx.<name> (it has no version counter to
    check anyway) and None is saved. saved_metadata() gives it back in backward."""
    inference = tensor is not None and tensor.is_inference()
    setattr(ctx, name, tensor if inference else None)
    return None if inference else tensor


def saved_metadata(ctx, name: str, saved: torch.Tensor | None) -> torch.Tensor | None:
    """The metadata tensor metadata_to_save took: ctx.<name> where it kept it there, else what was saved."""
    kept = getattr(ctx, name)
    return kept if kept is not None else saved


def nothing(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an output that was not requested."""
    return like.new_empty(0)


def arrived(grad: torch.Tensor | None, shape) -> torch.Tensor | None:
    """A gradient handed to a double backward, or None where none reached its output: autograd passes None
    there, or (the custom op's path) zeros the size of the `nothing` placeholder, (0,). An output of no
    elements still has its gradient arrive (empty), so that its inputs count as used, as torch's do; where
    it is (0,) too, the placeholder and an empty gradient give the same empty result."""
    return grad if grad is not None and tuple(grad.shape) == tuple(shape) else None


def refuse_double_backward(op: str, order: str = "double") -> None:
    """Where the kernels' gradients are not differentiable, refuse create_graph=True rather than hand back
    gradients that would silently act as constants in a further differentiation. Under torch.func
    transforms, which run every backward with grad mode on, the kernels would see the transforms' wrapped
    tensors: refused too (the double backward itself is not reached by a first order there)."""
    if under_transform():
        raise second_order_under_transform(op)
    if torch.is_grad_enabled():
        raise RuntimeError(f"gpunn {op} does not support {order} backward (create_graph=True)")


def save_for_orders(ctx, first: tuple, second: tuple) -> None:
    """ctx.save_for_backward(*first), and `second`: what only double backward reads, beyond `first` (kept()
    gives each back by its index). Kept as references outside save_for_backward, with their versions, so
    that first-order backward allows an in-place change of them after the forward, as torch's layers do
    (kept() checks the versions when double backward reads them), and dropped when a first-order backward
    frees the graph (release_kept), as autograd drops what it saved. Where saved-tensor hooks are active
    (torch.utils.checkpoint, torch.autograd.graph.save_on_cpu), those that are not parameters (which their
    modules hold anyway) go through save_for_backward instead, for the hooks to free or move like every
    tensor saved; kept() still refuses one changed in place since the forward, where it is alive to tell.
    Under torch.autograd.graph.allow_mutation_on_saved_tensors every one goes through the hooks, parameters
    too: the context keeps a copy of what changes in place, and kept() gives that copy without refusing."""
    ctx.first_order_count = len(first)
    if not _saved_tensor_hooks_active():
        save(ctx, *first)
        ctx.for_second_order = [(t, _version(t)) for t in second]
        return
    mutable = getattr(torch.autograd.graph, "_allow_mutation_on_saved_tensors_enabled", False)
    hooked = [t is not None and (mutable or not isinstance(t, torch.nn.Parameter)) for t in second]
    save(ctx, *first, *(t for t, hook in zip(second, hooked) if hook))
    positions = iter(range(len(first), len(first) + sum(hooked)))
    # A hooked entry: (where the unpacked tensors hold it, a weak reference to tell an in-place change by).
    ctx.for_second_order = [(_Hooked(next(positions), weakref.ref(t)), None if mutable else _version(t)) if hook
                            else (t, _version(t)) for t, hook in zip(second, hooked)]


class _Hooked(NamedTuple):
    position: int  # in the backward's unpacked saved tensors
    original: weakref.ref


def _version(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None or tensor.is_inference() else tensor._version


def save(ctx, *tensors: torch.Tensor | None) -> None:
    """ctx.save_for_backward(*tensors), unless every one is None: then nothing is saved, and saved_tensors()
    gives the Nones back without asking autograd, which refuses once a backward has freed the graph. So a
    backward that needs nothing saved runs again on a freed graph, as torch's nodes that saved nothing do (a
    layer without activation whose bias alone needs a gradient: a second loss, or a gradient penalty)."""
    # The count of Nones saved_tensors() gives back where nothing was saved, else None.
    ctx.nones_saved = len(tensors) if all(t is None for t in tensors) else None
    if ctx.nones_saved is None:
        ctx.save_for_backward(*tensors)


def saved_tensors(ctx) -> tuple:
    """What save() saved (ctx.saved_tensors), with the wrappers of a torch.func transform that has ended
    unwrapped: a vjp_fn called after torch.func.vjp returned (or jacrev's) runs the backward with them, and
    where grad mode is off the first-order ops would hand them to the kernels as they are (an
    autograd.Function's apply, the path with grad mode on, unwraps them itself)."""
    if getattr(ctx, "nones_saved", None) is not None:
        return (None,) * ctx.nones_saved
    saved = ctx.saved_tensors
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if under_transform() or not any(t is not None and wrapped(t) for t in saved):
        return saved
    return tuple(_unwrapped(t) for t in saved)


def _unwrapped(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """tensor without functorch's wrappers: those of transforms that have ended, where none runs (see
    saved_tensors)."""
    functorch = torch._C._functorch
    while tensor is not None and functorch.is_functorch_wrapped_tensor(tensor):
        tensor = functorch.get_unwrapped(tensor)
    return tensor


def first_order_saved(ctx) -> tuple:
    """What save_for_orders saved for first order (its `first`), unpacked (saved_tensors). The backward's one
    unpacking (torch.utils.checkpoint refuses a second): what went through the hooks for second order is held
    for kept() until the backward returns (release_kept)."""
    saved = saved_tensors(ctx)
    ctx.unpacked = saved
    return saved[:ctx.first_order_count]


def kept(ctx, index: int, saved: torch.Tensor | None, op: str, name: str) -> torch.Tensor | None:
    """A tensor first order saved, or else save_for_orders' `second` at `index`, checked unchanged since
    the forward."""
    if saved is not None:
        return saved
    entry, version = ctx.for_second_order[index]
    if entry is _RELEASED:
        raise RuntimeError(f"Trying to backward through the graph a second time: gpunn {op}'s {name}, kept for "
                           f"double backward, was freed by an earlier backward. Specify retain_graph=True there "
                           f"to backward through it again.")
    if isinstance(entry, _Hooked):
        tensor, original = ctx.unpacked[entry.position], entry.original()
    else:
        tensor = original = entry
    if _changed(original, version):
        raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an inplace "
                           f"operation: gpunn {op}'s {name} is at version {original._version}; expected version "
                           f"{version} instead (double backward needs it)")
    return tensor if under_transform() else _unwrapped(tensor)


def _changed(tensor: torch.Tensor | None, version: int | None) -> bool:
    return tensor is not None and version is not None and tensor._version != version


_RELEASED = object()  # in place of a tensor save_for_orders kept, once a backward freed the graph


def release_kept(ctx) -> None:
    """After a first-order backward: drop its unpacked tensors, and, where it freed the graph, what
    save_for_orders kept (what it kept as None stays None)."""
    ctx.unpacked = None
    if getattr(ctx, "for_second_order", None) is not None and not _graph_kept():
        ctx.for_second_order = [(None, None) if entry is None else (_RELEASED, None)
                                for entry, _ in ctx.for_second_order]


def differentiable_backward(ctx) -> bool:
    """Whether a first-order backward is to run as ops autograd can differentiate: under create_graph=True,
    and under torch.func, which runs every backward in grad mode so that a backward's ops can be
    differentiated by a transform or by autograd outside one; there, not where a tensor kept for second order
    changed in place since the forward: first order, which does not read it, then runs through the
    first-order ops, which refuse a further order."""
    if not torch.is_grad_enabled():
        return False
    return not under_transform() or not any(
        _changed(entry, version) for entry, version in ctx.for_second_order or () if not isinstance(entry, _Hooked))


# Private autograd queries (present in the torch versions gpunn runs on; looked up once, and where one is
# missing gpunn keeps what it kept before: references for the graph's life).
_top_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_keeps_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _saved_tensor_hooks_active() -> bool:
    return _top_saved_tensor_hooks is not None and _top_saved_tensor_hooks(False) is not None


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph, create_graph); True where torch cannot say."""
    return _keeps_graph is None or _keeps_graph()
