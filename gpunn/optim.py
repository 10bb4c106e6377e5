"""gpunn.optim.SGD: torch.optim.SGD whose update runs as Triton kernels, one launch per parameter group,
dtype and device (gpunn.kernels.sgd), instead of one or more launches per tensor and elementwise op."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim.sgd import sgd as torch_sgd

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support: no sharded parameters to meet
    DTensor = ()

from .kernels import sgd as sgd_kernels
from .kernels.runtime import triton_runs_on


def _local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor the kernel updates: a DTensor's (FSDP2's) local shard, which shares its storage; a complex
    tensor as its real view (the update is linear, so real and imaginary parts update independently, as
    torch's SGD does through the same view)."""
    tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return torch.view_as_real(tensor) if tensor is not None and tensor.is_complex() else tensor


def _unflagged(*tensors: torch.Tensor | None) -> bool:
    """Whether each tensor (or None) is strided and reads as its memory holds it: no lazy conjugation or
    negation (a gradient can arrive as such a view), which the kernel, reading raw memory, would miss."""
    return all(t is None or (t.layout == torch.strided and not t.is_conj() and not t.is_neg()) for t in tensors)


def _kernel_takes(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None) -> bool:
    """Whether the kernel can update p (unwrapped by _local) from g and buf (None for none): plain tensors (no
    subclass that dispatches ops of its own) of p's floating dtype, shape and device, contiguous, each aligned
    to its element size, on a device gpunn's kernels run on, p and buf writable (not inference tensors outside
    inference_mode). Any other takes torch's SGD, which steps it or raises its error."""
    outside_inference = not torch.is_inference_mode_enabled()
    return (p.dtype.is_floating_point and triton_runs_on(p.device)
            and not (outside_inference and (p.is_inference() or (buf is not None and buf.is_inference())))
            and all(type(t).__torch_dispatch__ is torch.Tensor.__torch_dispatch__ and t.dtype == p.dtype
                    and t.shape == p.shape and t.device == p.device and t.is_contiguous()
                    and t.data_ptr() % t.element_size() == 0 for t in (p, g, buf) if t is not None))


def _learning_rate(group: dict, device: torch.device) -> float | torch.Tensor:
    """The group's learning rate for the kernels on `device`: a tensor there as itself (the kernel reads it on
    the device: no host sync, and a CUDA graph's replays follow a scheduler that fills it in place, as torch's
    schedulers do a tensor learning rate), anything else as a number."""
    lr = group["lr"]
    return lr if isinstance(lr, torch.Tensor) and lr.device == device else float(lr)


