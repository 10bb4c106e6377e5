"""Activations as Triton epilogues: the forward value, its derivative, what backward needs saved, and
the tile-level pieces every fused layer shares (the forward epilogue, dz = dy * act'(z), its column sums).

The activation math works on fp32 (or fp64) values already in registers; the caller rounds once when it
stores. Codes are compile-time constants, so each activation compiles to its own straight-line epilogue.

What backward needs, per activation (the least that gives the exact derivative):
- none:                  nothing (dz = dy).
- relu, tanh, sigmoid:   the output y (relu: y > 0; tanh: 1 - y^2; sigmoid: y (1 - y)), as torch's own
                         activations save it.
- leaky_relu, gelu, gelu_tanh, silu: the derivative act'(z), written by the forward epilogue (the same size
  as z, and backward then only multiplies instead of re-evaluating erf/exp wherever it forms dz). torch's
  save their input there, so an in-place op on their output must stay allowed: leaky_relu's output would
  do for its derivative at a non-negative slope, but is not saved (see grad_source).
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from .tiling import row_offsets

NAMES = (None, "relu", "leaky_relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "silu")
CODES = {name: code for code, name in enumerate(NAMES)}

# Kernels compare against these; Triton lets a kernel read only constexpr globals.
NONE: tl.constexpr = tl.constexpr(CODES[None])
RELU: tl.constexpr = tl.constexpr(CODES["relu"])
LEAKY_RELU: tl.constexpr = tl.constexpr(CODES["leaky_relu"])
GELU: tl.constexpr = tl.constexpr(CODES["gelu"])
GELU_TANH: tl.constexpr = tl.constexpr(CODES["gelu_tanh"])
TANH: tl.constexpr = tl.constexpr(CODES["tanh"])
SIGMOID: tl.constexpr = tl.constexpr(CODES["sigmoid"])
SILU: tl.constexpr = tl.constexpr(CODES["silu"])

# What the backward kernels read to form dz = dy * act'(z) (the GRAD_FROM constexpr).
GRAD_IS_DY: tl.constexpr = tl.constexpr(0)
GRAD_FROM_OUTPUT: tl.constexpr = tl.constexpr(1)
GRAD_FROM_SAVED: tl.constexpr = tl.constexpr(2)


def grad_source(activation: str | None) -> int:
    """Which tensor backward reads for `activation`: none, the output, or the saved derivative.

    The output only where torch's own activation saves its result too (relu, tanh, sigmoid), so that an
    in-place op on the output after the layer is refused or allowed exactly as torch's: leaky_relu, whose
    torch backward reads its input, takes the derivative written beside the output (one more (M, N) write
    forward and read backward), and an in-place op on its output (a residual add, in-place dropout) works."""
    if activation is None:
        return GRAD_IS_DY.value
    if activation in ("relu", "tanh", "sigmoid"):
        return GRAD_FROM_OUTPUT.value
    return GRAD_FROM_SAVED.value


@functools.lru_cache(maxsize=64)  # built per launch otherwise; callers only unpack the dict
def forward_constants(activation: str | None, negative_slope: float) -> dict:
    """The constexprs of a kernel that evaluates act(z) or act'(z): ACT and NEGATIVE_SLOPE, the slope only for
    leaky_relu (0 for the others, whose kernels then do not compile again for a slope they never read).
    A slope of -0.0 is taken as 0.0 (`+ 0.0`): the two are one key of this cache and of Triton's compiled
    kernels, so whichever came first would otherwise decide the sign of every zero output for both."""
    slope = float(negative_slope) + 0.0 if activation == "leaky_relu" else 0.0
    return dict(ACT=CODES[activation], NEGATIVE_SLOPE=slope)


@functools.lru_cache(maxsize=None)
def backward_constants(activation: str | None) -> dict[str, int]:
    """The constexprs of a kernel that forms dz = dy * act'(z): GRAD_FROM (grad_source) and ACT. Only an
    activation formed from its output needs its own ACT; the others pass none's code, so that one compiled
    backward serves every activation whose act'(z) is saved (gelu, silu, leaky_relu at any slope)."""
    grad_from = grad_source(activation)
    return dict(ACT=CODES[activation if grad_from == GRAD_FROM_OUTPUT.value else None], GRAD_FROM=grad_from)


