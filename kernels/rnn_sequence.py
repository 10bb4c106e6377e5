"""The Elman recurrence over a whole sequence, one direction of one layer: h_t = act(p_t + h_{t-1} W_hh^T),
where p = x W_ih^T + b_ih + b_hh comes from one dense GEMM over all time steps (gpunn/ops/rnn_sequence.py). Its
forward and its backward through time each loop over time in one launch (but see `split_tiles`); the
weight gradients are dense GEMMs after the loop.

Layout: sequences are time-major and packed. Step t holds batch_sizes[t] rows starting at row
offsets[t] of p, of the output and of its gradient; batch_sizes never increases with t (a
PackedSequence sorted by length; an unpacked batch is the case where every step holds all B rows). Row b
of the batch is active at step t while b < batch_sizes[t]; an inactive row keeps its state, and its
rows of p and of the output gradient are never read (they do not exist in packed storage).

Two ways to run it, by hidden size:
- resident (`resident_limit`: W_hh fits on chip): one program per tile of BLOCK_B batch rows, holding W_hh
  for the whole launch as the A operand of z^T = W_hh h^T (the batch tile is the MMA's narrow N side) and
  the state in registers: each step reads only p_t and writes h_t. Rows are independent, so programs never
  wait for each other.
- split (larger): the columns of h_t are split across the whole GPU (kernels/rnn_split.py, `split_tiles`),
  each program reading its slice of W_hh and the previous step's rows from L2 every step: one cooperative
  launch with a grid barrier between steps where the grid fits one program an SM, else (and under the
  interpreter) one launch a step.

Numerics: fp32 accumulation and state (fp64 for fp64), one rounding per stored h_t; the backward reads
the stored outputs, so it needs no pre-activations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activations, rnn_split
from .runtime import INTERPRET, cdiv, dot_constants, dot_precision, launch, next_power_of_2

BLOCK_B = 16  # batch rows a program: the smallest MMA side

# W_hh bytes a program may hold on chip across the loop (see resident_limit).
RESIDENT_BYTES = 128 * 1024


def _exact_fp32(dtype: torch.dtype) -> bool:
    """float32 under IEEE precision: tl.dot on FMA units, whose tiles need more registers."""
    return dtype == torch.float32 and dot_precision(dtype) == "ieee"


def resident_limit(dtype: torch.dtype, backward: bool = False) -> int:
    """The largest hidden size whose W_hh the forward (or backward) kernel holds on chip, for weights of
    `dtype` (0: none). From the sm_90 compile report: 128 KiB of W_hh in shared memory, except
    where the backward spilled (fp64 at 128 by 72 B; IEEE fp32, whose FMA dot spilled 200-2600 B at 64
    and 128)."""
    if backward and _exact_fp32(dtype):
        return 0
    size = 16
    while (2 * size) ** 2 * torch.finfo(dtype).bits // 8 <= RESIDENT_BYTES:
        size *= 2
    return min(size, 64) if backward and dtype == torch.float64 else size


def _resident_tiles(hidden: int) -> dict:
    """Launch constexprs of the resident kernels: W_hh as one padded BLOCK_H x BLOCK_H tile."""
    padded = max(16, next_power_of_2(hidden))
    return dict(BLOCK_H=padded, num_warps=8 if padded >= 128 else 4)


# The split kernels' tiles (BLOCK_B batch rows, BLOCK_N columns, warps) and two pipeline stages: the ones
# without spills in the sm_90 compile report under Triton 3.6 and 3.9 in bf16, TF32 and fp64 at aligned and
# odd sizes, with a grid barrier (wider tiles, 4 warps at 64 x 64, and three stages spilled 8-800 B); fp64
# and IEEE fp32 with 16 batch rows (32 x 32 and 64 x 64 spilled 8-16 B). Launched once a step, fp64 spills
# 40 B at odd sizes under Triton 3.6 (hidden sizes past 32 x SMs only; none under 3.9).
SPLIT_TILES = ((16, 16, 4), (16, 32, 4), (32, 32, 4), (64, 64, 8))
SPLIT_STAGES = 2
INTERPRETER_SMS = 4  # the SM count split_tiles assumes under the interpreter: small tests still get a grid
H100_SMS = 132  # and for meta tensors (the compile report sizes an H100's grid)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS if INTERPRET else H100_SMS


def _split_tiles_for(dtype: torch.dtype) -> list[tuple[int, int, int]]:
    """SPLIT_TILES that dtype compiles without spills: 16 batch rows for fp64 and IEEE fp32."""
    slow = dtype == torch.float64 or _exact_fp32(dtype)
    return [tile for tile in SPLIT_TILES if not (slow and tile[0] > 16)]


def _split_block_k(dtype: torch.dtype) -> int:
    """The reduction tile: 64 for 16-bit types (faster than 32 at every tile of the H200 sweep in
    bench/results/2026-11-27-h200-run4, 10.3 against 14.8 us a step at the chosen one), 16 for IEEE fp32's
    FMA dot, 32 otherwise (TF32 and fp64: not timed at 64)."""
    if _exact_fp32(dtype):
        return 16
    return 64 if torch.finfo(dtype).bits == 16 else 32


def split_tiles(hidden: int, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[tuple[int, int], dict]:
    """(grid, tile constexprs and launch options) of the column-split kernels.

    Of SPLIT_TILES whose column tiles fit one program an SM, the one whose busiest program reads the fewest
    elements a step (its batch tiles' previous rows, BLOCK_B x H each, and W_hh slice, BLOCK_N x H, read
    again per batch tile), then the fewest programs; batch tiles share the SMs the columns leave, so the
    grid fits a cooperative launch. Where even the widest column tile needs more programs than SMs (H above
    64 x SMs, 8448 on an H100; 32 x SMs for fp64 and IEEE fp32), that tile with a program per batch tile,
    launched once a step."""
    sms = _sm_count(device)
    tiles = _split_tiles_for(dtype)
    choices = []
    for block_b, block_n, warps in tiles:
        column_programs = cdiv(hidden, block_n)
        if column_programs <= sms:
            batch_tiles = cdiv(batch, block_b)
            batch_programs = max(1, min(batch_tiles, sms // column_programs))
            reads = cdiv(batch_tiles, batch_programs) * (block_b + block_n)
            choices.append((reads, batch_programs * column_programs, block_b, block_n, warps, batch_programs))
    if choices:
        _, _, block_b, block_n, warps, batch_programs = min(choices)
    else:
        block_b, block_n, warps = max(tiles, key=lambda tile: tile[1])
        batch_programs = cdiv(batch, block_b)
    grid = (batch_programs, cdiv(hidden, block_n))
    return grid, dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=_split_block_k(dtype), num_warps=warps,
                      num_stages=SPLIT_STAGES)


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
    state_ptr,  # (2, B, H) contiguous: slot 0 holds h0, slot 1 receives the final states
    batch_sizes_ptr, offsets_ptr,  # (T,) int64 each
    B, H, T,
    ACT: tl.constexpr, REVERSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < B
    rb64 = rb.to(tl.int64)
    # Transposed tiles: [H, BB]. W_hh is the MMA's A operand, loaded once; the state never leaves
    # registers until the end.
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
        # Padded columns (rh >= H) keep their zeros: act(0 * inf) there would be NaN, fed back through W_hh's
        # zero columns (0 * NaN) into every unit once a state overflows.
        h = tl.where(ok, h_new, h)
    final = state_ptr + tl.cast(B, tl.int64) * H  # tl.cast: B == 1 arrives as a constant
    tl.store(final + rb64[None, :] * H + rh64[:, None], h.to(state_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def rnn_sequence_backward_kernel(
    dout_ptr, stride_dout,  # (rows, H) at column stride 1: the output's gradient
    out_ptr, stride_out,  # (rows, H): the forward's h_t (act'(z) comes from it)
    w_ptr, stride_wn, stride_wk,  # W_hh (H, H)
    dz_ptr, stride_dz,  # (rows, H): receives dz_t for every active row and step
    dh_ptr,  # (B, H) contiguous: holds dh_n on entry (zeros if h_n got no gradient) and dh0 on exit
    batch_sizes_ptr, offsets_ptr,
    B, H, T,
    ACT: tl.constexpr, REVERSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Backward through time runs the steps in the opposite order to the forward: dz_t = (dout_t + dh) *
    # act'(h_t), then dh = dz_t W_hh for the step before; inactive rows carry dh unchanged.
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = rb < B
    rb64 = rb.to(tl.int64)
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
        # (dh's padded columns, 0 * dz = NaN where a dz is infinite, are left out: fed back they would reach
        # every unit through W_hh's zero columns, as in the forward.)
        g = tl.where(h_ok[:, None], dh, 0.0) + tl.load(dout_ptr + rows[None, :] * stride_dout + rh64[:, None],
                                                       mask=ok, other=0.0).to(ACC_DTYPE)
        h = tl.load(out_ptr + rows[None, :] * stride_out + rh64[:, None], mask=ok, other=0.0).to(ACC_DTYPE)
        dz = activations.grad_preactivation(g, h, ACT, activations.GRAD_FROM_OUTPUT)
        tl.store(dz_ptr + rows[None, :] * stride_dz + rh64[:, None], dz.to(dz_ptr.dtype.element_ty), mask=ok)
        dh_new = tl.dot(w_t, dz.to(DOT_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dh = tl.where(active[None, :], dh_new, dh)
    tl.store(dh_ptr + rb64[None, :] * H + rh64[:, None], dh.to(dh_ptr.dtype.element_ty), mask=tile_ok)


def _cooperative(grid: tuple[int, int], device: torch.device) -> bool:
    """Whether a split grid runs all its steps in one cooperative launch: compiled, and at most one program an
    SM. Not whether a CUDA graph is being captured: a kernel variant first needed during a capture cannot be
    loaded then (the driver forbids it), so a captured step must launch what its warm-up steps launched."""
    return not INTERPRET and grid[0] * grid[1] <= _sm_count(device)


def _split(kernel, name: str, tensors: tuple, batch: int, hidden: int, steps: int, units: int,
           dtype: torch.dtype, **constexprs) -> None:
    """Run `units` steps of a column-split kernel: in one cooperative launch with a grid barrier between
    steps where `_cooperative` allows, else in one launch a step (so under the interpreter, which runs
    programs one after another, and where a barrier would never open)."""
    device = tensors[0].device
    grid, tiles = split_tiles(hidden, batch, dtype, device)
    cooperative = _cooperative(grid, device)
    # A launch's barrier counter (int32) reaches units x programs: past 2^31, more launches.
    chunk = min(units, (2**31 - 1) // (grid[0] * grid[1])) if cooperative else 1
    options = dict(launch_cooperative_grid=True) if cooperative else {}
    for first in range(0, units, chunk):
        counter = torch.zeros(1, dtype=torch.int32, device=device) if cooperative else tensors[-1]
        with launch(name, device):
            kernel[grid](*tensors, counter, batch, hidden, steps, first, min(first + chunk, units),
                         GRID_SYNC=cooperative, **tiles, **dot_constants(dtype), **constexprs, **options)


def forward(p: torch.Tensor, w_hh: torch.Tensor, out: torch.Tensor, state: torch.Tensor,
            batch_sizes: torch.Tensor, offsets: torch.Tensor, activation: str, reverse: bool) -> torch.Tensor:
    """Run the recurrence of one direction over every step; returns the final states (B, H).

    p, out: (rows, H) views at column stride 1 (a direction's columns of a wider tensor are fine); out
    receives h_t, in w_hh's dtype; p, x W_ih^T + b_ih + b_hh, is in w_hh's or the state's dtype (fp32 for
    fp16 / bf16, so that z_t is rounded once). state: (2, B, H) contiguous with h0 in slot 0; slot 1
    receives the final states. batch_sizes and offsets: (T,) int64 on the device (see the module docstring).
    """
    steps, (_, batch, hidden) = batch_sizes.shape[0], state.shape
    if steps == 0 or batch == 0 or hidden == 0:
        return state[0]
    act = activations.CODES[activation]
    if hidden > resident_limit(w_hh.dtype):
        _split(rnn_split.rnn_split_forward_kernel, "rnn_split_forward_kernel",
               (p, p.stride(0), w_hh, *w_hh.stride(), out, out.stride(0), state, batch_sizes, offsets),
               batch, hidden, steps, steps, w_hh.dtype, ACT=act, REVERSE=reverse)
    else:
        with launch("rnn_sequence_forward_kernel", p.device):
            rnn_sequence_forward_kernel[(cdiv(batch, BLOCK_B),)](
                p, p.stride(0), w_hh, *w_hh.stride(), out, out.stride(0), state, batch_sizes, offsets,
                batch, hidden, steps, ACT=act, REVERSE=reverse, BLOCK_B=BLOCK_B,
                **dot_constants(w_hh.dtype), **_resident_tiles(hidden),
            )
    return state[1]


def backward(dout: torch.Tensor, out: torch.Tensor, w_hh: torch.Tensor, dz: torch.Tensor, dh: torch.Tensor,
             batch_sizes: torch.Tensor, offsets: torch.Tensor, activation: str, reverse: bool) -> None:
    """Backward through time of one direction. dout, out, dz: (rows, H) at column stride 1 (dout: the
    output's gradient; dz receives dz_t); dh (B, H) contiguous holds dh_n on entry and dh0 on exit."""
    steps, (batch, hidden) = batch_sizes.shape[0], dh.shape
    if steps == 0 or batch == 0 or hidden == 0:
        return
    act = activations.CODES[activation]
    if hidden > resident_limit(out.dtype, backward=True):
        _split(rnn_split.rnn_split_backward_kernel, "rnn_split_backward_kernel",
               (dout, dout.stride(0), out, out.stride(0), w_hh, *w_hh.stride(), dz, dz.stride(0), dh,
                batch_sizes, offsets), batch, hidden, steps, steps + 1, out.dtype, ACT=act, REVERSE=reverse)
        return
    with launch("rnn_sequence_backward_kernel", out.device):
        rnn_sequence_backward_kernel[(cdiv(batch, BLOCK_B),)](
            dout, dout.stride(0), out, out.stride(0), w_hh, *w_hh.stride(), dz, dz.stride(0), dh,
            batch_sizes, offsets, batch, hidden, steps, ACT=act, REVERSE=reverse,
            BLOCK_B=BLOCK_B, **dot_constants(out.dtype), **_resident_tiles(hidden),
        )
