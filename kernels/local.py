"""The locally connected layer (unshared weights): forward, input-gradient and weight-gradient kernels and
their launchers.

Shapes (2-D; the 1-D layer is the 2-D one with a height of 1):
  x (N, C, H, W), any strides; weight (O, L, R) with L = OH * OW output positions and R = C * KH * KW taps
  (the module's (O, OH, OW, C, KH, KW) viewed flat); bias (O, L); y (N, O, OH, OW) contiguous.
  y[n, o, p] = bias[o, p] + sum_r weight[o, p, r] * x[n, c, p_h * SH - PH + di * DH, p_w * SW - PW + dj * DW]
  with r = (c, di, dj); taps that fall in the zero padding read nothing, neither x nor the weight.

Every position p has its own (O x R) weight: the layer is L small GEMMs, one per position, and the patches
are gathered inside the kernels (no unfold / im2col tensor in memory):
- forward:      program (batch tile, output-channel tile, position): (N x R) patch @ (R x O) weights.
                Reads each position's weights once per batch tile (the batch tiles of one position run
                next to each other, so repeats come from L2), gathers x (re-read from L2 by neighbouring
                positions), writes y.
- grad_input:   program (batch tile, input-channel tile, input pixel): sums dy @ W over the positions whose
                window covers the pixel (the inverse neighbourhood, at most KH x KW of them); no atomics.
- grad_weight:  program (tap tile, output-channel tile, position): dy^T @ patches over the batch; the
                programs of tap tile 0 also sum dy over the batch for the bias gradient. Per-sample
                gradients (torch.func): grid axis 1 picks a group of rows, each summed into its own dW, db.
Accumulation is fp32 (fp64 for fp64) and every output is rounded once; reductions run in one program in a
fixed order (bitwise reproducible for a given config).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import TRITON_VERSION, cdiv, dot_constants, empty, group_rows, grouped, launch, size_bucket
from .tiling import SHARED_MEMORY_BUDGET, configs, pruned, tile_count
from .tuned import tuned

# (MMA rows, MMA columns, reduction, stages, warps), named per kernel by _configs: forward (batch,
# output channels, taps), input gradient (batch, input channels, output channels), weight gradient (output
# channels, taps, batch). The target layer (batch 64, 64 channels, 3x3 taps) fits one 64 x 64 tile per
# position. The operands are gathered (strided rows, padding masks), so each pipeline stage holds them in
# registers: few stages, and 8 warps for the large fp32 tiles.
GPU_TILES = (
    (64, 64, 64, 2, 4),
    (64, 64, 32, 2, 4),
    (128, 64, 64, 2, 8),
    (64, 64, 64, 1, 8),
    (32, 64, 64, 2, 4),
    (32, 64, 32, 2, 4),
    (16, 64, 64, 2, 4),
    (16, 32, 64, 2, 4),
    (64, 32, 64, 2, 4),
    (32, 32, 32, 2, 4),
    (16, 32, 32, 1, 4),
    (64, 64, 32, 1, 8),
    (32, 64, 32, 1, 4),
    (16, 32, 16, 1, 4),  # fp64 only (Triton 3.6)
)
INTERPRETER_TILE = (32, 32, 64, 1, 4)


def _configs(rows: str, cols: str, reduction: str) -> list[triton.Config]:
    return configs(rows, cols, reduction, GPU_TILES, INTERPRETER_TILE)


def _pruner(rows: str, cols: str, reduction: str):
    """An early_config_prune hook: shared memory within budget; at most 256 bytes a thread of gathered
    operands across the pipeline stages (the sm_90 compile report: 384 and more spilled under Triton 3.9,
    160 and more under 3.6, so 128 before 3.9); no batch tile
    (whichever role it plays) larger than the batch; fp64 (DMMA) and IEEE fp32 (FMA) with a short
    reduction, at most 16 accumulator elements a thread for fp64, and one stage for IEEE fp32 (FMA gains
    nothing from the pipeline, and two stages spilled); a 16-deep reduction for fp64 only, and the only one
    fp64 takes at 4 warps before Triton 3.9 (16x32x32 spilled 8-16 B at 80 registers under 3.6). Keeps the
    smallest tile if nothing else fits."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        element = args["dy_ptr" if "dy_ptr" in args else "x_ptr"].element_size()
        exact_fp32 = element == 4 and args["DOT_PRECISION"] == "ieee"
        slow = element == 8 or exact_fp32
        staged_per_thread = 256 if TRITON_VERSION >= (3, 9) else 128
        kept = []
        for config in configs:
            r, c, k = (config.kwargs[name] for name in (rows, cols, reduction))
            threads = 32 * config.num_warps
            staged = config.num_stages * (r * k + k * c) * element
            if staged > SHARED_MEMORY_BUDGET or staged > staged_per_thread * threads:
                continue
            if config.kwargs["BLOCK_N"] > max(args["N_BUCKET"], 16):
                continue
            if slow and k > 32 or element == 8 and r * c > 16 * threads or exact_fp32 and config.num_stages > 1:
                continue
            if k < 32 and element != 8 or element == 8 and config.num_warps == 4 and k > 16 and TRITON_VERSION < (3, 9):
                continue
            kept.append(config)
        return pruned(kept, configs)

    return prune