def dz_tiles(args) -> int:
    """Tiles a backward kernel streams per step to form dz (an autotune pruner hook): dy alone, or dy and
    the saved tensor."""
    return 1 if args["GRAD_FROM"] == GRAD_IS_DY.value else 2


# Python floats as constexprs: Triton materialises them in the operand's dtype, so fp64 keeps every digit.
# Write them to the right of a tensor operand (`z * C`): the interpreter mishandles `C * z`.
_SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi)
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)  # sqrt(2/pi)
_GELU_TANH_C: tl.constexpr = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _gelu_tanh_gate(z):
    """S = (1 + tanh(v)) / 2 = sigmoid(2 v), v = sqrt(2/pi) (z + 0.044715 z^3): gelu_tanh(z) = z S, and S
    without the cancellation of 1 + tanh(v) for negative z."""
    return _sigmoid(2.0 * (z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI)


# tanh's odd Taylor coefficients after u: -1/3, 2/15, -17/315, 62/2835.
_TANH_C3: tl.constexpr = tl.constexpr(-0.3333333333333333)
_TANH_C5: tl.constexpr = tl.constexpr(0.13333333333333333)
_TANH_C7: tl.constexpr = tl.constexpr(-0.05396825396825397)
_TANH_C9: tl.constexpr = tl.constexpr(0.021869488536155203)


@triton.jit
def _tanh(u):
    # libdevice's tanh is not available under the interpreter; one formula keeps CPU and GPU alike.
    # (1 - t) / (1 + t) with t = exp(-2|u|) never overflows, but cancels for small |u| (relative error
    # about eps / |u|), so there the Taylor series takes over: its first omitted term, 1382/155925 u^11,
    # stays below fp32's eps for |u| < 0.3 and below fp64's for |u| < 0.04.
    a = tl.abs(u)
    t = tl.exp(-2.0 * a)
    large = (1.0 - t) / (1.0 + t)
    a2 = a * a
    small = a + a * a2 * (a2 * (a2 * (a2 * _TANH_C9 + _TANH_C7) + _TANH_C5) + _TANH_C3)
    if u.dtype == tl.float64:
        r = tl.where(a < 0.04, small, large)
    else:
        r = tl.where(a < 0.3, small, large)
    return tl.where(u < 0, -r, r)


@triton.jit
def _normal_cdf(z):
    """Phi(z) = erfc(-z / sqrt 2) / 2. In fp32, (1 + erf(z / sqrt 2)) / 2 cancels for negative z (relative
    error about eps / Phi: over 1e-5 below z = -3), so fp32 takes e = erfc(|z| / sqrt 2) from the Chebyshev
    fit of Numerical Recipes' erfcc (fractional error below 1.2e-7) and Phi = e / 2 or 1 - e / 2: one
    evaluation for both signs. fp64's eps leaves the erf form accurate enough."""
    if z.dtype == tl.float64:
        return 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    a = tl.abs(z) * _SQRT1_2
    t = 1.0 / (1.0 + 0.5 * a)
    poly = t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223
                                                                                          + t * 0.17087277)))))
    half_erfc = 0.5 * t * tl.exp(-a * a - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + poly))))
    return tl.where(z < 0, half_erfc, 1.0 - half_erfc)


@triton.jit
def forward(z, ACT: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr):
    """act(z) for the activation code ACT."""
    if ACT == RELU:
        # where(z < 0) rather than max(z, 0): NaN passes through, as torch.relu does.
        return tl.where(z < 0, 0.0, z)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, z, z * NEGATIVE_SLOPE)
    elif ACT == GELU:
        return z * _normal_cdf(z)
    elif ACT == GELU_TANH:
        return z * _gelu_tanh_gate(z)
    elif ACT == TANH:
        return _tanh(z)
    elif ACT == SIGMOID:
        return _sigmoid(z)
    elif ACT == SILU:
        return z * _sigmoid(z)
    else:
        return z


