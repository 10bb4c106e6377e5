"""The SGD update (torch.optim.SGD's algorithm) over many parameter tensors in one launch.

Per element, in fp32 (fp64 for fp64 parameters), rounding once when storing:
    g = -grad if maximize else grad
    g = g + weight_decay * p                               (weight_decay != 0)
    buf = g on the first step, else momentum * buf + (1 - dampening) * g    (momentum != 0)
    g = g + momentum * buf if nesterov else buf            (momentum != 0)
    p = p - lr * g

Memory traffic: reads p and grad (and buf), writes p (and buf): the floor for this update. One launch per
(dtype, hyper-parameters, first step or not): a table on the device gives each program its tensor
(element offsets from one base tensor, and length) and its block within it, so a model's hundreds of
tensors cost one launch.
The hyper-parameters travel in the same table (float64 bits): changing the learning rate every step
recompiles nothing. A learning rate given as a tensor on the parameters' device is read by the kernel from
that tensor (no host sync): a captured CUDA graph's replays read its value at each replay.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import INTERPRET, accumulator_dtype, cdiv, launch, row_alignment

BLOCK = 1024 if INTERPRET else 4096  # elements a program
WARPS = 8
_HEADER: tl.constexpr = tl.constexpr(4)  # lr, weight_decay, momentum, dampening (float64 bits)
_PER_TENSOR: tl.constexpr = tl.constexpr(4)  # param, grad, momentum buffer addresses; length


@triton.jit
def _tensor(base_ptr, slot, ALIGN: tl.constexpr):
    """The tensor whose element offset from base_ptr is stored at slot. Offsets from a typed base pointer,
    rather than raw addresses cast to pointers, keep Triton's alignment analysis: with ALIGN (elements
    every offset is a multiple of) the loads and stores are vectorised."""
    return base_ptr + tl.multiple_of(tl.load(slot), ALIGN)


@triton.jit
def _update(table_ptr, lr_ptr, p_ptr, g_ptr, b_ptr, offsets, n, COMPUTE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
            MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
            LR_ON_DEVICE: tl.constexpr, TAIL: tl.constexpr):
    """The update of one block; TAIL: the block runs past the tensor's end (masked; full blocks are not, so
    their loads vectorise)."""
    ok = offsets < n if TAIL else None
    dtype = p_ptr.dtype.element_ty
    p = tl.load(p_ptr + offsets, mask=ok).to(COMPUTE)
    g = tl.load(g_ptr + offsets, mask=ok).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        g += tl.load(table_ptr + 1).to(tl.float64, bitcast=True).to(COMPUTE) * p
    if MOMENTUM:
        momentum = tl.load(table_ptr + 2).to(tl.float64, bitcast=True).to(COMPUTE)
        if FIRST_STEP:
            buf = g
        else:
            dampening = tl.load(table_ptr + 3).to(tl.float64, bitcast=True).to(COMPUTE)
            buf = tl.load(b_ptr + offsets, mask=ok).to(COMPUTE) * momentum + g * (1.0 - dampening)
        buf = buf.to(dtype)  # stored in the parameter's dtype, as torch keeps it
        tl.store(b_ptr + offsets, buf, mask=ok)
        buf = buf.to(COMPUTE)
        if NESTEROV:
            g += momentum * buf
        else:
            g = buf
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(COMPUTE)
    else:
        lr = tl.load(table_ptr).to(tl.float64, bitcast=True).to(COMPUTE)
    tl.store(p_ptr + offsets, (p - lr * g).to(dtype), mask=ok)


@triton.jit
def sgd_kernel(table_ptr, tensors, base_ptr, lr_ptr,
               COMPUTE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
               FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
               ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # table: [lr, weight_decay, momentum, dampening] as float64 bits, then 4 int64 per tensor (param, grad
    # and buffer element offsets from base_ptr, length), then per tensor its first block, then per block
    # its tensor. lr_ptr: the learning rate where LR_ON_DEVICE (the table's is then unused).
    pid = tl.program_id(0)
    t = tl.load(table_ptr + _HEADER + tensors * (_PER_TENSOR + 1) + pid)
    entry = table_ptr + _HEADER + t * _PER_TENSOR
    p_ptr = _tensor(base_ptr, entry, ALIGN)
    g_ptr = _tensor(base_ptr, entry + 1, ALIGN)
    b_ptr = _tensor(base_ptr, entry + 2, ALIGN) if MOMENTUM else p_ptr
    n = tl.load(entry + 3)
    start = (pid - tl.load(table_ptr + _HEADER + tensors * _PER_TENSOR + t)).to(tl.int64) * BLOCK
    offsets = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    if start + BLOCK <= n:
        _update(table_ptr, lr_ptr, p_ptr, g_ptr, b_ptr, offsets, n, COMPUTE, WEIGHT_DECAY, MOMENTUM, FIRST_STEP,
                NESTEROV, MAXIMIZE, LR_ON_DEVICE, False)
    else:
        _update(table_ptr, lr_ptr, p_ptr, g_ptr, b_ptr, offsets, n, COMPUTE, WEIGHT_DECAY, MOMENTUM, FIRST_STEP,
                NESTEROV, MAXIMIZE, LR_ON_DEVICE, True)


def _table(device: torch.device, offsets: tuple, blocks: list[int], hyper: tuple[float, ...], cache: dict | None,
           slot) -> torch.Tensor:
    """The step's table on the device (layout in sgd_kernel). With a cache (the optimizer's), cache[slot] keeps
    the last table of that slot: reused while the tensors stay where they are (a training loop whose
    gradients are kept, as zero_grad(set_to_none=False) and CUDA graphs keep them, copies nothing to the
    device), its header rewritten in place when a hyper-parameter changes, rebuilt when a tensor moved. (A
    replayed CUDA graph runs none of this: it reads the header as captured, so a learning rate that changes
    between replays is given as a tensor on the device; see step.)"""
    entry = cache.get(slot) if cache is not None else None
    if entry is not None and entry[0] == offsets:
        table = entry[2]
        if entry[1] != hyper:
            table[:len(hyper)].copy_(torch.tensor(hyper, dtype=torch.float64).view(torch.int64), non_blocking=True)
            cache[slot] = (offsets, hyper, table)
        return table
    block_counts = torch.tensor(blocks, dtype=torch.int64)
    header = torch.tensor(hyper, dtype=torch.float64).view(torch.int64)
    table = torch.cat([header, torch.tensor(offsets, dtype=torch.int64).flatten(),
                       torch.cumsum(block_counts, 0) - block_counts,
                       torch.repeat_interleave(torch.arange(len(blocks)), block_counts)])
    table = table.to(device, non_blocking=True)
    if cache is not None:
        cache[slot] = (offsets, hyper, table)
    return table


def step(params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor] | None, *,
         lr: float | torch.Tensor, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
         maximize: bool, first_step: bool, cache: dict | None = None, slot=None) -> None:
    """One SGD update of every tensor in params, in place, in one launch; their version counters (and the
    buffers') are bumped, as an in-place torch op bumps them.

    params, grads (and buffers, the momentum buffers, when momentum != 0): lists of contiguous tensors of one
    floating dtype on one device, params[i], grads[i] and buffers[i] of one shape. lr: a number, or a
    one-element tensor on the parameters' device (read on the device). first_step: the buffers are new
    (their contents are ignored and set to the step's gradient). cache and slot: where the caller
    keeps the step's device table between steps (see _table); None builds it for this step only.
    """
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    lengths = [p.numel() for p in params]
    blocks = [cdiv(n, BLOCK) for n in lengths]
    total = sum(blocks)
    if total == 0:
        return
    base, size = params[0], params[0].element_size()
    origin = base.data_ptr()
    # Element offsets from params[0]: every tensor of one dtype starts at a multiple of its element size.
    offsets = tuple(((p.data_ptr() - origin) // size, (g.data_ptr() - origin) // size,
                     (b.data_ptr() - origin) // size if buffers is not None else 0, n)
                    for p, g, b, n in zip(params, grads, buffers or params, lengths))
    on_device = isinstance(lr, torch.Tensor)  # the kernel reads it there; the table's header holds 0 instead
    table = _table(device, offsets, blocks, (0.0 if on_device else lr, weight_decay, momentum, dampening), cache,
                   slot)
    bits = 0  # every offset's low bits in one value: its alignment is theirs
    for p_offset, g_offset, b_offset, _ in offsets:
        bits |= p_offset | g_offset | b_offset
    align = min(row_alignment(bits), 16 // size)  # in elements, up to 16 bytes
    with launch("sgd_kernel", device):
        sgd_kernel[(total,)](
            table, len(params), base, lr if on_device else table,
            COMPUTE=accumulator_dtype(dtype),
            WEIGHT_DECAY=weight_decay != 0, MOMENTUM=momentum != 0, FIRST_STEP=first_step, NESTEROV=nesterov,
            MAXIMIZE=maximize, LR_ON_DEVICE=on_device, ALIGN=align, BLOCK=BLOCK, num_warps=WARPS,
        )
    # The kernel writes through raw pointers, which autograd does not see: without this, a graph that saved a
    # parameter before the step would run its backward on the updated values where torch raises.
    torch.autograd.graph.increment_version(params + (buffers or []))
