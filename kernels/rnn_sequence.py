"""The Elman recurrence over a whole sequence, one direction of one layer: h_t = act(p_t + h_{t-1} W_hh^T),
where p = x W_ih^T + b_ih + b_hh comes from one dense GEMM over all time steps (ops/rnn.py). Its forward
and its backward through time are each one launch that loops over time; the weight gradients are dense
GEMMs after the loop.

Layout: sequences are time-major and packed. Step t holds batch_sizes[t] rows starting at row
offsets[t] of p, of the output and of its gradient; batch_sizes never increases with t (a
PackedSequence sorted by length; an unpacked batch is the case where every step holds all B rows). Row b
of the batch is active at step t while b < batch_sizes[t]; an inactive row keeps its state, and its
rows of p and of the output gradient are never read (they do not exist in packed storage).

Parallelism: one program per tile of BLOCK_B batch rows; rows are independent, so programs never wait for
each other. Two ways to hold W_hh (chosen by `plan`):
- resident: hidden sizes up to RESIDENT_LIMIT (per element size) hold W_hh on chip for the whole launch,
  as the A operand of z^T = W_hh h^T (the batch tile is the MMA's narrow N side), and the state in
  registers: each step reads only p_t and writes h_t.
- streamed: larger hidden sizes read W_hh from L2 every step in (BLOCK_H x BLOCK_K) tiles; the state goes
  through a small global buffer with a CTA barrier between steps.
With GPUNN_RNN_GRID_SYNC=1, hidden sizes past the resident limit instead split the columns of h_t across
the whole GPU (kernels/rnn_split.py, `split_tiles`), which the few programs of the streamed kernel cannot
use: one cooperative launch on CUDA, one launch a step under the interpreter.

Numerics: fp32 accumulation and state (fp64 for fp64), one rounding per stored h_t; the backward reads
the stored outputs, so it needs no pre-activations.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import activations, rnn_split
from .runtime import INTERPRET, accumulator_dtype, dot_dtype, dot_precision, launch

BLOCK_B = 16  # batch rows a program: the smallest MMA side

# W_hh bytes a program may hold on chip across the loop (see resident_limit).
RESIDENT_BYTES = 128 * 1024
STREAM_TILE = {2: (64, 64), 4: (64, 32), 8: (32, 32)}  # (BLOCK_H, BLOCK_K) by element size
INTERPRETER_STREAM_TILE = (32, 32)  # the interpreter pays per loop iteration: fewer, larger tiles


def _exact_fp32(dtype: torch.dtype) -> bool:
    """float32 under IEEE precision: tl.dot on FMA units, whose tiles need more registers."""
    return dtype == torch.float32 and dot_precision(dtype) == "ieee"


def resident_limit(dtype: torch.dtype, backward: bool = False) -> int:
    """The largest hidden size whose W_hh the forward (or backward) kernel holds on chip, for weights of
    `dtype` (0: always streamed). From the sm_90 compile report: 128 KiB of W_hh in shared memory, except
    where the backward spilled (fp64 at 128 by 72 B; IEEE fp32, whose FMA dot spilled 200-2600 B at 64
    and 128)."""
    if backward and _exact_fp32(dtype):
        return 0
    size = 16
    while (2 * size) ** 2 * torch.finfo(dtype).bits // 8 <= RESIDENT_BYTES:
        size *= 2
    return min(size, 64) if backward and dtype == torch.float64 else size


def plan(hidden: int, dtype: torch.dtype, backward: bool = False) -> dict:
    """Launch constexprs for a hidden size: resident or streamed, the tiles and the warps."""
    padded = max(16, triton.next_power_of_2(hidden))
    if hidden <= resident_limit(dtype, backward):
        return dict(RESIDENT=True, BLOCK_H=padded, BLOCK_K=padded, num_warps=8 if padded >= 128 else 4)
    element = torch.finfo(dtype).bits // 8
    if INTERPRET:
        block_h, block_k = INTERPRETER_STREAM_TILE
    else:  # FMA tiles for IEEE fp32: 64 x 32 spilled at odd sizes
        block_h, block_k = (32, 32) if _exact_fp32(dtype) else STREAM_TILE[element]
    return dict(RESIDENT=False, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=4)


# The split kernels' tiles (BLOCK_B batch rows, BLOCK_N columns, warps), two pipeline stages and a reduction
# tile of 32 (16 for IEEE fp32's FMA dot): the ones without spills in the sm_90 compile report under Triton
# 3.6 and 3.9 in bf16, TF32 and fp64 at aligned and odd sizes (wider tiles, 4 warps at 64 x 64, and three
# stages spilled 8-800 B); fp64 and IEEE fp32 with 16 batch rows (32 x 32 and 64 x 64 spilled 8-16 B).
SPLIT_TILES = ((16, 16, 4), (16, 32, 4), (32, 32, 4), (64, 64, 8))
SPLIT_BLOCK_K = 32
SPLIT_STAGES = 2
INTERPRETER_SMS = 4  # the SM count split_tiles assumes under the interpreter: small tests still get a grid
H100_SMS = 132  # and for meta tensors (the compile report sizes an H100's grid)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS if INTERPRET else H100_SMS


def grid_sync() -> bool:
    """Whether hidden sizes past the resident limit run the column-split kernels (GPUNN_RNN_GRID_SYNC=1).
    Off by default until their grid barrier has run on a GPU; the streamed kernels run instead."""
    return os.environ.get("GPUNN_RNN_GRID_SYNC", "0") == "1"


def _split_tiles_for(dtype: torch.dtype) -> list[tuple[int, int, int]]:
    """SPLIT_TILES that dtype compiles without spills: 16 batch rows for fp64 and IEEE fp32."""
    slow = dtype == torch.float64 or _exact_fp32(dtype)
    return [tile for tile in SPLIT_TILES if not (slow and tile[0] > 16)]


def split_tiles(hidden: int, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[tuple[int, int], dict]:
    """(grid, tile constexprs and launch options) of the column-split kernels: at most one program an SM (so
    that a cooperative launch fits; see split_fits). Of SPLIT_TILES, the one whose busiest program reads the
    fewest elements a step: its batch tiles' previous rows (BLOCK_B x H each) and W_hh slice (BLOCK_N x H,
    read again per batch tile); then the fewest programs."""
    sms = _sm_count(device)
    choices = []
    for block_b, block_n, warps in _split_tiles_for(dtype):
        column_programs = triton.cdiv(hidden, block_n)
        if column_programs > sms and not INTERPRET:  # the interpreter launches once a step: any grid runs
            continue
        batch_tiles = triton.cdiv(batch, block_b)
        batch_programs = max(1, min(batch_tiles, sms // column_programs))
        reads = triton.cdiv(batch_tiles, batch_programs) * (block_b + block_n)
        choices.append((reads, batch_programs * column_programs, block_b, block_n, warps, batch_programs))
    _, programs, block_b, block_n, warps, batch_programs = min(choices)
    block_k = SPLIT_BLOCK_K // 2 if _exact_fp32(dtype) and not INTERPRET else SPLIT_BLOCK_K
    return (batch_programs, programs // batch_programs), dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k,
                                                              num_warps=warps, num_stages=SPLIT_STAGES)


def split_fits(hidden: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the split kernels take this hidden size: compiled, its widest column tile's programs must
    fit one an SM (H <= 32 x SMs, 4224 on an H100, for fp64 and IEEE fp32; 64 x SMs otherwise); the
    interpreter takes any."""
    widest = max(block_n for _, block_n, _ in _split_tiles_for(dtype))
    return INTERPRET or triton.cdiv(hidden, widest) <= _sm_count(device)