@triton.jit
def derivative(z, ACT: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr):
    """act'(z): what the forward saves for the GRAD_FROM_SAVED activations, and any activation's derivative
    for double backward (relu's is 0 at z <= 0, as torch's threshold_backward)."""
    if ACT == RELU:
        return tl.where(z > 0, tl.full(z.shape, 1.0, z.dtype), tl.full(z.shape, 0.0, z.dtype))
    elif ACT == TANH:
        t = _tanh(z)
        return 1.0 - t * t
    elif ACT == SIGMOID:
        s = _sigmoid(z)
        return s * (1.0 - s)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, tl.full(z.shape, 1.0, z.dtype), tl.full(z.shape, NEGATIVE_SLOPE, z.dtype))
    elif ACT == GELU:
        return _normal_cdf(z) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == GELU_TANH:
        # With s = sigmoid(2 v) = (1 + tanh v) / 2: 1 - tanh(v)^2 = 4 s (1 - s), no cancellation.
        z2 = z * z
        s = _gelu_tanh_gate(z)
        return s + 2.0 * z * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + z2 * (3.0 * _GELU_TANH_C))
    elif ACT == SILU:
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    else:
        return tl.full(z.shape, 1.0, z.dtype)


@triton.jit
def times_derivative(g, z, act_prime, ACT: tl.constexpr):
    """g * act'(z), given act_prime = derivative(z): relu's as torch's threshold_backward, a select (0 where
    z <= 0 whatever g is, g where z is NaN) rather than a product that makes an infinite g NaN."""
    if ACT == RELU:
        return tl.where(z <= 0, 0.0, g)
    else:
        return g * act_prime


@triton.jit
def second_derivative(z, ACT: tl.constexpr):
    """act''(z), for double backward: 0 for none, relu and leaky_relu (piecewise linear)."""
    if ACT == TANH:
        t = _tanh(z)
        return -2.0 * t * (1.0 - t * t)
    elif ACT == SIGMOID:
        s = _sigmoid(z)
        return s * (1.0 - s) * (1.0 - 2.0 * s)
    elif ACT == GELU:
        return (2.0 - z * z) * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)  # phi(z) (2 - z^2)
    elif ACT == GELU_TANH:
        # y = z S, S = sigmoid(2 v), v = c (z + a z^3): y'' = 2 S (1 - S) (2 v' + z (2 v'^2 (1 - 2 S) + v'')).
        z2 = z * z
        s = _gelu_tanh_gate(z)
        v1 = (1.0 + z2 * (3.0 * _GELU_TANH_C)) * _SQRT_2_OVER_PI
        v2 = z * (6.0 * _GELU_TANH_C) * _SQRT_2_OVER_PI
        return 2.0 * s * (1.0 - s) * (2.0 * v1 + z * (2.0 * v1 * v1 * (1.0 - 2.0 * s) + v2))
    elif ACT == SILU:
        s = _sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    else:
        return tl.zeros(z.shape, z.dtype)


def has_second_derivative(activation: str | None) -> bool:
    """Whether act'' is not identically zero (double backward then needs z, and its gradient flows through z)."""
    return activation in ("tanh", "sigmoid", "gelu", "gelu_tanh", "silu")


@triton.jit
def grad_preactivation(dy, g, ACT: tl.constexpr, GRAD_FROM: tl.constexpr):
    """dz = dy * act'(z), from dy and the saved tensor g (the output y, or act'(z) itself)."""
    if GRAD_FROM == GRAD_FROM_SAVED:
        return dy * g
    elif GRAD_FROM == GRAD_FROM_OUTPUT:
        if ACT == RELU:
            return tl.where(g <= 0, 0.0, dy)  # torch's threshold_backward: zero where y <= 0 (NaN passes)
        elif ACT == TANH:
            return dy * (1.0 - g * g)
        else:  # SIGMOID
            return dy * g * (1.0 - g)
    else:
        return dy


