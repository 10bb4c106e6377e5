"""The Elman RNN step h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh) as fused Triton kernels: one launch
forward, two backward.

Shapes: x (B, I), h (B, H) (any strides), W_ih (H, I), W_hh (H, H), b_ih and b_hh (H,), h' (B, H)
contiguous; act is tanh or relu, whose derivative backward forms from h' itself (nothing else is saved).

- forward:      both products accumulate into one fp32 (fp64 for fp64) tile; both biases and the
                activation in the epilogue; h' rounded once. Reads x, h, W_ih, W_hh; writes h'.
- grad_input:   dx = dz W_ih and dh = dz W_hh in one launch (the first programs tile dx, the rest dh), dz =
                dh' * act'(h') formed in registers from dh' and h'.
- grad_weight:  dW_ih = dz^T x and dW_hh = dz^T h in one launch, plus programs of column sums for the bias
                gradient (db_ih = db_hh = sum of dz over the batch), written to both biases.
Every reduction runs in one program in a fixed order: bitwise reproducible for a given config.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activations
from .runtime import TRITON_VERSION, cdiv, dot_constants, empty, launch, row_alignment, size_bucket
from .tiling import configs, pruner, smallest, tile_count, tile_grid
from .tuned import tuned


def _dz_tiles(args) -> int:
    return 2  # backward forms dz from dh' and h': two tiles a pipeline stage


def _forward_pruner():
    """The dense pruner, told that a tanh epilogue needs the registers of the dense layer's act'(z)
    epilogue (the sm_90 report: 128 x 256 and 256 x 128 tiles spilled with tanh)."""
    prune = pruner("BLOCK_B", "BLOCK_H", "BLOCK_K", "B_BUCKET", "x_ptr", lambda args: 1)

    def prune_forward(configs, named_args, **kwargs):
        return prune(configs, named_args, SAVE_DERIVATIVE=kwargs["ACT"] == activations.TANH.value, **kwargs)

    return prune_forward


def _grad_input_pruner():
    """The dense pruner; IEEE fp32 (FMA), and fp64 before Triton 3.9, kept to tiles of at most 32 rows (the
    sm_90 report: the wider ones of this two-branch kernel spilled 8 bytes, and fp64 64 x 32 x 32 16 bytes
    under Triton 3.6)."""
    prune = pruner("BLOCK_B", "BLOCK_K", "BLOCK_H", "B_BUCKET", "w_ih_ptr", _dz_tiles)

    def prune_grad_input(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs)
        element = named_args["w_ih_ptr"].element_size()
        if kwargs["DOT_PRECISION"] == "ieee" and element == 4 or element == 8 and TRITON_VERSION < (3, 9):
            kept = [c for c in kept if c.kwargs["BLOCK_B"] <= 32] or [smallest(configs)]
        return kept

    return prune_grad_input


@triton.jit
def _accumulate(acc, a_ptr, stride_am, stride_ak, rows, rows_ok, w_ptr, stride_wn, stride_wk, cols, cols_ok, K,
                DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                ROW_ALIGN: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += a[rows, :K] @ w[cols, :K]^T."""
    rk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + tl.multiple_of(rows.to(tl.int64) * stride_am, ROW_ALIGN)[:, None]  # [BM, 1]
    w_base = w_ptr + tl.multiple_of(cols.to(tl.int64) * stride_wn, ROW_ALIGN)[None, :]  # [1, BN]
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + rk).to(tl.int64)
        k_ok = kk < K
        a = tl.load(a_base + kk[None, :] * stride_ak, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + kk[:, None] * stride_wk, mask=k_ok[:, None] & cols_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@tuned
@triton.autotune(configs=configs("BLOCK_B", "BLOCK_H", "BLOCK_K"),
                 key=["B_BUCKET", "I", "H", "DOT_PRECISION", "ROW_ALIGN", "ACT"],
                 prune_configs_by={"early_config_prune": _forward_pruner()})
@triton.jit(do_not_specialize=["B", "B_BUCKET"])
def rnn_cell_forward_kernel(
    x_ptr, stride_xb, stride_xi, h_ptr, stride_hb, stride_hh,
    w_ih_ptr, stride_wih_n, stride_wih_k, w_hh_ptr, stride_whh_n, stride_whh_k,
    b_ih_ptr, stride_bih, b_hh_ptr, stride_bhh,  # (H,)
    out_ptr,  # (B, H) contiguous
    B, I, H,
    B_BUCKET,  # autotuning key only
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    batch_tiles = tile_count(B, BLOCK_B)
    rb = (pid % batch_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    rh = (pid // batch_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    b_ok = rb < B
    h_ok = rh < H
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DTYPE)
    acc = _accumulate(acc, x_ptr, stride_xb, stride_xi, rb, b_ok, w_ih_ptr, stride_wih_n, stride_wih_k, rh, h_ok, I,
                      DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, ROW_ALIGN, BLOCK_K)
    acc = _accumulate(acc, h_ptr, stride_hb, stride_hh, rb, b_ok, w_hh_ptr, stride_whh_n, stride_whh_k, rh, h_ok, H,
                      DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, ROW_ALIGN, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ih_ptr + rh.to(tl.int64) * stride_bih, mask=h_ok, other=0.0).to(ACC_DTYPE)[None, :]
    activations.epilogue(acc, rb, rh, B, H, b_hh_ptr, stride_bhh, out_ptr, out_ptr, ACT, 0.0, HAS_BIAS, False,
                         ROW_ALIGN)


@triton.jit
def _grad_input_tile(dy_ptr, g_ptr, rb, b_ok, H, w_ptr, stride_wn, stride_wk, rk, k_ok, out_ptr, K,
                     ACT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """out[rb, rk] = dz[rb, :] @ w[:, rk], dz from dh' and h' (both (B, H) contiguous)."""
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=ACC_DTYPE)
    rn = tl.arange(0, BLOCK_H)
    rows = tl.multiple_of(rb.to(tl.int64) * H, ROW_ALIGN)[:, None]  # [BB, 1]
    w_base = w_ptr + rk.to(tl.int64)[None, :] * stride_wk  # [1, BK]
    for n0 in range(0, H, BLOCK_H):
        nn = (n0 + rn).to(tl.int64)
        n_ok = nn < H
        dz = activations.load_dz(dy_ptr + rows + nn[None, :], g_ptr + rows + nn[None, :], b_ok[:, None] & n_ok[None, :],
                                 ACC_DTYPE, DOT_DTYPE, ACT, activations.GRAD_FROM_OUTPUT)  # [BB, BH]
        w = tl.load(w_base + tl.multiple_of(nn * stride_wn, ROW_ALIGN)[:, None], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BH, BK]
        acc = tl.dot(dz, w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    out = tl.multiple_of(rb.to(tl.int64) * K, ROW_ALIGN)[:, None] + rk[None, :]
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=b_ok[:, None] & k_ok[None, :])


@tuned
@triton.autotune(configs=configs("BLOCK_B", "BLOCK_K", "BLOCK_H"),
                 key=["B_BUCKET", "I", "H", "DOT_PRECISION", "ROW_ALIGN"],
                 prune_configs_by={"early_config_prune": _grad_input_pruner()})
@triton.jit(do_not_specialize=["B", "B_BUCKET"])
def rnn_cell_grad_input_kernel(
    dy_ptr, out_ptr,  # dh' and h', (B, H) contiguous
    w_ih_ptr, stride_wih_n, stride_wih_k, w_hh_ptr, stride_whh_n, stride_whh_k,
    dx_ptr, dh_ptr,  # (B, I) and (B, H) contiguous
    B, I, H,
    B_BUCKET,  # autotuning key only
    ACT: tl.constexpr, INPUT_GRAD: tl.constexpr, HIDDEN_GRAD: tl.constexpr, ROW_ALIGN: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Programs [0, dx tiles) tile dx over (B, I); the rest tile dh over (B, H).
    pid = tl.program_id(0)
    batch_tiles = tile_count(B, BLOCK_B)
    dx_tiles = batch_tiles * tile_count(I, BLOCK_K) if INPUT_GRAD else 0
    rk_in_tile = tl.arange(0, BLOCK_K)
    if pid < dx_tiles:
        rb = (pid % batch_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
        rk = (pid // batch_tiles) * BLOCK_K + rk_in_tile
        _grad_input_tile(dy_ptr, out_ptr, rb, rb < B, H, w_ih_ptr, stride_wih_n, stride_wih_k, rk, rk < I, dx_ptr, I,
                         ACT, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, ROW_ALIGN, BLOCK_B, BLOCK_K, BLOCK_H)
    elif HIDDEN_GRAD:
        local = pid - dx_tiles
        rb = (local % batch_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
        rk = (local // batch_tiles) * BLOCK_K + rk_in_tile
        _grad_input_tile(dy_ptr, out_ptr, rb, rb < B, H, w_hh_ptr, stride_whh_n, stride_whh_k, rk, rk < H, dh_ptr, H,
                         ACT, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, ROW_ALIGN, BLOCK_B, BLOCK_K, BLOCK_H)


@triton.jit
def _grad_weight_tile(dy_ptr, g_ptr, a_ptr, stride_ab, stride_ak, rn, n_ok, rk, k_ok, B, H, out_ptr, K,
                      ACT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      ACC_DTYPE: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_B: tl.constexpr):
    """out[rn, rk] = dz[:, rn]^T @ a[:, rk] over all B rows (out (H, K) contiguous)."""
    acc = tl.zeros((BLOCK_H, BLOCK_K), dtype=ACC_DTYPE)
    rb = tl.arange(0, BLOCK_B)
    rn64 = rn.to(tl.int64)
    rk64 = rk.to(tl.int64)
    for b0 in range(0, B, BLOCK_B):
        rows = (b0 + rb).to(tl.int64)
        b_ok = rows < B
        dz_rows = tl.multiple_of(rows * H, ROW_ALIGN)[:, None]
        dz = activations.load_dz(dy_ptr + dz_rows + rn64[None, :], g_ptr + dz_rows + rn64[None, :],
                                 b_ok[:, None] & n_ok[None, :], ACC_DTYPE, DOT_DTYPE, ACT,
                                 activations.GRAD_FROM_OUTPUT)  # [BB, BH]
        a = tl.load(a_ptr + tl.multiple_of(rows * stride_ab, ROW_ALIGN)[:, None] + rk64[None, :] * stride_ak,
                    mask=b_ok[:, None] & k_ok[None, :], other=0.0)  # [BB, BK]
        acc = tl.dot(tl.trans(dz), a.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(out_ptr + tl.multiple_of(rn64 * K, ROW_ALIGN)[:, None] + rk64[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & k_ok[None, :])


@tuned
@triton.autotune(configs=configs("BLOCK_H", "BLOCK_K", "BLOCK_B"),
                 key=["B_BUCKET", "I", "H", "DOT_PRECISION", "ROW_ALIGN"],
                 prune_configs_by={"early_config_prune": pruner("BLOCK_H", "BLOCK_K", "BLOCK_B", "H", "dy_ptr",
                                                                _dz_tiles)})
@triton.jit(do_not_specialize=["B", "B_BUCKET"])
def rnn_cell_grad_weight_kernel(
    dy_ptr, out_ptr,  # dh' and h', (B, H) contiguous
    x_ptr, stride_xb, stride_xi, h_ptr, stride_hb, stride_hh,
    dw_ih_ptr, dw_hh_ptr, db_ih_ptr, db_hh_ptr,  # (H, I), (H, H), (H,), (H,) contiguous
    B, I, H,
    B_BUCKET,  # autotuning key only
    ACT: tl.constexpr, WEIGHT_IH_GRAD: tl.constexpr, WEIGHT_HH_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    ROW_ALIGN: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # Programs: dW_ih tiles, then dW_hh tiles, then bias column sums (BLOCK_H columns each).
    pid = tl.program_id(0)
    hidden_tiles = tile_count(H, BLOCK_H)
    ih_tiles = hidden_tiles * tile_count(I, BLOCK_K) if WEIGHT_IH_GRAD else 0
    hh_tiles = hidden_tiles * tile_count(H, BLOCK_K) if WEIGHT_HH_GRAD else 0
    rn_in_tile = tl.arange(0, BLOCK_H)
    rk_in_tile = tl.arange(0, BLOCK_K)
    if pid < ih_tiles:
        rn = (pid % hidden_tiles) * BLOCK_H + rn_in_tile
        rk = (pid // hidden_tiles) * BLOCK_K + rk_in_tile
        _grad_weight_tile(dy_ptr, out_ptr, x_ptr, stride_xb, stride_xi, rn, rn < H, rk, rk < I, B, H, dw_ih_ptr, I,
                          ACT, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, ROW_ALIGN, BLOCK_H, BLOCK_K, BLOCK_B)
    elif pid < ih_tiles + hh_tiles:
        local = pid - ih_tiles
        rn = (local % hidden_tiles) * BLOCK_H + rn_in_tile
        rk = (local // hidden_tiles) * BLOCK_K + rk_in_tile
        _grad_weight_tile(dy_ptr, out_ptr, h_ptr, stride_hb, stride_hh, rn, rn < H, rk, rk < H, B, H, dw_hh_ptr, H,
                          ACT, DOT_DTYPE, DOT_PRECISION, ACC_DTYPE, ROW_ALIGN, BLOCK_H, BLOCK_K, BLOCK_B)
    elif BIAS_GRAD:
        rn = (pid - ih_tiles - hh_tiles) * BLOCK_H + rn_in_tile
        db = activations.bias_gradient(dy_ptr, B, 0, H, 1, out_ptr, rn, 0, B, H, False, 1, ACC_DTYPE, ACT,
                                       activations.GRAD_FROM_OUTPUT, BLOCK_B)
        tl.store(db_ih_ptr + rn, db.to(db_ih_ptr.dtype.element_ty), mask=rn < H)
        tl.store(db_hh_ptr + rn, db.to(db_hh_ptr.dtype.element_ty), mask=rn < H)


def forward(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
            b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, activation: str) -> torch.Tensor:
    """h' (B, H) contiguous from x (B, I), h (B, H) (any strides), weights and biases (both or neither)."""
    batch, inputs = x.shape
    hidden = w_ih.shape[0]
    out = empty((batch, hidden), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    with launch("rnn_cell_forward_kernel", x.device):
        rnn_cell_forward_kernel[tile_grid(batch, hidden, "BLOCK_B", "BLOCK_H")](
            x, *x.stride(), h, *h.stride(), w_ih, *w_ih.stride(), w_hh, *w_hh.stride(),
            *((b_ih, b_ih.stride(0), b_hh, b_hh.stride(0)) if b_ih is not None else (w_ih, 0, w_ih, 0)), out,
            batch, inputs, hidden, size_bucket(batch),
            ACT=activations.CODES[activation], HAS_BIAS=b_ih is not None,
            ROW_ALIGN=row_alignment(x.stride(0), h.stride(0), w_ih.stride(0), w_hh.stride(0), hidden),
            **dot_constants(x.dtype),
        )
    return out


def grad_input(dy: torch.Tensor, out: torch.Tensor, w_ih: torch.Tensor | None, w_hh: torch.Tensor | None,
               activation: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx (B, I) when w_ih is given, dh (B, H) when w_hh is given; None otherwise), from dy = dh' and
    out = h' ((B, H) contiguous)."""
    batch, hidden = out.shape
    inputs = w_ih.shape[1] if w_ih is not None else 0
    like = dict(device=dy.device, dtype=dy.dtype)
    dx = empty((batch, inputs), **like) if w_ih is not None else None
    dh = empty((batch, hidden), **like) if w_hh is not None else None
    input_grad, hidden_grad = dx is not None and dx.numel() > 0, dh is not None and dh.numel() > 0
    if not (input_grad or hidden_grad):
        return dx, dh

    def grid(meta):
        tiles = cdiv(batch, meta["BLOCK_B"])
        return (tiles * ((cdiv(inputs, meta["BLOCK_K"]) if input_grad else 0)
                         + (cdiv(hidden, meta["BLOCK_K"]) if hidden_grad else 0)),)

    # A weight not given is never read: its programs do not run.
    w_ih_args = (w_ih, *w_ih.stride()) if w_ih is not None else (w_hh, 0, 0)
    w_hh_args = (w_hh, *w_hh.stride()) if w_hh is not None else (w_ih, 0, 0)
    with launch("rnn_cell_grad_input_kernel", dy.device):
        rnn_cell_grad_input_kernel[grid](
            dy, out, *w_ih_args, *w_hh_args,
            dx if dx is not None else dy, dh if dh is not None else dy,
            batch, inputs, hidden, size_bucket(batch),
            ACT=activations.CODES[activation], INPUT_GRAD=input_grad, HIDDEN_GRAD=hidden_grad,
            ROW_ALIGN=row_alignment(hidden, inputs, w_ih_args[1], w_hh_args[1]), **dot_constants(dy.dtype),
        )
    return dx, dh


def grad_weight(dy: torch.Tensor, out: torch.Tensor, x: torch.Tensor | None, h: torch.Tensor | None,
                inputs: int, activation: str, bias_grad: bool) -> tuple[torch.Tensor | None, ...]:
    """(dW_ih (H, inputs), dW_hh (H, H), db_ih, db_hh (H,)): dW_ih when x is given, dW_hh when h is given,
    the biases when bias_grad; each None where not asked for. dy and out (B, H) contiguous; x (B, inputs)
    and h (B, H) any strides."""
    batch, hidden = out.shape
    like = dict(device=dy.device, dtype=dy.dtype)
    dw_ih = empty((hidden, inputs), **like) if x is not None else None
    dw_hh = empty((hidden, hidden), **like) if h is not None else None
    db_ih = empty((hidden,), **like) if bias_grad else None
    db_hh = empty((hidden,), **like) if bias_grad else None
    if hidden == 0 or (dw_ih is None and dw_hh is None and not bias_grad):
        return dw_ih, dw_hh, db_ih, db_hh
    ih, hh = dw_ih is not None and inputs > 0, dw_hh is not None
    # Without a batch the loops run zero times and every gradient is written as zeros.

    def grid(meta):
        tiles = cdiv(hidden, meta["BLOCK_H"])
        return (tiles * ((cdiv(inputs, meta["BLOCK_K"]) if ih else 0)
                         + (cdiv(hidden, meta["BLOCK_K"]) if hh else 0) + bias_grad),)

    x_args = (x, *x.stride()) if x is not None else (dy, 0, 0)
    h_args = (h, *h.stride()) if h is not None else (dy, 0, 0)
    with launch("rnn_cell_grad_weight_kernel", dy.device):
        rnn_cell_grad_weight_kernel[grid](
            dy, out, *x_args, *h_args,
            dw_ih if dw_ih is not None else dy, dw_hh if dw_hh is not None else dy,
            db_ih if db_ih is not None else dy, db_hh if db_hh is not None else dy,
            batch, inputs, hidden, size_bucket(batch),
            ACT=activations.CODES[activation], WEIGHT_IH_GRAD=ih, WEIGHT_HH_GRAD=hh, BIAS_GRAD=bias_grad,
            ROW_ALIGN=row_alignment(hidden, inputs, x_args[1], h_args[1]), **dot_constants(dy.dtype),
        )
    return dw_ih, dw_hh, db_ih, db_hh