class SGD(torch.optim.SGD):
    """Stochastic gradient descent, optionally with momentum, weight decay, Nesterov momentum and
    maximize: torch.optim.SGD's algorithm, arguments, validation, param groups and state_dict (the
    momentum buffers are state[p]["momentum_buffer"], in the parameter's dtype), so state dicts load both
    ways between the two.

    Each step updates all the dense, contiguous parameters of a group that share a dtype and device in one
    Triton launch (fp32 arithmetic, fp64 for fp64 parameters, one rounding per stored value); a complex
    parameter is updated as its real view; a sharded (FSDP2 DTensor) parameter through its local shard, with
    its buffer a DTensor as torch's. Sparse gradients, a gradient or buffer of another dtype, shape or device
    than its parameter, non-contiguous or misaligned tensors, lazily conjugated or negated views, tensor subclasses
    (other than DTensor), integer or inference parameters and devices where gpunn's kernels do not run take
    torch's own SGD (which steps them or raises its error), as does a group that lists a parameter twice and
    every step taken while a torch dispatch mode is active (torch.autograd.graph.
    allow_mutation_on_saved_tensors, a tracer), which must see the writes. The kernel's writes bump the
    tensors' version counters, as torch's in-place ops do: a graph that saved a parameter before the step
    refuses its backward.
    A learning rate given as a one-element tensor on the parameters' device is read there by the kernel: no
    host sync per step, and a captured CUDA graph's replays follow a scheduler that fills it in place.
    foreach and fused are accepted and kept in the param groups (every update is one fused launch anyway;
    fused=True does not make step unscale a GradScaler's gradients, as torch's fused SGD does, so the scaler
    unscales them first); differentiable=True raises NotImplementedError (the kernels' update is not
    differentiable).
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None):
        # torch's checks first (a bad lr, fused with foreach or differentiable: its errors), then gpunn's own.
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        if differentiable:
            raise NotImplementedError("gpunn.optim.SGD does not support differentiable=True: its update kernels "
                                      "are not differentiable (use torch.optim.SGD)")
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._step_supports_amp_scaling = False  # step takes no grad_scale / found_inf, fused or not
        self._tables = {}  # per (group, device, dtype, first step): the kernel's device table (gpunn.kernels.sgd)

    def __setstate__(self, state: dict) -> None:
        # Unpickling and copy.deepcopy restore only what Optimizer.__getstate__ keeps (defaults, state,
        # param_groups): the kernel tables are rebuilt on the next step.
        super().__setstate__(state)
        self._init_runtime()

    # Run eagerly under torch.compile (a graph break there): Dynamo would trace into the kernel's launch (its
    # device tables, Triton's launcher), which it cannot; torch's SGD traces as torch ops.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns closure()'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            momentum = group["momentum"]
            if momentum == 0:
                buffers = [None] * len(params)
            hyper = dict(weight_decay=float(group["weight_decay"]), momentum=float(momentum),
                         dampening=float(group["dampening"]), nesterov=group["nesterov"], maximize=group["maximize"])
            # Host time per tensor adds up over a model's parameters (bench/NOTES.md): each is unwrapped once,
            # and the state is written only where a buffer is new.
            batches, rest = defaultdict(list), []
            # A dispatch mode (allow_mutation_on_saved_tensors's, which copies a saved tensor before an op writes
            # it; a tracer's) must see the update as torch ops: the kernel writes through pointers, past it. A
            # parameter listed twice is updated twice, one after the other, by torch: in one launch the two
            # updates would race.
            by_torch = torch._C._len_torch_dispatch_stack() > 0 or len({id(p) for p in params}) < len(params)
            for p, g, buf in zip(params, grads, buffers):
                local = (_local(p), _local(g), _local(buf)) if not by_torch and _unflagged(p, g, buf) else None
                if local is None or not _kernel_takes(*local):
                    rest.append((p, g, buf))
                else:
                    batches[(local[0].device, local[0].dtype, buf is None)].append((p, *local))
            for (device, dtype, first_step), members in batches.items():
                ps, local_ps, local_gs, local_bs = (list(column) for column in zip(*members))
                new_buffers = momentum != 0 and first_step
                if new_buffers:
                    bs = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in ps]
                    local_bs = [_local(b) for b in bs]
                sgd_kernels.step(local_ps, local_gs, local_bs if momentum != 0 else None,
                                 lr=_learning_rate(group, device), first_step=first_step, cache=self._tables,
                                 slot=(index, device, dtype, first_step), **hyper)
                if new_buffers:
                    for p, buf in zip(ps, bs):
                        self.state[p]["momentum_buffer"] = buf
                # A DTensor (and its buffer, one too) counts its versions apart from its shard. (A complex view
                # shares its base's: bumped twice, harmlessly.)
                wrapped = [p for p, local_p in zip(ps, local_ps) if p is not local_p]
                if wrapped:
                    torch.autograd.graph.increment_version(
                        wrapped + ([self.state[p]["momentum_buffer"] for p in wrapped] if momentum else []))
            if rest:
                ps, gs, bs = (list(column) for column in zip(*rest))
                # The group's values as they are, as torch's step passes them (an int lr steps integer tensors).
                torch_sgd(ps, gs, bs, has_sparse_grad=any(g.is_sparse for g in gs), foreach=False,
                          **{name: group[name] for name in ("lr", "weight_decay", "momentum", "dampening",
                                                            "nesterov", "maximize")})
                if momentum != 0:
                    for p, buf in zip(ps, bs):
                        self.state[p]["momentum_buffer"] = buf
        return loss


__all__ = ["SGD"]