@triton.jit
def epilogue(acc, rm, rn, M, N, b_ptr, stride_b, y_ptr, g_ptr, ACT: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
             HAS_BIAS: tl.constexpr, SAVE_DERIVATIVE: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Add the bias to an accumulator tile of z (rows rm, columns rn), store act(z) into y (M, N)
    contiguous, and act'(z) into g when SAVE_DERIVATIVE; each rounded once, at its store."""
    m_ok = rm < M
    n_ok = rn < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn.to(tl.int64) * stride_b, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    out = tl.multiple_of(rm.to(tl.int64) * N, ROW_ALIGN)[:, None] + rn[None, :]  # [BM, BN]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + out, forward(acc, ACT, NEGATIVE_SLOPE).to(y_ptr.dtype.element_ty), mask=mask)
    if SAVE_DERIVATIVE:
        tl.store(g_ptr + out, derivative(acc, ACT, NEGATIVE_SLOPE).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_dz(dy_ptrs, g_ptrs, mask, ACC_DTYPE: tl.constexpr, out_dtype: tl.constexpr,
            ACT: tl.constexpr, GRAD_FROM: tl.constexpr):
    """A tile of dz = dy * act'(z) in out_dtype, formed in registers from dy and the saved tensor g."""
    dy = tl.load(dy_ptrs, mask=mask, other=0.0)
    if GRAD_FROM == GRAD_IS_DY:
        return dy.to(out_dtype)
    else:
        g = tl.load(g_ptrs, mask=mask, other=0.0)
        return grad_preactivation(dy.to(ACC_DTYPE), g.to(ACC_DTYPE), ACT, GRAD_FROM).to(out_dtype)


@triton.jit
def dz_rows(dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn, g_ptr, dz_ptr, rn, start, end, N,
            DY_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr, ACC_DTYPE: tl.constexpr,
            ACT: tl.constexpr, GRAD_FROM: tl.constexpr, WRITE_DZ: tl.constexpr, BLOCK_M: tl.constexpr):
    """dz = dy * act'(z) over rows [start, end) and columns rn, BLOCK_M rows at a time in a fixed order
    (deterministic): its column sums (ACC_DTYPE, from dz before rounding), and dz itself stored into dz_ptr
    when WRITE_DZ. dy is described as runtime.Rows; g and dz (M, N) are contiguous."""
    rm = tl.arange(0, BLOCK_M)  # [BM]
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    sums = tl.zeros(rn.shape, dtype=ACC_DTYPE)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + rm
        ok = (rows < end)[:, None] & n_ok[None, :]
        dy_rows = tl.multiple_of(
            row_offsets(rows, dy_inner, stride_dy_outer, stride_dy_inner, DY_TWO_ROW_DIMS), ROW_ALIGN)
        z_rows = tl.multiple_of(rows.to(tl.int64) * N, ROW_ALIGN)[:, None]  # [BM, 1], in g and dz
        dz = load_dz(dy_ptr + dy_rows[:, None] + rn64[None, :] * stride_dyn, g_ptr + z_rows + rn64[None, :], ok,
                     ACC_DTYPE, ACC_DTYPE, ACT, GRAD_FROM)
        if WRITE_DZ:
            tl.store(dz_ptr + z_rows + rn64[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)
        sums += tl.sum(dz, axis=0)
    return sums


@triton.jit
def bias_gradient(dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn, g_ptr, rn, start, end, N,
                  DY_TWO_ROW_DIMS: tl.constexpr, ROW_ALIGN: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  ACT: tl.constexpr, GRAD_FROM: tl.constexpr, BLOCK_M: tl.constexpr):
    """db for columns rn: the column sums of dz over rows [start, end) (dz_rows, nothing stored)."""
    return dz_rows(dy_ptr, dy_inner, stride_dy_outer, stride_dy_inner, stride_dyn, g_ptr, g_ptr, rn, start, end, N,
                   DY_TWO_ROW_DIMS, ROW_ALIGN, ACC_DTYPE, ACT, GRAD_FROM, False, BLOCK_M)
