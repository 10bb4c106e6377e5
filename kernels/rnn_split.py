"""The recurrence of kernels/rnn_sequence.py for hidden sizes too large to hold W_hh in one program: the
columns of h_t are split across a grid of programs, which exchange each step's result through global
memory (the layer's output forward, dz backward).

Grid (GB, GN): program (i, j) computes columns j*BLOCK_N.. of every batch tile i, i + GB, ... of a step;
each step reads the previous step's whole rows (BLOCK_B x H) and a BLOCK_N x H slice of W_hh from L2. The
programs of one step are independent; consecutive steps are not, so a launch covers steps
[first, last) and either
- runs them all with a grid-wide barrier between steps (GRID_SYNC: a cooperative launch of at most one
  program an SM, which the driver refuses rather than start a grid whose programs cannot all be resident
  at once, so the barrier cannot deadlock), or
- runs one step (the host launches once a step: grids larger than the GPU, and the interpreter, which runs
  programs one after another).

Forward, step s: h_t = act(p_t + h_prev W_hh^T) for the active rows, h_prev being the same row of the
previous step's output where it was active then, else h0. Each row's latest h_t also goes to the final
state. Backward runs T + 1 units: unit u first finishes dh = dz W_hh for the rows of backward step u - 1
(its dz, written by every program in unit u - 1, is complete after the barrier), then forms dz of step u
from it. dh stays in the (B, H) buffer between units, each tile owned by one program.

Numerics are the resident kernel's: the dot takes h (dz) rounded to the input dtype, accumulation and the
carried state are fp32 (fp64 for fp64).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import activations

# The steps a launch covers are plain arguments: launched once a step, specialising on them (1 as a constant,
# multiples of 16) would compile a kernel per step pattern, possibly while a CUDA graph is captured.
STEP_RANGE = ("first", "last")


@triton.jit
def _grid_barrier(counter_ptr, arrivals):
    """Wait until `arrivals` programs have arrived at the int32 counter (zeroed before the launch; each
    program adds one per barrier, so the n-th barrier of a P-program grid waits for n * P; the launcher
    keeps a launch's total under 2^31).

    What makes the other programs' rows visible after it is the acquire: on sm_90 the poll compiles to a
    strong GPU-scope load followed by an invalidation of this SM's L1 (CCTL.IVALL), then a CTA barrier.
    The .cg hints on the loads that follow are not enough alone: Triton drops them on cp.async copies
    narrower than 16 bytes (small tiles, odd sizes), which then go through L1."""
    tl.debug_barrier()  # every thread of this program has issued its stores before one thread announces them
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < arrivals:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _after_step(counter_ptr, s, first, last, GRID_SYNC: tl.constexpr):
    """The grid barrier between step s and the next one of the same launch (none after its last)."""
    if GRID_SYNC:
        if s + 1 < last:
            _grid_barrier(counter_ptr, tl.num_programs(0) * tl.num_programs(1) * (s + 1 - first))


@triton.jit
def _step_rows(s, T, batch_sizes_ptr, offsets_ptr, REVERSE: tl.constexpr):
    """(first row, rows) of step s in the direction's order; (0, 0) outside [0, T)."""
    inside = (s >= 0) & (s < T)
    if REVERSE:
        t = T - 1 - s
    else:
        t = s
    t = tl.where(inside, t, 0)
    return tl.load(offsets_ptr + t) * inside, tl.load(batch_sizes_ptr + t) * inside


@triton.jit(do_not_specialize=STEP_RANGE)
def rnn_split_forward_kernel(
    p_ptr, stride_p,  # (rows, H) at column stride 1
    w_ptr, stride_wn, stride_wk,  # W_hh (H, H)
    out_ptr, stride_out,  # (rows, H) at column stride 1: h_t, read back as the next step's h_prev
    state_ptr,  # (2, B, H) contiguous: slot 0 holds h0 (read only), slot 1 receives each row's final state
    batch_sizes_ptr, offsets_ptr, counter_ptr,
    B, H, T, first, last,
    ACT: tl.constexpr, REVERSE: tl.constexpr, GRID_SYNC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = rn < H
    rk_in = tl.arange(0, BLOCK_K)
    final = state_ptr + tl.cast(B, tl.int64) * H
    for s in range(first, last):
        offset, size = _step_rows(s, T, batch_sizes_ptr, offsets_ptr, REVERSE)
        previous_offset, previous_size = _step_rows(s - 1, T, batch_sizes_ptr, offsets_ptr, REVERSE)
        for b0 in range(tl.program_id(0) * BLOCK_B, size, tl.num_programs(0) * BLOCK_B):
            rb = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
            active = rb < size
            from_output = rb < previous_size  # else from h0: the row starts here
            ok = active[:, None] & n_ok[None, :]
            z = tl.load(p_ptr + (offset + rb)[:, None] * stride_p + rn[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
            for k0 in range(0, H, BLOCK_K):
                rk = (k0 + rk_in).to(tl.int64)
                k_ok = rk < H
                # other programs wrote these rows during this launch: see _grid_barrier for their visibility
                h = tl.load(out_ptr + (previous_offset + rb)[:, None] * stride_out + rk[None, :],
                            mask=from_output[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg")
                h0 = tl.load(state_ptr + rb[:, None] * H + rk[None, :],
                             mask=(active & ~from_output)[:, None] & k_ok[None, :], other=0.0)
                h = tl.where(from_output[:, None], h.to(DOT_DTYPE), h0.to(DOT_DTYPE))
                w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN] of W_hh^T
                z = tl.dot(h, w.to(DOT_DTYPE), z, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            h_new = activations.forward(z, ACT, 0.0)
            tl.store(out_ptr + (offset + rb)[:, None] * stride_out + rn[None, :],
                     h_new.to(out_ptr.dtype.element_ty), mask=ok)
            tl.store(final + rb[:, None] * H + rn[None, :], h_new.to(state_ptr.dtype.element_ty), mask=ok)
        _after_step(counter_ptr, s, first, last, GRID_SYNC)


@triton.jit(do_not_specialize=STEP_RANGE)
def rnn_split_backward_kernel(
    dout_ptr, stride_dout,  # (rows, H) at column stride 1: the output's gradient
    out_ptr, stride_out,  # (rows, H): the forward's h_t
    w_ptr, stride_wn, stride_wk,  # W_hh (H, H)
    dz_ptr, stride_dz,  # (rows, H): receives dz_t, read back by every program in the next unit
    dh_ptr,  # (B, H) contiguous: dh_n on entry, dh0 on exit
    batch_sizes_ptr, offsets_ptr, counter_ptr,
    B, H, T, first, last,  # units [first, last) of 0..T
    ACT: tl.constexpr, REVERSE: tl.constexpr, GRID_SYNC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Backward step v is the direction's step T - 1 - v: unit u finishes step T - u and starts T - 1 - u.
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = rn < H
    rk_in = tl.arange(0, BLOCK_K)
    for u in range(first, last):
        done_offset, done_size = _step_rows(T - u, T, batch_sizes_ptr, offsets_ptr, REVERSE)
        offset, size = _step_rows(T - 1 - u, T, batch_sizes_ptr, offsets_ptr, REVERSE)
        for b0 in range(tl.program_id(0) * BLOCK_B, tl.maximum(size, done_size), tl.num_programs(0) * BLOCK_B):
            rb = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
            dh_tile = dh_ptr + rb[:, None] * H + rn[None, :]
            dh = tl.load(dh_tile, mask=(rb < B)[:, None] & n_ok[None, :], other=0.0,
                         cache_modifier=".cg").to(ACC_DTYPE)
            done = rb < done_size
            if b0 < done_size:  # dh = dz W_hh over the whole dz row of backward step u - 1
                acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
                for k0 in range(0, H, BLOCK_K):
                    rk = (k0 + rk_in).to(tl.int64)
                    k_ok = rk < H
                    dz = tl.load(dz_ptr + (done_offset + rb)[:, None] * stride_dz + rk[None, :],
                                 mask=done[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg")
                    w = tl.load(w_ptr + rk[:, None] * stride_wn + rn[None, :] * stride_wk,
                                mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK (n), BN (k)] of W_hh
                    acc = tl.dot(dz.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                                 out_dtype=ACC_DTYPE)
                dh = tl.where(done[:, None], acc, dh)
            active = rb < size
            ok = active[:, None] & n_ok[None, :]
            g = dh + tl.load(dout_ptr + (offset + rb)[:, None] * stride_dout + rn[None, :], mask=ok,
                             other=0.0).to(ACC_DTYPE)
            h = tl.load(out_ptr + (offset + rb)[:, None] * stride_out + rn[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
            dz_new = activations.grad_preactivation(g, h, ACT, activations.GRAD_FROM_OUTPUT)
            tl.store(dz_ptr + (offset + rb)[:, None] * stride_dz + rn[None, :], dz_new.to(dz_ptr.dtype.element_ty),
                     mask=ok)
            tl.store(dh_tile, dh.to(dh_ptr.dtype.element_ty), mask=(done[:, None] & n_ok[None, :]))
        _after_step(counter_ptr, u, first, last, GRID_SYNC)
