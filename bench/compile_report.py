"""Ahead-of-time compile report: every gpunn Triton kernel, compiled for a GPU on a machine without one.

    python -m bench.compile_report --arch 90 --out DIR [--subset] [--workers 2] [--no-fail]

For each kernel in CASES, each representative variant (activation, bias, saved tensor...), each operand
mode in MODES and each GPU autotuning config that the kernel's own early_config_prune keeps for that
mode at one of the representative problem sizes in SIZES, the kernel is compiled with
triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)). The cubin goes through the
cuobjdump shipped in Triton's wheel: registers, stack/local bytes and static shared memory from
--dump-resource-usage; HGMMA / HMMA / DMMA / FFMA / DFMA and STL / LDL (spill store / load) counts from
--dump-sass. On sm_90 ptxas spills to the stack frame: STACK > 0 with STL/LDL in the SASS is a spill.

The launch being compiled is not written out by hand: each case calls the kernel's public launcher on
"meta" tensors (shapes and dtypes, no memory) with the kernel's launch intercepted, so the arguments,
constexprs and strides are exactly what a real contiguous launch passes. Arguments are then specialized
as triton.runtime.jit does at launch: an int equal to 1 becomes the constexpr 1, and ints that are
multiples of 16 and all pointers (fresh allocations are 16-byte aligned) carry tt.divisibility=16.

Writes DIR/compile_report.csv, prints a table and a one-line summary. Exits 1 if a row failed to
compile, needs more shared memory than the GPU has, spills, or is a bf16/fp16/tf32 matmul without
tensor-core instructions (HGMMA on sm_90 for tiles of 64 rows or more), unless --no-fail is given.

Compiling happens in worker processes started with TRITON_INTERPRET removed from their environment
(see _worker_init): this module imports neither triton nor gpunn at its top level, so it also works
from a process, such as the test suite, that runs the kernels through Triton's interpreter.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import importlib.util
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Operand modes: (torch dtype name, allow TF32 for float32 matmuls).
MODES = {
    "bf16": ("bfloat16", False),
    "fp16": ("float16", False),
    "fp32-tf32": ("float32", True),
    "fp32-ieee": ("float32", False),
    "fp64": ("float64", False),
}
# Modes whose matmuls must run on tensor cores.
TENSOR_CORE_MODES = ("bf16", "fp16", "fp32-tf32")

# Representative problems (M rows, N outputs, K inputs). The pruners key on the bucketed batch
# (forward, grad_input) or on N (grad_weight), so together these keep every config some launch uses.
SIZES = {
    "large": (4096, 4096, 4096),  # a training batch through a square layer: the wide tiles
    "small": (16, 4096, 4096),  # a small batch: forward's and grad_input's narrow tiles
    "narrow": (4096, 64, 4096),  # a narrow layer: grad_weight's narrow tiles (it tiles N)
    # No multiples of 16: the masked reduction paths (EVEN_K / EVEN_N False); rows still 16-byte
    # aligned, which the kernels' ROW_ALIGN hint tells Triton.
    "odd": (4000, 1000, 1000),
    # Odd row lengths: no 16-byte aligned rows at all, so element-wise loads (the pruners keep small tiles).
    "unaligned": (999, 1001, 1001),
}

# Shared memory one program may use (the opt-in maximum per block), by compute capability.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                       120: 99 * 1024}
NEGATIVE_SLOPE = 0.01


# ----------------------------------------------------------------------------------------------------
# The registry: one Case per kernel. Adding a kernel means adding a Case (and its launch function).

@dataclass(frozen=True)
class Variant:
    """One representative set of launcher arguments; matmul says whether it must use tensor cores; launch
    picks one of a launcher's differing launches of the kernel (None: it makes one, or one a step; a size
    where it makes fewer has no row for this variant)."""
    name: str
    kwargs: dict
    matmul: bool = True
    launch: int | None = None


@dataclass(frozen=True)
class Case:
    """A kernel (an attribute of `module`) and how to launch it: launch(dtype, m, n, k, **variant.kwargs)
    calls the kernel's public launcher once, on meta tensors. tile names the kernel's block sizes as
    (MMA rows, MMA columns, reduction) when not every one of them is tuned (default: the config's)."""
    module: str
    kernel: str
    launch: Callable
    variants: tuple[Variant, ...] = ()
    tile: tuple[str, ...] = ()


def _meta(shape, dtype):
    import torch
    return torch.empty(shape, device="meta", dtype=dtype)


def _launch_dense_forward(dtype, m, n, k, activation, bias, save_derivative, members=0, two_strides=False,
                          state_output=False):
    # members: an ensemble's (torch.func.vmap over stacked weights), each member m / members rows.
    # two_strides: x's rows at two strides (a batch-first sequence read time-major, as gpunn.RNN's projection).
    # state_output: the bias and the output in the state's dtype (fp32 for fp16 / bf16), as gpunn.RNN's.
    from gpunn.kernels import dense, runtime
    lead = (members,) if members else ()
    x = _meta((4, m // 4, k), dtype).transpose(0, 1) if two_strides else _meta((m, k), dtype)  # m // 4 * 4 rows
    w = _meta((*lead, n, k), dtype)
    wide = runtime.state_dtype(dtype) if state_output else dtype
    b = _meta((*lead, n), wide) if bias else None
    dense.forward(runtime.Rows.of(x), w, b, activation, NEGATIVE_SLOPE, save_derivative, members=members,
                  out_dtype=wide)


def _saved(dtype, m, n, activation):
    """What forward saves for backward: nothing, the output or act'(z), all (M, N)."""
    from gpunn.kernels import activations
    return None if activations.grad_source(activation) == 0 else _meta((m, n), dtype)


def _launch_dense_grad_preactivation(dtype, m, n, k, activation, write_dz, bias_grad):
    # db over several row chunks launches the kernel a second time, on the chunks' sums.
    from gpunn.kernels import dense, runtime
    dense.grad_preactivation(runtime.Rows.of(_meta((m, n), dtype)), _saved(dtype, m, n, activation), activation,
                             write_dz, bias_grad)


def _launch_dense_grad_input(dtype, m, n, k, members=0):
    from gpunn.kernels import dense, runtime
    dense.grad_input(runtime.Rows.of(_meta((m, n), dtype)), _meta((members, n, k) if members else (n, k), dtype),
                     members)


def _launch_dense_grad_weight(dtype, m, n, k, groups=0):
    # groups: per group of rows (torch.func's per-sample gradients), each group's rows read at two strides,
    # as gpunn.RNN's per-sample fold reads time-major rows (T, groups, C) a group at a time.
    from gpunn.kernels import dense, runtime

    def rows(columns):
        if not groups:
            return runtime.Rows.of(_meta((m, columns), dtype))
        return runtime.Rows.of(_meta((m // groups, groups, columns), dtype).transpose(0, 1))

    dense.grad_weight(rows(n), rows(k), (n, k), groups)


def _launch_dense_double_backward(dtype, m, n, k, activation, bias_grad, tangent=False):
    # Every output written: g_dy, the [dz | g_z] pair and g_b (over several chunks, a second launch). tangent:
    # forward mode's form instead (no g_dy; dy' read and added into g_z, which is then dz').
    from gpunn.kernels import dense_double_backward, runtime
    dy = runtime.Rows.of(_meta((m, n), dtype))
    dense_double_backward.elementwise(dy, dy, _meta((m, n), dtype), activation, NEGATIVE_SLOPE, not tangent, True,
                                      True, bias_grad, dy if tangent else None)


def _band_layout(dtype, n, k):
    """The block layout of a band of nine (the masked benchmark's mask), its tensors moved to "meta"."""
    import dataclasses

    import torch

    from gpunn import masks
    layout = masks.block_layout(masks.local_1d(k, n, 9), dtype)
    return dataclasses.replace(layout, **{field.name: getattr(layout, field.name).to("meta")
                                          for field in dataclasses.fields(layout)
                                          if isinstance(getattr(layout, field.name), torch.Tensor)})


def _launch_masked_forward(dtype, m, n, k, activation, bias, save_derivative):
    from gpunn.kernels import masked, runtime
    x, w = _meta((m, k), dtype), _meta((n, k), dtype)
    b = _meta((n,), dtype) if bias else None
    masked.forward(runtime.Rows.of(x), w, b, activation, NEGATIVE_SLOPE, save_derivative,
                   layout=_band_layout(dtype, n, k))


def _launch_masked_grad_input(dtype, m, n, k, activation):
    from gpunn.kernels import masked, runtime
    dy, w = _meta((m, n), dtype), _meta((n, k), dtype)
    masked.grad_input(runtime.Rows.of(dy), _saved(dtype, m, n, activation), w, activation,
                      layout=_band_layout(dtype, n, k))


def _launch_masked_grad_weight(dtype, m, n, k, activation, bias_grad, groups=0):
    # One launch: dW blocks and, when bias_grad, the db programs (per group of rows: torch.func's per-sample
    # gradients).
    from gpunn.kernels import masked, runtime
    dy, x = runtime.Rows.of(_meta((m, n), dtype)), runtime.Rows.of(_meta((m, k), dtype))
    masked.grad_weight(dy, _saved(dtype, m, n, activation), x, (n, k), activation, bias_grad, groups,
                       layout=_band_layout(dtype, n, k))


def _local_problem(dtype, m, n, one_d=False):
    """The locally connected layer for a size: batch m, 64 channels and a 32x32 image, or 33 channels and a
    31x30 image where n is not a multiple of 16; 3x3 window, padding 1. one_d: a 1-D layer (H = 1, which
    Triton passes as the constant 1) over 1024 or 999 positions, window 3."""
    from gpunn.kernels import local
    channels, (h, w) = (64, (32, 32)) if n % 16 == 0 else (33, (31, 30))
    window = (3, 3)
    if one_d:
        (h, w), window = (1, 1024 if n % 16 == 0 else 999), (1, 3)
    geometry = local.Geometry(window, (1, 1), (window[0] // 2, 1), (1, 1))
    x = _meta((m, channels, h, w), dtype)
    weight = _meta((channels, h * w, channels * window[0] * window[1]), dtype)
    return local, geometry, x, weight, _meta((m, channels, h, w), dtype)


def _launch_local_forward(dtype, m, n, k, bias, one_d=False):
    local, geometry, x, weight, _ = _local_problem(dtype, m, n, one_d)
    local.forward(x, weight, _meta(weight.shape[:2], dtype) if bias else None, geometry)


def _launch_local_grad_input(dtype, m, n, k, one_d=False):
    local, geometry, x, weight, dy = _local_problem(dtype, m, n, one_d)
    local.grad_input(dy, weight, tuple(x.shape), geometry)


def _launch_local_grad_weight(dtype, m, n, k, weight_grad, bias_grad, one_d=False, groups=0):
    # groups: per group of images (torch.func's per-sample gradients).
    local, geometry, x, weight, dy = _local_problem(dtype, m, n, one_d)
    local.grad_weight(x if weight_grad else None, dy, tuple(x.shape), tuple(weight.shape), geometry, bias_grad,
                      groups)


def _launch_rnn_cell_forward(dtype, m, n, k, activation):
    # batch m, hidden n, input k
    from gpunn.kernels import rnn
    rnn.forward(_meta((m, k), dtype), _meta((m, n), dtype), _meta((n, k), dtype), _meta((n, n), dtype),
                _meta((n,), dtype), _meta((n,), dtype), activation)


def _launch_rnn_cell_grad_input(dtype, m, n, k, activation):
    from gpunn.kernels import rnn
    rnn.grad_input(_meta((m, n), dtype), _meta((m, n), dtype), _meta((n, k), dtype), _meta((n, n), dtype),
                   activation)


def _launch_rnn_cell_grad_weight(dtype, m, n, k, activation):
    from gpunn.kernels import rnn
    rnn.grad_weight(_meta((m, n), dtype), _meta((m, n), dtype), _meta((m, k), dtype), _meta((m, n), dtype),
                    k, activation, True)


class NoSuchKernel(Exception):
    """Raised by a case's launch where its kernel has no form for the mode (no row is reported)."""


def _launch_rnn_sequence(dtype, m, n, k, backward, resident=False, once_a_step=False):
    # batch m; 8 steps (the step count is a runtime loop bound, so it changes nothing compiled). resident:
    # the largest hidden size held on chip for this dtype and pass (IEEE fp32's backward has none); else
    # hidden n past the resident limit, the columns split across an H100's grid in one cooperative launch,
    # or launched once a step (as on a GPU without SMs enough for the grid).
    from unittest import mock

    import torch

    from gpunn.kernels import rnn_sequence, runtime
    limit = rnn_sequence.resident_limit(dtype, backward)
    if resident and not limit:
        raise NoSuchKernel
    hidden = limit if resident else n
    steps, rows = 8, 8 * m
    sizes, offsets = _meta((steps,), torch.int64), _meta((steps,), torch.int64)
    w_hh, out = _meta((hidden, hidden), dtype), _meta((rows, hidden), dtype)
    state = runtime.state_dtype(dtype)
    with mock.patch.object(rnn_sequence, "RESIDENT_BYTES", rnn_sequence.RESIDENT_BYTES if resident else 0), \
            mock.patch.object(rnn_sequence, "_sm_count", (lambda device: 0) if once_a_step else rnn_sequence._sm_count):
        if backward:
            rnn_sequence.backward(_meta((rows, hidden), dtype), out, w_hh, _meta((rows, hidden), dtype),
                                  _meta((m, hidden), state), sizes, offsets, "tanh", reverse=False)
        else:
            # The projection p in the state's dtype, as gpunn.RNN passes it.
            rnn_sequence.forward(_meta((rows, hidden), state), w_hh, out, _meta((2, m, hidden), state), sizes,
                                 offsets, "tanh", reverse=False)


def _launch_sgd(dtype, m, n, k, momentum, first_step, lr_on_device=False):
    # Two parameter tensors, (m, n) and (n,); a momentum buffer each when momentum; a learning rate as a
    # float32 tensor on the device, or a number.
    import torch

    from gpunn.kernels import sgd
    shapes = ((m, n), (n,))
    tensors = [[_meta(shape, dtype) for shape in shapes] for _ in range(3)]
    lr = _meta((), torch.float32) if lr_on_device else 0.1
    sgd.step(tensors[0], tensors[1], tensors[2] if momentum else None, lr=lr, weight_decay=0.01,
             momentum=0.9 if momentum else 0.0, dampening=0.0, nesterov=True, maximize=False, first_step=first_step)


def _launch_cross_entropy(dtype, m, n, k, backward, weighted, smoothing, groups=0):
    # m rows of n classes (the logits (m, n)); groups: a mean over each of that many groups of rows.
    import torch

    from gpunn.kernels import losses, runtime
    x, target = _meta((m, n), dtype), _meta((m,), torch.int64)
    weight = _meta((n,), dtype) if weighted else None
    compute = runtime.state_dtype(dtype)
    if backward:
        lead = (groups,) if groups else ()
        losses.cross_entropy_backward(x, target, weight, -100, smoothing, _meta((m, 2), compute), _meta(lead, dtype),
                                      "mean", _meta((*lead, 2), compute), groups)
    else:
        losses.cross_entropy_forward(x, target, weight, -100, smoothing)


def _launch_cross_entropy_probs(dtype, m, n, k, backward, weighted, smoothing, target_grad=False, groups=0):
    # m rows of n classes, class-probability targets (m, n); groups as in _launch_cross_entropy.
    from gpunn.kernels import losses, runtime
    x, target = _meta((m, n), dtype), _meta((m, n), dtype)
    weight = _meta((n,), dtype) if weighted else None
    compute = runtime.state_dtype(dtype)
    if backward:
        losses.cross_entropy_probs_backward(x, target, weight, smoothing, _meta((m, 2), compute), _meta((m,), compute),
                                            _meta((groups,) if groups else (), dtype), "mean", True, target_grad,
                                            groups)
    else:
        losses.cross_entropy_probs_forward(x, target, weight, smoothing)


def _launch_cross_entropy_double_backward(dtype, m, n, k, probabilities, reduction="none"):
    # Every output and both incoming gradients (probabilities), weights and smoothing: the most registers.
    import torch

    from gpunn.kernels import cross_entropy_double_backward, runtime
    x, g = _meta((m, n), dtype), _meta((m, n), dtype)
    compute = runtime.state_dtype(dtype)
    target = _meta((m, n), dtype) if probabilities else _meta((m,), torch.int64)
    grad, totals = (_meta((m,), dtype), None) if reduction == "none" else (_meta((), dtype), _meta((2,), compute))
    cross_entropy_double_backward.cross_entropy_double_backward(
        x, target, _meta((n,), dtype), -100, 0.1, _meta((m, 2), compute), _meta((m,), compute) if probabilities
        else None, grad, g, g if probabilities else None, reduction, totals, True, probabilities, True)


def _launch_reduced_loss(dtype, m, n, k, divide_by, count=None):
    # The sums of m per-row (or per-block) values into a loss of dtype, divided by count (default m).
    from gpunn.kernels import losses, runtime
    compute = runtime.state_dtype(dtype)
    losses.reduced_loss(_meta((m,), compute), _meta((m,), compute), dtype, divide_by, count=count or m)


def _launch_mse(dtype, m, n, k, backward, groups=0):
    from gpunn.kernels import losses
    x, y = _meta((m, n), dtype), _meta((m, n), dtype)
    if backward:
        losses.mse_backward(x, y, _meta((groups,) if groups else (), dtype), "mean", True, True, groups)
    else:
        losses.mse_forward(x, y, "none")


CASES = (
    Case("gpunn.kernels.dense", "dense_forward_kernel", _launch_dense_forward, (
        Variant("relu+bias", dict(activation="relu", bias=True, save_derivative=False)),
        Variant("gelu+bias+save", dict(activation="gelu", bias=True, save_derivative=True)),
        Variant("gelu+bias+save members", dict(activation="gelu", bias=True, save_derivative=True, members=4)),
        Variant("relu+bias, rows at two strides", dict(activation="relu", bias=True, save_derivative=False,
                                                       two_strides=True)),
        Variant("rnn projection", dict(activation=None, bias=True, save_derivative=False, two_strides=True,
                                       state_output=True)),
    )),
    Case("gpunn.kernels.dense", "dense_grad_preactivation_kernel", _launch_dense_grad_preactivation, (
        Variant("gelu dz+db", dict(activation="gelu", write_dz=True, bias_grad=True), matmul=False, launch=0),
        Variant("relu dz", dict(activation="relu", write_dz=True, bias_grad=False), matmul=False),  # the output
        Variant("db", dict(activation=None, write_dz=False, bias_grad=True), matmul=False, launch=0),  # of dy
        Variant("db chunks", dict(activation=None, write_dz=False, bias_grad=True), matmul=False, launch=1),
        Variant("gelu dz, 2^31 + 10^7 rows", dict(activation="gelu", write_dz=True, bias_grad=False,
                                                 rows=2 ** 31 + 10 ** 7), matmul=False),
    )),
    Case("gpunn.kernels.dense", "dense_grad_input_kernel", _launch_dense_grad_input, (
        Variant("dz", dict()), Variant("dz members", dict(members=4)))),
    Case("gpunn.kernels.dense", "dense_grad_weight_kernel", _launch_dense_grad_weight, (
        Variant("dz", dict()), Variant("dz, 2^31 + 10^7 rows", dict(rows=2 ** 31 + 10 ** 7)),
        Variant("per sample, rows at two strides", dict(groups=4)))),
    Case("gpunn.kernels.dense_double_backward", "dense_double_backward_kernel", _launch_dense_double_backward, (
        Variant("gelu", dict(activation="gelu", bias_grad=True), matmul=False, launch=0),
        Variant("gelu_tanh", dict(activation="gelu_tanh", bias_grad=False), matmul=False),
        Variant("gelu, 2^31 + 10^7 rows", dict(activation="gelu", bias_grad=False, rows=2 ** 31 + 10 ** 7),
                matmul=False),
        Variant("forward mode, gelu", dict(activation="gelu", bias_grad=True, tangent=True), matmul=False,
                launch=0),
    )),
    # Block-sparse: the weight block comes from the layout; only the batch tile (BLOCK_M) is tuned.
    Case("gpunn.kernels.masked", "masked_forward_kernel", _launch_masked_forward, (
        Variant("relu+bias", dict(activation="relu", bias=True, save_derivative=False)),
        Variant("gelu+bias+save", dict(activation="gelu", bias=True, save_derivative=True)),
    ), tile=("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    Case("gpunn.kernels.masked", "masked_grad_input_kernel", _launch_masked_grad_input, (
        Variant("none", dict(activation=None)),
        Variant("gelu", dict(activation="gelu")),
    ), tile=("BLOCK_M", "BLOCK_K", "BLOCK_N")),
    Case("gpunn.kernels.masked", "masked_grad_weight_kernel", _launch_masked_grad_weight, (
        Variant("relu+db", dict(activation="relu", bias_grad=True)),
        Variant("none", dict(activation=None, bias_grad=False)),
        Variant("relu+db per sample", dict(activation="relu", bias_grad=True, groups=4)),
    ), tile=("BLOCK_N", "BLOCK_K", "BLOCK_M")),
    # Locally connected: one small GEMM per output position, patches gathered in the kernel.
    Case("gpunn.kernels.local", "local_forward_kernel", _launch_local_forward, (
        Variant("bias", dict(bias=True)),
        Variant("1d", dict(bias=True, one_d=True)),
    )),
    Case("gpunn.kernels.local", "local_grad_input_kernel", _launch_local_grad_input, (
        Variant("plain", dict()),
        Variant("1d", dict(one_d=True)),
    )),
    Case("gpunn.kernels.local", "local_grad_weight_kernel", _launch_local_grad_weight, (
        Variant("weight+bias", dict(weight_grad=True, bias_grad=True)),
        Variant("1d", dict(weight_grad=True, bias_grad=True, one_d=True)),
        Variant("bias only", dict(weight_grad=False, bias_grad=True), matmul=False),
        Variant("weight+bias per sample", dict(weight_grad=True, bias_grad=True, groups=4)),
    )),
    # The Elman RNN step: both products in one accumulator; backward dx+dh and dW_ih+dW_hh+db launches.
    Case("gpunn.kernels.rnn", "rnn_cell_forward_kernel", _launch_rnn_cell_forward, (
        Variant("tanh", dict(activation="tanh")),
    )),
    # The sequence recurrence: W_hh on chip at the largest resident hidden size (one launch for all steps).
    Case("gpunn.kernels.rnn_sequence", "rnn_sequence_forward_kernel", _launch_rnn_sequence, (
        Variant("resident", dict(resident=True, backward=False)),
    ), tile=("BLOCK_B", "BLOCK_H")),
    Case("gpunn.kernels.rnn_sequence", "rnn_sequence_backward_kernel", _launch_rnn_sequence, (
        Variant("resident", dict(resident=True, backward=True)),
    ), tile=("BLOCK_B", "BLOCK_H")),
    # Past it, columns of h_t split across the GPU: a grid barrier a step, or a launch a step (grids past the SMs).
    Case("gpunn.kernels.rnn_split", "rnn_split_forward_kernel", _launch_rnn_sequence, (
        Variant("grid barrier", dict(backward=False)),
        Variant("launch a step", dict(backward=False, once_a_step=True)),
    ), tile=("BLOCK_B", "BLOCK_N", "BLOCK_K")),
    Case("gpunn.kernels.rnn_split", "rnn_split_backward_kernel", _launch_rnn_sequence, (
        Variant("grid barrier", dict(backward=True)),
        Variant("launch a step", dict(backward=True, once_a_step=True)),
    ), tile=("BLOCK_B", "BLOCK_N", "BLOCK_K")),
    # The optimizer: every parameter tensor of a group in one launch, addresses from a table.
    Case("gpunn.kernels.sgd", "sgd_kernel", _launch_sgd, (
        Variant("momentum", dict(momentum=True, first_step=False), matmul=False),
        Variant("momentum first step", dict(momentum=True, first_step=True), matmul=False),
        Variant("plain", dict(momentum=False, first_step=False), matmul=False),
        Variant("momentum, lr tensor", dict(momentum=True, first_step=False, lr_on_device=True), matmul=False),
    ), tile=("BLOCK",)),
    # The losses: a row of logits a program (cross-entropy), blocks of elements (MSE).
    Case("gpunn.kernels.losses", "cross_entropy_forward_kernel", _launch_cross_entropy, (
        Variant("weighted+smoothing", dict(backward=False, weighted=True, smoothing=0.1), matmul=False),
        Variant("plain", dict(backward=False, weighted=False, smoothing=0.0), matmul=False),
    ), tile=("BLOCK_C",)),
    Case("gpunn.kernels.losses", "cross_entropy_backward_kernel", _launch_cross_entropy, (
        Variant("weighted+smoothing", dict(backward=True, weighted=True, smoothing=0.1), matmul=False),
        Variant("plain", dict(backward=True, weighted=False, smoothing=0.0), matmul=False),
        Variant("weighted+smoothing per sample", dict(backward=True, weighted=True, smoothing=0.1, groups=4),
                matmul=False),
    ), tile=("BLOCK_C",)),
    Case("gpunn.kernels.losses", "cross_entropy_probs_forward_kernel", _launch_cross_entropy_probs, (
        Variant("weighted+smoothing", dict(backward=False, weighted=True, smoothing=0.1), matmul=False),
        Variant("plain", dict(backward=False, weighted=False, smoothing=0.0), matmul=False),
    ), tile=("BLOCK_C",)),
    Case("gpunn.kernels.losses", "cross_entropy_probs_backward_kernel", _launch_cross_entropy_probs, (
        Variant("weighted+smoothing, both gradients", dict(backward=True, weighted=True, smoothing=0.1,
                                                            target_grad=True), matmul=False),
        Variant("plain", dict(backward=True, weighted=False, smoothing=0.0), matmul=False),
        Variant("plain per sample", dict(backward=True, weighted=False, smoothing=0.0, groups=4), matmul=False),
    ), tile=("BLOCK_C",)),
    Case("gpunn.kernels.cross_entropy_double_backward", "cross_entropy_double_backward_kernel",
         _launch_cross_entropy_double_backward, (
             Variant("indices", dict(probabilities=False), matmul=False),
             Variant("indices, smoothed mean", dict(probabilities=False, reduction="mean"), matmul=False),
             Variant("probabilities", dict(probabilities=True), matmul=False),
         ), tile=("BLOCK_C",)),
    Case("gpunn.kernels.losses", "reduced_loss_kernel", _launch_reduced_loss, (
        Variant("mean over weights", dict(divide_by="sum_b"), matmul=False),
        Variant("smoothed mean over weights", dict(divide_by="sum_b_or_nan"), matmul=False),
        Variant("mean over count", dict(divide_by="count"), matmul=False),
        Variant("mean of one value", dict(divide_by="count", count=1), matmul=False),  # the MSE of one element
        Variant("sum", dict(divide_by="none"), matmul=False),
    ), tile=("BLOCK",)),
    Case("gpunn.kernels.losses", "mse_forward_kernel", _launch_mse, (
        Variant("none", dict(backward=False), matmul=False),
    ), tile=("BLOCK",)),
    Case("gpunn.kernels.losses", "mse_backward_kernel", _launch_mse, (
        Variant("mean", dict(backward=True), matmul=False),
        Variant("mean per sample", dict(backward=True, groups=4), matmul=False),
    ), tile=("BLOCK",)),
    Case("gpunn.kernels.rnn", "rnn_cell_grad_input_kernel", _launch_rnn_cell_grad_input, (
        Variant("tanh", dict(activation="tanh")),
    )),
    Case("gpunn.kernels.rnn", "rnn_cell_grad_weight_kernel", _launch_rnn_cell_grad_weight, (
        Variant("relu", dict(activation="relu")),
    )),
)


# ----------------------------------------------------------------------------------------------------
# Worker side: everything below that imports triton or gpunn runs in the worker processes only.

def _worker_init() -> None:
    """Run the kernels' modules in compile mode in this worker.

    Under TRITON_INTERPRET=1 every @triton.jit function, the kernels' device helpers (grouped_tile,
    row_offsets, activations.*) included, is an InterpretedFunction: wrapping the kernel alone in a
    JITFunction does not help, because the compiler then meets the interpreted helpers and refuses them
    ("Unsupported function referenced"). The launchers also choose interpreter-only constexprs and
    configs there (one large tile; bf16 widened to fp32 for tl.dot). So the worker drops the variable
    before it first imports gpunn, and gets the exact GPU build of every kernel. (Triton reads the
    variable when a function is decorated, not when triton is imported; _unwrap reports a kernel that
    was imported interpreted anyway.)
    """
    os.environ.pop("TRITON_INTERPRET", None)
    # GPUNN_AUTOTUNE=0 makes the pruners keep one config; the report covers every config autotuning can pick.
    os.environ.pop("GPUNN_AUTOTUNE", None)
    import warnings
    # Triton 3.9 warns once per process that the default of fp fusion will change; a launch uses the
    # same default, so the compile here matches it.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _kernel_source() -> tuple[str, Path]:
    """(Triton's version, the directory gpunn.kernels is imported from) in a worker."""
    import triton

    import gpunn.kernels
    return triton.__version__, Path(gpunn.kernels.__file__).resolve().parent


def _unwrap(kernel):
    """(autotuner or None, heuristics wrappers outermost first, the JITFunction) of a kernel object."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    from gpunn.kernels.tuned import Tuned
    autotuner, heuristics, fn = None, [], kernel
    while not isinstance(fn, JITFunction):
        if isinstance(fn, Tuned):
            fn = fn.autotuner
            continue
        if isinstance(fn, Autotuner):
            autotuner = fn
        elif isinstance(fn, Heuristics):
            heuristics.append(fn)
        else:
            raise TypeError(f"{type(fn).__name__} is not a compiled Triton kernel (TRITON_INTERPRET set?)")
        fn = fn.fn
    return autotuner, heuristics, fn


@contextlib.contextmanager
def _fp32_matmul(tf32: bool):
    import torch
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _capture(case: Case, variant: Variant, mode: str, size: str):
    """The kernel and the (positional args, keyword args) the launcher passes to it, without launching it;
    None for the call where the kernel has no form for this mode (the case's launch raised NoSuchKernel)."""
    import torch
    from triton.runtime.jit import JITFunction
    kernel = getattr(importlib.import_module(case.module), case.kernel)
    dtype_name, tf32 = MODES[mode]
    calls = []
    # kernel[grid](...) calls kernel.run(..., grid=, warmup=); an instance attribute shadows the method.
    kernel.run = lambda *args, grid, warmup, **kwargs: calls.append((args, kwargs))
    # Another kernel the launcher makes (the dense weight gradient's pass adding its splits' sums) has its own
    # case: not launched here.
    jit_run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    try:
        # A variant's `rows` replaces the size's M: a batch past 2^31, the wide-row (int64) kernels.
        kwargs = dict(variant.kwargs)
        m, n, k = SIZES[size]
        m = kwargs.pop("rows", m)
        equal = kwargs.get("groups") or kwargs.get("members")
        if equal:  # equal groups of rows (a sample's or member's each): the size's rows, less a remainder
            m -= m % equal
        with _fp32_matmul(tf32):
            case.launch(getattr(torch, dtype_name), m, n, k, **kwargs)
    except NoSuchKernel:
        return kernel, None
    finally:
        del kernel.run
        JITFunction.run = jit_run
    if variant.launch is not None:  # a size with fewer launches (one chunk of rows) has no row for it
        return kernel, calls[variant.launch] if variant.launch < len(calls) else None
    # Launched once a step, the launches differ only in unspecialised arguments: one compile serves them all.
    if not calls or any(kwargs != calls[0][1] for _, kwargs in calls[1:]):
        raise RuntimeError(f"{case.kernel}: the launcher made {len(calls)} launches, expected 1 or a launch a step")
    return kernel, calls[0]


@dataclass
class Spec:
    """One compile: what triton.compile needs, and how the row describes it."""
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    tile: str  # block sizes in the kernel's own order, e.g. "128x256x64"
    blocks: str  # their names, e.g. "BLOCK_MxBLOCK_NxBLOCK_K"

    def key(self) -> str:
        return repr((sorted(self.signature.items()), sorted((k, str(v)) for k, v in self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))

    def summary(self) -> str:
        """The constexprs other than the tile, e.g. "ACT=1 HAS_BIAS=True ... stride_xk=1"."""
        tile_names = self.blocks.split("x")
        return " ".join(f"{k}={v}" for k, v in self.constexprs.items() if k not in tile_names)


def _specs(case: Case, variant: Variant, mode: str, size: str) -> list[Spec]:
    """One Spec per autotuning config the kernel's pruner keeps for this launch."""
    from triton.runtime.autotuner import Config
    kernel, call = _capture(case, variant, mode, size)
    if call is None:
        return []
    args, kwargs = call
    autotuner, heuristics, fn = _unwrap(kernel)
    named = dict(zip(fn.arg_names, args))
    if autotuner is None:  # launch options passed at the call, as in kernel[grid](..., num_warps=8)
        configs = [Config({}, num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))]
    else:
        configs = autotuner.configs
        if autotuner.early_config_prune:
            configs = autotuner.early_config_prune(configs, named, **kwargs)
    specs = []
    for config in configs:
        meta = {**kwargs, **config.kwargs}
        for wrapper in heuristics:  # as Heuristics.run: each sees the args and the config
            for name, rule in wrapper.values.items():
                meta[name] = rule({**named, **meta})
        specs.append(_specialize(fn, {**named, **meta}, config, case.tile or tuple(config.kwargs)))
    return specs


def _specialize(fn, values: dict, config, blocks: tuple[str, ...]) -> Spec:
    """Signature, constexprs and divisibility attrs as triton.runtime.jit derives them at launch."""
    from triton.runtime.jit import mangle_type  # "*bf16", "i32", "fp32"... (same API in Triton 3.6-3.9)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name] if param.name in values else param.default
        specialize = not getattr(param, "do_not_specialize", False)
        align = specialize and not getattr(param, "do_not_specialize_on_alignment", False)
        if param.is_constexpr or value is None or (specialize and type(value) is int and value == 1):
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        signature[param.name] = mangle_type(value)
        is_pointer = signature[param.name].startswith("*")
        # Pointers: fresh torch allocations are 256-byte aligned. Ints: multiples of 16.
        if align and (is_pointer or (type(value) is int and value % 16 == 0)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if getattr(config, "num_ctas", 1) != 1:
        options["num_ctas"] = config.num_ctas
    if getattr(config, "maxnreg", None) is not None:
        options["maxnreg"] = config.maxnreg
    return Spec(fn, signature, constexprs, attrs, options, "x".join(str(values[b]) for b in blocks), "x".join(blocks))


@dataclass(frozen=True)
class Job:
    """A compile to run: the Spec is rebuilt in the worker from these (cheap, and keeps jobs picklable)."""
    kernel: str
    variant: str
    mode: str
    sizes: tuple[str, ...]  # the sizes whose pruned configs include it; the first one is compiled
    index: int  # position among the configs kept at sizes[0]


def _find(kernel: str, variant: str) -> tuple[Case, Variant]:
    case = next(c for c in CASES if c.kernel == kernel)
    return case, next(v for v in case.variants if v.name == variant)


def plan(subset: bool, kernels: tuple[str, ...] = ()) -> list[Job]:
    """Every distinct compile (runs in a worker). subset: per kernel, its first variant in bf16, fp32-ieee
    and fp64 (whose fp64 accumulator older Tritons reject without out_dtype), the first config kept at
    the large size. kernels: only these (default: all)."""
    jobs = []
    for case in CASES:
        if kernels and case.kernel not in kernels:
            continue
        for variant in case.variants[:1] if subset else case.variants:
            for mode in ("bf16", "fp32-ieee", "fp64") if subset else MODES:
                seen: dict[str, list] = {}  # compile key -> [sizes, index at the first size]
                for size in ("large",) if subset else SIZES:
                    for index, spec in enumerate(_specs(case, variant, mode, size)):
                        seen.setdefault(spec.key(), [[], index])[0].append(size)
                        if subset:
                            break
                jobs += [Job(case.kernel, variant.name, mode, tuple(sizes), index)
                         for sizes, index in seen.values()]
    return jobs


def cuobjdump_path() -> str | None:
    """The cuobjdump shipped in Triton's wheel (or one on PATH), without importing triton."""
    spec = importlib.util.find_spec("triton")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    import shutil
    return shutil.which("cuobjdump")


_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# A SASS instruction: /*addr*/, an optional predicate (@P0, @!UPT...), then the opcode and its modifiers.
_OPCODE = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[.\s]")
# STL/LDL: stores to / loads from local memory, i.e. register spills (these kernels have no local arrays).
COUNTED_OPCODES = ("HGMMA", "HMMA", "DMMA", "FFMA", "DFMA", "STL", "LDL")


def inspect_cubin(cubin: bytes) -> dict:
    """Registers, stack/local bytes, static shared bytes and counted SASS opcodes of one cubin."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton's wheel ships it in triton/backends/nvidia/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    match = _RESOURCES.search(usage)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump resource usage output: {usage[:200]!r}")
    registers, stack, static_shared, local = map(int, match.groups())
    opcodes = Counter(_OPCODE.findall(sass))
    return dict(registers=registers, stack_bytes=stack, local_bytes=local, spill_bytes=stack + local,
                static_shared_bytes=static_shared,
                **{name.lower(): opcodes.get(name, 0) for name in COUNTED_OPCODES})


def _short_error(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {' | '.join(lines[-3:])}"[:400]


def compile_job(job: Job, arch: int) -> dict:
    """Compile one job for sm_<arch> and inspect it (runs in a worker): one CSV row."""
    case, variant = _find(job.kernel, job.variant)
    dtype_name, _ = MODES[job.mode]
    row = dict(kernel=job.kernel, variant=job.variant, dtype=dtype_name,
               precision=job.mode.split("-")[1] if "-" in job.mode else "", mode=job.mode,
               sizes="+".join(job.sizes), tensor_cores_expected=variant.matmul and job.mode in TENSOR_CORE_MODES)
    start = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        spec = _specs(case, variant, job.mode, job.sizes[0])[job.index]
        row.update(tile=spec.tile, blocks=spec.blocks, stages=spec.options["num_stages"],
                   warps=spec.options["num_warps"], constexprs=spec.summary())
        source = triton.compiler.ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                                           attrs=spec.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec.options)
        row.update(shared_memory_bytes=compiled.metadata.shared, warps=compiled.metadata.num_warps)
    except Exception as error:  # one row's failure is reported, and the rest still compile
        row.update(status="compile_error", error=_short_error(error))
    else:
        try:
            row.update(inspect_cubin(compiled.asm["cubin"]))
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
            row.update(status="inspect_error", error=_short_error(error))
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row.setdefault("status", "ok")
    return _judge(row, arch)


def _judge(row: dict, arch: int) -> dict:
    """Set status to the row's problems (';'-separated), or "ok"."""
    if row["status"] != "ok":
        return row
    problems = []
    limit = SHARED_MEMORY_LIMIT.get(arch, SHARED_MEMORY_LIMIT[90])
    if row["shared_memory_bytes"] > limit:
        problems.append("out_of_resources")
        row["error"] = f"shared memory {row['shared_memory_bytes']} B > {limit} B"
    if row["spill_bytes"] > 0 or row["stl"] > 0:
        problems.append("spills")
    # sm_90 matmuls should use warpgroup MMA (HGMMA), which needs at least 64 tile rows (its M); the
    # narrower tiles serve small batches, bound by the weight read, where mma.sync (HMMA) is enough.
    # Other targets need some tensor-core MMA.
    wgmma_tile = bool(row["tile"]) and int(row["tile"].split("x")[0]) >= 64
    tensor_core = row["hgmma"] if arch == 90 and wgmma_tile else row["hgmma"] + row["hmma"]
    if row["tensor_cores_expected"] and tensor_core == 0:
        problems.append("no_hgmma" if arch == 90 else "no_tensor_cores")
    row["status"] = ";".join(problems) or "ok"
    return row


# ----------------------------------------------------------------------------------------------------
# Driver side.

COLUMNS = ("kernel", "variant", "dtype", "precision", "sizes", "blocks", "tile", "stages", "warps",
           "registers", "stack_bytes", "local_bytes", "spill_bytes", "shared_memory_bytes",
           "static_shared_bytes", "hgmma", "hmma", "dmma", "ffma", "dfma", "stl", "ldl", "tensor_cores_expected",
           "compile_s", "status", "error", "constexprs")
FAILED = ("compile_error", "inspect_error", "out_of_resources")


def run(out: str | os.PathLike, arch: int = 90, subset: bool = False, workers: int = 2,
        log: Callable[[str], None] = print, kernels: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """Compile, inspect, write out/compile_report.csv; returns (rows, summary counts)."""
    start = time.perf_counter()
    # spawn: a fresh interpreter per worker, so _worker_init runs before gpunn is imported there.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=context,
                                                initializer=_worker_init) as pool:
        jobs = pool.submit(plan, subset, kernels).result()
        triton_version, source = pool.submit(_kernel_source).result()
        log(f"compiling {len(jobs)} kernel configs for sm_{arch} with {workers} worker(s): Triton {triton_version}, "
            f"kernels from {source}")
        checkout = Path(__file__).resolve().parents[1]
        if source != checkout / "kernels":
            # An editable install maps gpunn.kernels to its own checkout: a run from another one (an older
            # commit's worktree, to compare against) would compile that install's kernels, not its own.
            log(f"note: the kernels compiled are not those of this report's checkout ({checkout})")
        futures = {pool.submit(compile_job, job, arch): i for i, job in enumerate(jobs)}
        rows: list[dict] = [{}] * len(jobs)
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            job = jobs[futures[future]]
            try:
                row = future.result()
            except Exception as error:  # a worker died (e.g. the compiler crashed): report the row
                row = dict(kernel=job.kernel, variant=job.variant, mode=job.mode, sizes="+".join(job.sizes),
                           status="compile_error", error=_short_error(error), compile_s=0.0)
            rows[futures[future]] = row
            log(f"[{done:3d}/{len(jobs)}] {row['kernel']} {row['variant']} {row['mode']} "
                f"{row.get('tile', '?')} s{row.get('stages', '?')} w{row.get('warps', '?')}: "
                f"{row['status']} ({row['compile_s']:.1f}s)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compile_report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = dict(
        rows=len(rows),
        compiled=sum(r["status"] != "compile_error" for r in rows),
        failures=sum(any(p in FAILED for p in r["status"].split(";")) for r in rows),
        spills=sum("spills" in r["status"] for r in rows),
        missing_tensor_cores=sum("no_hgmma" in r["status"] or "no_tensor_cores" in r["status"] for r in rows),
        seconds=round(time.perf_counter() - start, 1),
    )
    return rows, summary


TABLE = (  # header, row key, width
    ("kernel", "kernel", 24), ("variant", "variant", 14), ("mode", "mode", 9), ("sizes", "sizes", 22),
    ("tile", "tile", 11), ("st", "stages", 2), ("wp", "warps", 2), ("regs", "registers", 4),
    ("spill", "spill_bytes", 5), ("smemKB", "shared_memory_bytes", 6), ("HGMMA", "hgmma", 5),
    ("HMMA", "hmma", 4), ("DMMA", "dmma", 4), ("FFMA", "ffma", 5), ("status", "status", 0),
)


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of the rows."""
    def cell(row, key):
        value = row.get(key, "")
        if key == "shared_memory_bytes" and value != "":
            return f"{value / 1024:.0f}"
        return str(value)

    lines = ["  ".join(f"{head:<{width}}" for head, _, width in TABLE).rstrip()]
    for row in rows:
        lines.append("  ".join(f"{cell(row, key):<{width}}" for _, key, width in TABLE).rstrip())
        if row.get("error"):
            lines.append(f"    error: {row['error']}")
    return "\n".join(lines)


def summary_line(summary: dict, arch: int, workers: int) -> str:
    return (f"compile report sm_{arch}: {summary['compiled']}/{summary['rows']} rows compiled, "
            f"{summary['failures']} failures, {summary['spills']} rows with spills, "
            f"{summary['missing_tensor_cores']} bf16/fp16/tf32 matmul rows without "
            f"{'HGMMA' if arch == 90 else 'tensor-core MMA'} ({summary['seconds']} s, {workers} workers)")


# A row's identity across two reports: the compile it describes.
MATCH = ("kernel", "variant", "dtype", "precision", "sizes", "tile", "stages", "warps")


def compare(base: list[dict], rows: list[dict]) -> str:
    """How rows differ from an earlier report's (base): per kernel, the rows both have, how many of those have
    other registers or spills, and the rows only one has; then each row whose spills changed. Rows are the
    same compile where MATCH agrees (values compared as text, as the CSV holds them)."""
    def key(row):
        return tuple(str(row.get(name, "")) for name in MATCH)

    earlier = {key(row): row for row in base}
    kernels: dict[str, list[int]] = {}
    spills = []
    for row in rows:
        counts = kernels.setdefault(row["kernel"], [0, 0, 0, 0])
        before = earlier.pop(key(row), None)
        if before is None:
            counts[3] += 1
            continue
        counts[0] += 1
        counts[1] += str(before.get("registers")) != str(row.get("registers"))
        if str(before.get("spill_bytes")) != str(row.get("spill_bytes")):
            counts[2] += 1
            what = " ".join(value for value in key(row) if value)
            spills.append(f"  {what}: {before.get('registers')} registers, {before.get('spill_bytes')} B spilled -> "
                          f"{row.get('registers')}, {row.get('spill_bytes')} B")
    only_base = {}
    for row in earlier.values():
        only_base[row["kernel"]] = only_base.get(row["kernel"], 0) + 1
    lines = [f"{'kernel':<40}  both  other-registers  other-spills  new  gone"]
    for kernel, (both, registers, spilled, new) in kernels.items():
        lines.append(f"{kernel:<40}  {both:<4}  {registers:<15}  {spilled:<12}  {new:<3}  {only_base.pop(kernel, 0)}")
    lines += [f"{kernel:<40}  0     0                0             0    {gone}" for kernel, gone in only_base.items()]
    return "\n".join(lines + (["spills changed:"] + spills if spills else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compile_report",
        description="Compile every gpunn Triton kernel for a GPU target on this machine (no GPU needed) at "
                    "every autotuning config its pruner keeps, for bf16, fp16, fp32 (TF32 and IEEE) and "
                    "fp64; report registers, spills, shared memory and tensor-core instructions from "
                    "cuobjdump. Exits 1 if a row fails to compile, exceeds shared memory, spills, or is a "
                    "bf16/fp16/tf32 matmul without tensor-core instructions (on sm_90 HGMMA in tiles of 64 "
                    "rows or more, HMMA below; HMMA or HGMMA elsewhere).",
        epilog="Configs are those the kernels' pruners keep at the problem sizes (M, N, K) "
               + ", ".join(f"{name} {m}x{n}x{k}" for name, (m, n, k) in SIZES.items())
               + ". A full run compiles about 2400 configs; --subset about 80.")
    parser.add_argument("--arch", type=int, default=90,
                        help="CUDA compute capability to compile for, e.g. 90 for H100 (default: 90)")
    parser.add_argument("--out", required=True, help="directory for compile_report.csv (created if missing)")
    parser.add_argument("--subset", action="store_true",
                        help="a quick subset: per kernel, one variant and one config in bf16, fp32-ieee and fp64")
    parser.add_argument("--workers", type=int, default=2, help="compiler processes (default: 2)")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when problems are found")
    parser.add_argument("--against", metavar="CSV",
                        help="an earlier compile_report.csv: print how this run's rows differ from its (registers, "
                             "spills, rows added or gone), e.g. an older commit's, compiled from its own worktree")
    parser.add_argument("--only", default="", metavar="KERNELS",
                        help=f"comma-separated kernels to compile, from: {', '.join(c.kernel for c in CASES)} "
                             "(default: all)")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: a file, not a directory")
    if args.workers < 1:
        parser.error(f"--workers: at least 1, got {args.workers}")
    kernels = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = set(kernels) - {case.kernel for case in CASES}
    if unknown:
        parser.error(f"--only: unknown kernel(s) {', '.join(sorted(unknown))}")
    if cuobjdump_path() is None:
        parser.error("cuobjdump not found: it ships in Triton's wheel (triton/backends/nvidia/bin)")
    base = None
    if args.against:
        try:
            with open(args.against, newline="") as f:
                base = list(csv.DictReader(f))
        except OSError as error:
            parser.error(f"--against: {error}")
    rows, summary = run(args.out, arch=args.arch, subset=args.subset, workers=args.workers, kernels=kernels)
    print(format_table(rows))
    if base is not None:
        print(f"against {args.against}:")
        print(compare(base, rows))
    print(f"wrote {Path(args.out) / 'compile_report.csv'}")
    print(summary_line(summary, args.arch, args.workers))
    problems = summary["failures"] + summary["spills"] + summary["missing_tensor_cores"]
    return 1 if problems and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