@triton.jit
def _step(s, T, batch_sizes_ptr, offsets_ptr, rb, b_ok, REVERSE: tl.constexpr):
    """Step s of the loop (in the direction's time order): (t, first row of step t, rows active at t)."""
    t = T - 1 - s if REVERSE else s
    active = b_ok & (rb < tl.load(batch_sizes_ptr + t))
    return t, tl.load(offsets_ptr + t), active


@triton.jit
def rnn_sequence_forward_kernel(
    p_ptr, stride_p,  # (rows, H) at column stride 1: x W_ih^T + b_ih + b_hh for this direction
    w_ptr, stride_wn, stride_wk,  # W_hh (H, H)
    out_ptr, stride_out,  # (rows, H) at column stride 1: h_t of every active row and step
    state_ptr,  # (2, B, H) contiguous: slot 0 holds h0; the final states end in slot T % 2
    batch_sizes_ptr, offsets_ptr,  # (T,) int64 each
    B, H, T,
    ACT: tl.constexpr, REVERSE: tl.constexpr, RESIDENT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < B
    rb64 = rb.to(tl.int64)
    plane = tl.cast(B, tl.int64) * H  # tl.cast: B == 1 arrives as a constant
    if RESIDENT:
        # Transposed tiles: [H, BB]. W_hh is the MMA's A operand, loaded once; the state never leaves
        # registers (slot T % 2 receives it at the end).
        rh = tl.arange(0, BLOCK_H)
        h_ok = rh < H
        rh64 = rh.to(tl.int64)
        w = tl.load(w_ptr + rh64[:, None] * stride_wn + rh64[None, :] * stride_wk,
                    mask=h_ok[:, None] & h_ok[None, :], other=0.0).to(DOT_DTYPE)  # [H (n), H (k)]
        tile_ok = h_ok[:, None] & b_ok[None, :]
        h = tl.load(state_ptr + rb64[None, :] * H + rh64[:, None], mask=tile_ok, other=0.0).to(ACC_DTYPE)
        for s in range(0, T):
            t, offset, active = _step(s, T, batch_sizes_ptr, offsets_ptr, rb, b_ok, REVERSE)
            rows = offset + rb64
            ok = h_ok[:, None] & active[None, :]
            z = tl.load(p_ptr + rows[None, :] * stride_p + rh64[:, None], mask=ok, other=0.0).to(ACC_DTYPE)
            z = tl.dot(w, h.to(DOT_DTYPE), z, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            h_new = activations.forward(z, ACT, 0.0)
            tl.store(out_ptr + rows[None, :] * stride_out + rh64[:, None], h_new.to(out_ptr.dtype.element_ty), mask=ok)
            h = tl.where(active[None, :], h_new, h)
        final = state_ptr + (T % 2) * plane
        tl.store(final + rb64[None, :] * H + rh64[:, None], h.to(state_ptr.dtype.element_ty), mask=tile_ok)
    else:
        # [BB, BH] tiles: step s reads slot s % 2 and writes slot (s + 1) % 2 (inactive rows copy their
        # state across), then waits for the whole tile before the next step reads it.
        rn_in = tl.arange(0, BLOCK_H)
        rk_in = tl.arange(0, BLOCK_K)
        for s in range(0, T):
            t, offset, active = _step(s, T, batch_sizes_ptr, offsets_ptr, rb, b_ok, REVERSE)
            rows = offset + rb64
            read = state_ptr + (s % 2) * plane + rb64[:, None] * H
            write = state_ptr + ((s + 1) % 2) * plane + rb64[:, None] * H
            for n0 in range(0, H, BLOCK_H):
                rn = (n0 + rn_in).to(tl.int64)
                n_ok = rn < H
                ok = active[:, None] & n_ok[None, :]
                z = tl.load(p_ptr + rows[:, None] * stride_p + rn[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
                for k0 in range(0, H, BLOCK_K):
                    rk = (k0 + rk_in).to(tl.int64)
                    k_ok = rk < H
                    h = tl.load(read + rk[None, :], mask=active[:, None] & k_ok[None, :], other=0.0,
                                cache_modifier=".cg")  # [BB, BK]; .cg: written by this CTA a step ago
                    w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                                mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BH] = W_hh^T tile
                    z = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), z, input_precision=DOT_PRECISION,
                               out_dtype=ACC_DTYPE)
                h_new = activations.forward(z, ACT, 0.0)
                tl.store(out_ptr + rows[:, None] * stride_out + rn[None, :], h_new.to(out_ptr.dtype.element_ty),
                         mask=ok)
                h_old = tl.load(read + rn[None, :], mask=b_ok[:, None] & n_ok[None, :], other=0.0,
                                cache_modifier=".cg")
                tl.store(write + rn[None, :], tl.where(active[:, None], h_new.to(state_ptr.dtype.element_ty), h_old),
                         mask=b_ok[:, None] & n_ok[None, :])
            tl.debug_barrier()


@triton.jit
def rnn_sequence_backward_kernel(
    dout_ptr, stride_dout,  # (rows, H) at column stride 1: the output's gradient
    out_ptr, stride_out,  # (rows, H): the forward's h_t (act'(z) comes from it)
    w_ptr, stride_wn, stride_wk,  # W_hh (H, H)
    dz_ptr, stride_dz,  # (rows, H): receives dz_t for every active row and step
    dh_ptr,  # (B, H) contiguous: holds dh_n on entry (zeros if h_n got no gradient) and dh0 on exit
    batch_sizes_ptr, offsets_ptr,
    B, H, T,
    ACT: tl.constexpr, REVERSE: tl.constexpr, RESIDENT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Backward through time runs the steps in the opposite order to the forward: dz_t = (dout_t + dh) *
    # act'(h_t), then dh = dz_t W_hh for the step before; inactive rows carry dh unchanged.
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < B
    rb64 = rb.to(tl.int64)
    if RESIDENT:
        rh = tl.arange(0, BLOCK_H)
        h_ok = rh < H
        rh64 = rh.to(tl.int64)
        # W_hh^T as the A operand: dh^T [k, BB] = W_hh^T [k, n] dz^T [n, BB].
        w_t = tl.load(w_ptr + rh64[None, :] * stride_wn + rh64[:, None] * stride_wk,
                      mask=h_ok[:, None] & h_ok[None, :], other=0.0).to(DOT_DTYPE)
        tile_ok = h_ok[:, None] & b_ok[None, :]
        dh = tl.load(dh_ptr + rb64[None, :] * H + rh64[:, None], mask=tile_ok, other=0.0).to(ACC_DTYPE)
        for s in range(0, T):
            t, offset, active = _step(T - 1 - s, T, batch_sizes_ptr, offsets_ptr, rb, b_ok, REVERSE)
            rows = offset + rb64
            ok = h_ok[:, None] & active[None, :]
            g = dh + tl.load(dout_ptr + rows[None, :] * stride_dout + rh64[:, None], mask=ok, other=0.0).to(ACC_DTYPE)
            h = tl.load(out_ptr + rows[None, :] * stride_out + rh64[:, None], mask=ok, other=0.0).to(ACC_DTYPE)
            dz = activations.grad_preactivation(g, h, ACT, activations.GRAD_FROM_OUTPUT, 0.0)
            tl.store(dz_ptr + rows[None, :] * stride_dz + rh64[:, None], dz.to(dz_ptr.dtype.element_ty), mask=ok)
            dh_new = tl.dot(w_t, dz.to(DOT_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            dh = tl.where(active[None, :], dh_new, dh)
        tl.store(dh_ptr + rb64[None, :] * H + rh64[:, None], dh.to(dh_ptr.dtype.element_ty), mask=tile_ok)
    else:
        # Two phases a step, each ending in a CTA barrier: dz_t tile by tile (reading dh), then dh tile
        # by tile from the whole dz_t row (read back from dz).
        rn_in = tl.arange(0, BLOCK_H)
        rk_in = tl.arange(0, BLOCK_K)
        dh_rows = dh_ptr + rb64[:, None] * H
        for s in range(0, T):
            t, offset, active = _step(T - 1 - s, T, batch_sizes_ptr, offsets_ptr, rb, b_ok, REVERSE)
            rows = offset + rb64
            for n0 in range(0, H, BLOCK_H):
                rn = (n0 + rn_in).to(tl.int64)
                ok = active[:, None] & (rn < H)[None, :]
                g = tl.load(dh_rows + rn[None, :], mask=ok, other=0.0, cache_modifier=".cg").to(ACC_DTYPE)
                g += tl.load(dout_ptr + rows[:, None] * stride_dout + rn[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
                h = tl.load(out_ptr + rows[:, None] * stride_out + rn[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
                dz = activations.grad_preactivation(g, h, ACT, activations.GRAD_FROM_OUTPUT, 0.0)
                tl.store(dz_ptr + rows[:, None] * stride_dz + rn[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)
            tl.debug_barrier()
            for k0 in range(0, H, BLOCK_H):
                rk = (k0 + rn_in).to(tl.int64)
                k_ok = rk < H
                acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DTYPE)
                for n0 in range(0, H, BLOCK_K):
                    rn = (n0 + rk_in).to(tl.int64)
                    n_ok = rn < H
                    dz = tl.load(dz_ptr + rows[:, None] * stride_dz + rn[None, :], mask=active[:, None] & n_ok[None, :],
                                 other=0.0, cache_modifier=".cg")  # [BB, BK]
                    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                                mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BK (n), BH (k)]
                    acc = tl.dot(dz.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                                 out_dtype=ACC_DTYPE)
                tl.store(dh_rows + rk[None, :], acc.to(dh_ptr.dtype.element_ty), mask=active[:, None] & k_ok[None, :])
            tl.debug_barrier()


def _numerics(dtype: torch.dtype) -> dict:
    return dict(DOT_DTYPE=dot_dtype(dtype), ACC_DTYPE=accumulator_dtype(dtype), DOT_PRECISION=dot_precision(dtype))


def _split(kernel, name: str, tensors: tuple, batch: int, hidden: int, steps: int, units: int,
           dtype: torch.dtype, **constexprs) -> None:
    """Run `units` steps of a column-split kernel: compiled, in one cooperative launch with a grid barrier
    between steps; under the interpreter, which runs programs one after another, in one launch a step."""
    device = tensors[0].device
    grid, tiles = split_tiles(hidden, batch, dtype, device)
    cooperative = not INTERPRET
    # A launch's barrier counter (int32) reaches units x programs: past 2^31, more launches.
    chunk = min(units, (2**31 - 1) // (grid[0] * grid[1])) if cooperative else 1
    options = dict(launch_cooperative_grid=True) if cooperative else {}
    for first in range(0, units, chunk):
        counter = torch.zeros(1, dtype=torch.int32, device=device) if cooperative else tensors[-1]
        with launch(name, device):
            kernel[grid](*tensors, counter, batch, hidden, steps, first, min(first + chunk, units),
                         GRID_SYNC=cooperative, **tiles, **_numerics(dtype), **constexprs, **options)


def _takes_split_path(hidden: int, dtype: torch.dtype, device: torch.device, backward: bool) -> bool:
    return hidden > resident_limit(dtype, backward) and grid_sync() and split_fits(hidden, dtype, device)


def forward(p: torch.Tensor, w_hh: torch.Tensor, out: torch.Tensor, state: torch.Tensor,
            batch_sizes: torch.Tensor, offsets: torch.Tensor, activation: str, reverse: bool) -> torch.Tensor:
    """Run the recurrence of one direction over every step; returns the final states (B, H).

    p, out: (rows, H) views at column stride 1 (a direction's columns of a wider tensor are fine); out
    receives h_t. state: (2, B, H) contiguous with h0 in slot 0 (slot 1 is scratch). batch_sizes and
    offsets: (T,) int64 on the device (see the module docstring).
    """
    steps, (_, batch, hidden) = batch_sizes.shape[0], state.shape
    if steps == 0 or batch == 0 or hidden == 0:
        return state[0]
    act = activations.CODES[activation]
    if _takes_split_path(hidden, p.dtype, p.device, backward=False):
        _split(rnn_split.rnn_split_forward_kernel, "rnn_split_forward_kernel",
               (p, p.stride(0), w_hh, *w_hh.stride(), out, out.stride(0), state, batch_sizes, offsets),
               batch, hidden, steps, steps, p.dtype, ACT=act, REVERSE=reverse)
        return state[1]
    with launch("rnn_sequence_forward_kernel", p.device):
        rnn_sequence_forward_kernel[(triton.cdiv(batch, BLOCK_B),)](
            p, p.stride(0), w_hh, *w_hh.stride(), out, out.stride(0), state, batch_sizes, offsets,
            batch, hidden, steps, ACT=act, REVERSE=reverse, BLOCK_B=BLOCK_B,
            **_numerics(p.dtype), **plan(hidden, p.dtype),
        )
    return state[steps % 2]


def backward(dout: torch.Tensor, out: torch.Tensor, w_hh: torch.Tensor, dz: torch.Tensor, dh: torch.Tensor,
             batch_sizes: torch.Tensor, offsets: torch.Tensor, activation: str, reverse: bool) -> None:
    """Backward through time of one direction. dout, out, dz: (rows, H) at column stride 1 (dout: the
    output's gradient; dz receives dz_t); dh (B, H) contiguous holds dh_n on entry and dh0 on exit."""
    steps, (batch, hidden) = batch_sizes.shape[0], dh.shape
    if steps == 0 or batch == 0 or hidden == 0:
        return
    act = activations.CODES[activation]
    if _takes_split_path(hidden, out.dtype, out.device, backward=True):
        _split(rnn_split.rnn_split_backward_kernel, "rnn_split_backward_kernel",
               (dout, dout.stride(0), out, out.stride(0), w_hh, *w_hh.stride(), dz, dz.stride(0), dh,
                batch_sizes, offsets), batch, hidden, steps, steps + 1, out.dtype, ACT=act, REVERSE=reverse)
        return
    with launch("rnn_sequence_backward_kernel", out.device):
        rnn_sequence_backward_kernel[(triton.cdiv(batch, BLOCK_B),)](
            dout, dout.stride(0), out, out.stride(0), w_hh, *w_hh.stride(), dz, dz.stride(0), dh,
            batch_sizes, offsets, batch, hidden, steps, ACT=act, REVERSE=reverse,
            BLOCK_B=BLOCK_B, **_numerics(out.dtype), **plan(hidden, out.dtype, backward=True),
        )