@triton.jit
def _gather(x_ptr, x_rows, n_ok, rr, p_h, p_w, H, W, R, stride_xc, stride_xh, stride_xw,
            KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
            PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
    """The patch of output position (p_h, p_w) for batch rows x_rows (int64 offsets) and taps rr:
    ([BN, BR] values, [BR] mask of the taps inside the image). Taps in the padding are not loaded."""
    c = rr // (KH * KW)
    t = rr % (KH * KW)
    h = p_h * SH - PH + (t // KW) * DH
    w = p_w * SW - PW + (t % KW) * DW
    inside = (rr < R) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    offsets = c.to(tl.int64) * stride_xc + h.to(tl.int64) * stride_xh + w.to(tl.int64) * stride_xw  # [BR]
    x = tl.load(x_ptr + x_rows[:, None] + offsets[None, :], mask=n_ok[:, None] & inside[None, :], other=0.0)
    return x, inside


@tuned
@triton.autotune(configs=_configs("BLOCK_N", "BLOCK_O", "BLOCK_R"),
                 key=["N_BUCKET", "C", "H", "W", "O", "OW", "L", "R", "SH", "SW", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _pruner("BLOCK_N", "BLOCK_O", "BLOCK_R")})
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def local_forward_kernel(
    x_ptr, stride_xn, stride_xc, stride_xh, stride_xw,
    w_ptr, stride_wo, stride_wl, stride_wr,  # (O, L, R)
    b_ptr, stride_bo, stride_bl,  # (O, L)
    y_ptr,  # (N, O, L) contiguous
    N, C, H, W, O, OW, L, R,
    N_BUCKET,  # autotuning key only
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Program order: batch tiles fastest, then output-channel tiles, then positions, so that the programs
    # reading one position's weights run together.
    pid = tl.program_id(0)
    batch_tiles = tile_count(N, BLOCK_N)
    channel_tiles = tile_count(O, BLOCK_O)
    p = pid // (batch_tiles * channel_tiles)
    rn = (pid % batch_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ro = ((pid // batch_tiles) % channel_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    n_ok = rn < N
    o_ok = ro < O
    x_rows = rn.to(tl.int64) * stride_xn
    w_base = w_ptr + ro.to(tl.int64)[None, :] * stride_wo + p.to(tl.int64) * stride_wl  # [1, BO]

    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)  # [BR]
        x, inside = _gather(x_ptr, x_rows, n_ok, rr, p // OW, p % OW, H, W, R, stride_xc, stride_xh,
                            stride_xw, KH, KW, SH, SW, PH, PW, DH, DW)  # [BN, BR]
        w = tl.load(w_base + rr.to(tl.int64)[:, None] * stride_wr, mask=inside[:, None] & o_ok[None, :],
                    other=0.0)  # [BR, BO]
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        bias = tl.load(b_ptr + ro.to(tl.int64) * stride_bo + p.to(tl.int64) * stride_bl, mask=o_ok, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    out = (rn.to(tl.int64) * O)[:, None] * L + (ro.to(tl.int64) * L)[None, :] + p
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & o_ok[None, :])


@tuned
@triton.autotune(configs=_configs("BLOCK_N", "BLOCK_C", "BLOCK_O"),
                 key=["N_BUCKET", "C", "H", "W", "O", "OW", "L", "KH", "KW", "SH", "SW", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _pruner("BLOCK_N", "BLOCK_C", "BLOCK_O")})
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def local_grad_input_kernel(
    dy_ptr, stride_dyn, stride_dyo, stride_dyh, stride_dyw,  # (N, O, OH, OW)
    w_ptr, stride_wo, stride_wl, stride_wr,  # (O, L, R)
    dx_ptr,  # (N, C, H, W) contiguous
    N, C, H, W, O, OH, OW, L,  # L (= OH * OW): autotuning key only
    N_BUCKET,  # autotuning key only
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):
    # dx[n, c, h, w] = sum over taps (di, dj) whose output position (i, j) sees pixel (h, w):
    #   i * SH - PH + di * DH = h, j * SW - PW + dj * DW = w, then sum_o dy[n, o, i, j] W[o, (i, j), (c, di, dj)].
    pid = tl.program_id(0)
    batch_tiles = tile_count(N, BLOCK_N)
    channel_tiles = tile_count(C, BLOCK_C)
    pixel = pid // (batch_tiles * channel_tiles)
    h = pixel // W
    w = pixel % W
    rn = (pid % batch_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rc = ((pid // batch_tiles) % channel_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    ro = tl.arange(0, BLOCK_O)  # [BO]
    n_ok = rn < N
    c_ok = rc < C
    dy_rows = rn.to(tl.int64) * stride_dyn  # [BN]
    taps = rc.to(tl.int64) * (KH * KW)  # [BC]: the first tap of each input channel

    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC_DTYPE)
    for di in range(KH):
        i_scaled = h + PH - di * DH
        i = i_scaled // SH
        row_ok = (i_scaled >= 0) & (i_scaled % SH == 0) & (i < OH)
        for dj in range(KW):
            j_scaled = w + PW - dj * DW
            j = j_scaled // SW
            if row_ok & (j_scaled >= 0) & (j_scaled % SW == 0) & (j < OW):
                position = (i * OW + j).to(tl.int64)
                dy_base = dy_ptr + dy_rows[:, None] + i.to(tl.int64) * stride_dyh + j.to(tl.int64) * stride_dyw
                w_base = w_ptr + position * stride_wl + (taps + di * KW + dj)[None, :] * stride_wr  # [1, BC]
                for o0 in range(0, O, BLOCK_O):
                    oo = (o0 + ro).to(tl.int64)
                    o_ok = oo < O
                    dy = tl.load(dy_base + oo[None, :] * stride_dyo, mask=n_ok[:, None] & o_ok[None, :],
                                 other=0.0)  # [BN, BO]
                    wt = tl.load(w_base + oo[:, None] * stride_wo, mask=o_ok[:, None] & c_ok[None, :],
                                 other=0.0)  # [BO, BC]
                    acc = tl.dot(dy.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                                 out_dtype=ACC_DTYPE)

    plane = tl.cast(H, tl.int64) * W  # tl.cast: H == 1 (a 1-D layer) arrives as the constant 1
    out = (rn.to(tl.int64) * C)[:, None] * plane + (rc.to(tl.int64) * plane)[None, :] + pixel
    tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=n_ok[:, None] & c_ok[None, :])


@triton.jit
def _grad_weight_tile(x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, dy_ptr, stride_dyn, dy_position,
                      stride_dyo, ro64, o_ok, rr, p_h, p_w, N, H, W, R,
                      KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                      PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
                      WITH_WEIGHT: tl.constexpr, WITH_BIAS: tl.constexpr):
    """(dW tile [BO, BR], db [BO]) of one position: dy^T @ patches when WITH_WEIGHT, and the column sums of
    dy when WITH_BIAS (each zeros otherwise)."""
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=ACC_DTYPE)
    db = tl.zeros((BLOCK_O,), dtype=ACC_DTYPE)
    rn = tl.arange(0, BLOCK_N)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + rn
        n_ok = rows < N
        rows64 = rows.to(tl.int64)
        dy = tl.load(dy_ptr + (rows64 * stride_dyn)[:, None] + dy_position + ro64[None, :] * stride_dyo,
                     mask=n_ok[:, None] & o_ok[None, :], other=0.0)  # [BN, BO]
        if WITH_WEIGHT:
            x, inside = _gather(x_ptr, rows64 * stride_xn, n_ok, rr, p_h, p_w, H, W, R, stride_xc,
                                stride_xh, stride_xw, KH, KW, SH, SW, PH, PW, DH, DW)  # [BN, BR]
            acc = tl.dot(tl.trans(dy.to(DOT_DTYPE)), x.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)
        if WITH_BIAS:
            db += tl.sum(dy.to(ACC_DTYPE), axis=0)
    return acc, db


@tuned
@triton.autotune(configs=_configs("BLOCK_O", "BLOCK_R", "BLOCK_N"),
                 key=["N_BUCKET", "C", "H", "W", "O", "OW", "L", "R", "SH", "SW", "DOT_PRECISION", "WEIGHT_GRAD",
                      "BIAS_GRAD", "GROUPED"],
                 prune_configs_by={"early_config_prune": _pruner("BLOCK_O", "BLOCK_R", "BLOCK_N")})
@triton.jit(do_not_specialize=["N", "N_BUCKET"])
def local_grad_weight_kernel(
    x_ptr, stride_xn, stride_xc, stride_xh, stride_xw,
    dy_ptr, stride_dyn, stride_dyo, stride_dyh, stride_dyw,  # (N, O, OH, OW)
    dw_ptr,  # (O, L, R) contiguous; (groups, O, L, R) when GROUPED
    db_ptr,  # (O, L) contiguous; (groups, O, L) when GROUPED
    N, C, H, W, O, OW, L, R,  # N: the rows summed, a group's when GROUPED
    N_BUCKET,  # autotuning key only
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Program order: tap tiles fastest, then output-channel tiles, then positions (one position's
    # programs read the same dy columns and patches, from L2). Tap tile 0 also writes db.
    if GROUPED:  # per-sample gradients: grid axis 1 picks a group of N rows, and its own dW and db
        group = tl.program_id(1).to(tl.int64)
        x_ptr += group * N * stride_xn
        dy_ptr += group * N * stride_dyn
        dw_ptr += group * O * L * R
        db_ptr += group * O * L
    pid = tl.program_id(0)
    tap_tiles = tile_count(R, BLOCK_R) if WEIGHT_GRAD else 1
    channel_tiles = tile_count(O, BLOCK_O)
    p = pid // (tap_tiles * channel_tiles)
    tap_tile = pid % tap_tiles
    ro64 = (((pid // tap_tiles) % channel_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)  # [BO]
    rr = tap_tile * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    o_ok = ro64 < O
    p_h = p // OW
    p_w = p % OW
    dy_position = p_h.to(tl.int64) * stride_dyh + p_w.to(tl.int64) * stride_dyw
    if BIAS_GRAD and tap_tile == 0:
        acc, db = _grad_weight_tile(x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, dy_ptr, stride_dyn,
                                    dy_position, stride_dyo, ro64, o_ok, rr, p_h, p_w, N, H, W, R,
                                    KH, KW, SH, SW, PH, PW, DH, DW, DOT_DTYPE, ACC_DTYPE, DOT_PRECISION,
                                    BLOCK_N, BLOCK_O, BLOCK_R, WEIGHT_GRAD, True)
        tl.store(db_ptr + ro64 * L + p, db.to(db_ptr.dtype.element_ty), mask=o_ok)
    else:
        acc, db = _grad_weight_tile(x_ptr, stride_xn, stride_xc, stride_xh, stride_xw, dy_ptr, stride_dyn,
                                    dy_position, stride_dyo, ro64, o_ok, rr, p_h, p_w, N, H, W, R,
                                    KH, KW, SH, SW, PH, PW, DH, DW, DOT_DTYPE, ACC_DTYPE, DOT_PRECISION,
                                    BLOCK_N, BLOCK_O, BLOCK_R, WEIGHT_GRAD, False)
    if WEIGHT_GRAD:
        out = (ro64 * L + p)[:, None] * R + rr[None, :]
        tl.store(dw_ptr + out, acc.to(dw_ptr.dtype.element_ty), mask=o_ok[:, None] & (rr < R)[None, :])


class Geometry:
    """The constexprs of one layer's window: kernel (KH, KW), stride, padding before the first row and
    column (PH, PW), dilation, each a pair; and the padding after the last (padding_end, default the same;
    padding="same" pads one more there where dilation x (kernel - 1) is odd). The kernels read only PH and
    PW: the far side's padding sets the output size, and taps past the input read nothing either way."""

    def __init__(self, kernel_size, stride, padding, dilation, padding_end=None):
        (self.kh, self.kw), (self.sh, self.sw) = kernel_size, stride
        (self.ph, self.pw), (self.dh, self.dw) = padding, dilation
        self.ph_end, self.pw_end = padding_end if padding_end is not None else padding

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(OH, OW), the output positions over an h x w input (either < 1 where the window does not fit)."""
        return ((h + self.ph + self.ph_end - self.dh * (self.kh - 1) - 1) // self.sh + 1,
                (w + self.pw + self.pw_end - self.dw * (self.kw - 1) - 1) // self.sw + 1)

    def constexprs(self) -> dict:
        """The window as the kernels' constexprs (the far side's padding is not one: see the class)."""
        return dict(KH=self.kh, KW=self.kw, SH=self.sh, SW=self.sw, PH=self.ph, PW=self.pw, DH=self.dh, DW=self.dw)

    def as_list(self) -> list[int]:
        """[KH, KW, SH, SW, PH, PW, DH, DW, PH_END, PW_END]: the window as gpunn's custom ops take it."""
        return [self.kh, self.kw, self.sh, self.sw, self.ph, self.pw, self.dh, self.dw, self.ph_end, self.pw_end]

    @staticmethod
    def of_list(window: list[int]) -> "Geometry":
        """The Geometry as_list gave."""
        kh, kw, sh, sw, ph, pw, dh, dw, ph_end, pw_end = window
        return Geometry((kh, kw), (sh, sw), (ph, pw), (dh, dw), (ph_end, pw_end))


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: Geometry) -> torch.Tensor:
    """y (N, O, OH, OW) contiguous from x (N, C, H, W) (any strides), weight (O, L, R), bias (O, L) or None."""
    n, c, h, w = x.shape
    o, positions, taps = weight.shape
    oh, ow = geometry.output_size(h, w)
    y = empty((n, o, oh, ow), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    with launch("local_forward_kernel", x.device):
        local_forward_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]) * cdiv(o, meta["BLOCK_O"])
                                           * positions,)](
            x, *x.stride(), weight, *weight.stride(),
            bias if bias is not None else weight, *(bias.stride() if bias is not None else (0, 0)),
            y, n, c, h, w, o, ow, positions, taps, size_bucket(n),
            **geometry.constexprs(), **dot_constants(x.dtype), HAS_BIAS=bias is not None,
        )
    return y


def grad_input(dy: torch.Tensor, weight: torch.Tensor, input_shape: tuple[int, ...], geometry: Geometry
               ) -> torch.Tensor:
    """dx (N, C, H, W) contiguous from dy (N, O, OH, OW) (any strides) and weight (O, L, R)."""
    n, c, h, w = input_shape
    o, positions, _ = weight.shape
    oh, ow = dy.shape[2:]
    dx = empty((n, c, h, w), device=dy.device, dtype=dy.dtype)
    if dx.numel() == 0:
        return dx
    with launch("local_grad_input_kernel", dy.device):
        local_grad_input_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]) * cdiv(c, meta["BLOCK_C"])
                                              * h * w,)](
            dy, *dy.stride(), weight, *weight.stride(), dx,
            n, c, h, w, o, oh, ow, positions, size_bucket(n),
            **geometry.constexprs(), **dot_constants(dy.dtype),
        )
    return dx


def grad_weight(x: torch.Tensor | None, dy: torch.Tensor, input_shape: tuple[int, ...],
                weight_shape: tuple[int, int, int], geometry: Geometry, bias_grad: bool, groups: int = 0
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dW (O, L, R) when x is given, db (O, L) when bias_grad; each None where not asked for) from
    x (N, C, H, W) (any strides) and dy (N, O, OH, OW) (any strides). groups > 0: dW (groups, O, L, R) and
    db (groups, O, L), each of `groups` equal groups of consecutive rows summed apart (per-sample
    gradients), in one launch."""
    n, c, h, w = input_shape
    o, positions, taps = weight_shape
    ow = dy.shape[3]
    dw = empty(grouped(groups, (o, positions, taps)), device=dy.device, dtype=dy.dtype) if x is not None else None
    db = empty(grouped(groups, (o, positions)), device=dy.device, dtype=dy.dtype) if bias_grad else None
    weight_grad = x is not None and taps > 0  # an (O, L, 0) gradient is empty: nothing to write
    rows = group_rows(n, groups)
    if o * positions == 0 or not (weight_grad or bias_grad):
        return dw, db
    # Without dW the kernel neither gathers nor multiplies: any tensor serves as x.
    x_args = (x, *x.stride()) if x is not None else (dy, 0, 0, 0, 0)
    with launch("local_grad_weight_kernel", dy.device):
        local_grad_weight_kernel[lambda meta: (
            (cdiv(taps, meta["BLOCK_R"]) if weight_grad else 1) * cdiv(o, meta["BLOCK_O"])
            * positions, max(groups, 1))](
            *x_args, dy, *dy.stride(),
            dw if dw is not None else dy, db if db is not None else dy,
            rows, c, h, w, o, ow, positions, taps, size_bucket(rows),
            **geometry.constexprs(), **dot_constants(dy.dtype),
            WEIGHT_GRAD=weight_grad, BIAS_GRAD=bias_grad, GROUPED=groups > 0,
        )
    return dw, db
