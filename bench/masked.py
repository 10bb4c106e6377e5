"""Benchmark of the masked (block-sparse) layer, y = act(x (W * mask)^T + b).

Providers, all run in the same process on the same inputs:
- torch:          F.linear(x, W.masked_fill(~mask, 0), b) then the activation: the dense masked layer eager
                  torch runs (cuBLAS does the whole dense product).
- torch.compile:  that same function through torch.compile (dynamic=False).
- torch.sparse:   forward only (torch has no backward through a BSR weight): F.linear with the masked
                  weight as a torch.sparse_bsr tensor at gpunn's block size, through torch's Triton BSR
                  kernels. The conversion to BSR happens once per weight, outside the timed calls. CUDA
                  only (torch's CPU BSR product has no 16-bit kernels), and only for dtypes where a probe
                  shows torch's BSR F.linear runs on the GPU.
- gpunn:          gpunn.functional.masked_linear with the mask's cached BlockLayout.

Modes as in bench/dense.py (fwd, bwd, fwd+bwd).

Work model: FLOPs count the connections, the same for every provider: 2 M C forward, 4 M C backward,
6 M C both (C = mask.sum()); "TFLOP/s" is therefore effective throughput. Bytes as in bench/dense.py.
For the gpunn provider, each case also times the dense gpunn layer (gpunn.functional.linear) at the same
shape and reports:
- dense_layer_ms: its median time;
- block_cost_ratio: (masked time / visited blocks) / (dense time / dense blocks), at the layout's block
  size. 1 means a visited block costs what a block of the dense layer costs; the target is <= 1.5.
- visited_fraction: visited blocks / dense blocks.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gpunn.functional
import gpunn.reference
from gpunn import masks

from . import dense, harness
from .harness import Record

OP = "masked"
NEGATIVE_SLOPE = dense.NEGATIVE_SLOPE
SPARSE_PROVIDER = "torch.sparse"
CUDA_PROVIDERS = (SPARSE_PROVIDER,)


def _local_2d(n: int, k: int) -> torch.Tensor:
    side = math.isqrt(k)
    if side * side != k or n != k:
        raise ValueError(f"local_2d_3x3 needs a square image: in = out = side^2, got {n}x{k}")
    return masks.local_2d((side, side), 3, padding=1)


# Mask families by name, as functions of (out_features N, in_features K).
MASKS = {
    "local_1d_9": lambda n, k: masks.local_1d(k, n, 9),  # the nine-neuron band
    "local_1d_33": lambda n, k: masks.local_1d(k, n, 33),  # wider bands: denser, more blocks per row
    "local_1d_129": lambda n, k: masks.local_1d(k, n, 129),
    "local_2d_3x3": _local_2d,  # a 3x3 neighbourhood on a square image, zero padding
    "random_1pct": lambda n, k: masks.random(k, n, 0.01, generator=torch.Generator().manual_seed(0)),
    "random_10pct": lambda n, k: masks.random(k, n, 0.10, generator=torch.Generator().manual_seed(0)),
}

# (M, N, K, mask) per preset: "fwd" shapes run the forward mode, "grad" shapes run bwd and fwd+bwd.
PRESETS = {
    "smoke": {"fwd": [(33, 70, 50, "local_1d_9"), (16, 64, 64, "local_2d_3x3"), (20, 40, 70, "random_1pct"),
                      (16, 256, 256, "local_1d_33")],  # 4 x 4 blocks of 64: some skipped
              "grad": [(33, 70, 50, "local_1d_9")]},
    # The target: a band of nine at 4096 features, batch 4096.
    "quick": {"fwd": [(4096, 4096, 4096, "local_1d_9")], "grad": [(4096, 4096, 4096, "local_1d_9")]},
    # Also other families and densities: bands of 33 and 129, 1% and 10% random.
    "full": {"fwd": [(4096, 4096, 4096, "local_1d_9"), (16, 4096, 4096, "local_1d_9"),
                     (4096, 4096, 4096, "local_1d_33"), (4096, 4096, 4096, "local_1d_129"),
                     (4096, 4096, 4096, "local_2d_3x3"), (4096, 4096, 4096, "random_1pct"),
                     (4096, 4096, 4096, "random_10pct"), (8192, 8192, 8192, "local_1d_9")],
             "grad": [(4096, 4096, 4096, "local_1d_9"), (4096, 4096, 4096, "local_1d_129"),
                      (4096, 4096, 4096, "local_2d_3x3"), (4096, 4096, 4096, "random_10pct"),
                      (8192, 8192, 8192, "local_1d_9")]},
}

NOTES = [
    "masked: torch = F.linear(x, W.masked_fill(~mask, 0), b) then the activation; torch.sparse = F.linear with "
    "a BSR weight (forward only, converted outside the timed calls; left out for a dtype where torch's BSR "
    "F.linear raises on this GPU); gpunn = gpunn.functional.masked_linear.",
    "masked: FLOPs count connections (2 M C fwd), so TFLOP/s is effective throughput, equal work for every "
    "provider; block_cost_ratio = (gpunn masked ms / visited blocks) / (gpunn dense ms / dense blocks).",
]


@functools.lru_cache(maxsize=32)
def _mask(name: str, n: int, k: int, device: str) -> torch.Tensor:
    # One tensor per (mask, device): gpunn caches its block layout per mask tensor.
    return MASKS[name](n, k).to(device)


@dataclass(frozen=True)
class Case(dense.Case):
    """A dense.Case with a mask family; connections and block counts are the mask's (see cases())."""

    mask: str = "local_1d_9"
    connections: int = 0
    visited_blocks: int = 0
    dense_blocks: int = 0

    @property
    def op(self) -> str:
        return f"{OP}[{self.mask},{self.activation or 'none'}]"

    def flops(self, mode: str) -> float:
        return 2 * self.m * self.connections * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]

    def bytes(self, mode: str) -> float:
        """dense.Case's fewest bytes with the weight read only where connected (masked-out weights need not be
        loaded); the weight's gradient is still written in full (it is a dense tensor, zero outside the mask)."""
        unconnected = (self.n * self.k - self.connections) * harness.DTYPES[self.dtype].itemsize
        return super().bytes(mode) - unconnected * {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode]

    def weight_read_bound(self) -> bool:
        return False  # the dense weight-read model does not apply: the kernels read only visited blocks

    def modes_for(self, provider: str) -> tuple[str, ...]:
        if provider == SPARSE_PROVIDER:
            # Forward only; torch's BSR tensors need dims that are multiples of the block.
            block_n, block_k = masks.block_layout(_mask(self.mask, self.n, self.k, "cpu"),
                                                  harness.DTYPES[self.dtype]).block
            fits = self.n % block_n == 0 and self.k % block_k == 0
            return tuple(mode for mode in self.modes if mode == "fwd" and fits and _bsr_runs(self.dtype))
        return self.modes

    def make_provider(self, name: str, device: torch.device):
        mask = _mask(self.mask, self.n, self.k, str(device))
        act = gpunn.reference.ACTIVATIONS[self.activation]
        if name == "gpunn":
            layout = masks.block_layout(mask, harness.DTYPES[self.dtype])
            return lambda x, w, b: gpunn.functional.masked_linear(x, w, layout, b, self.activation, NEGATIVE_SLOPE)
        if name == SPARSE_PROVIDER:
            return _bsr_forward(mask, masks.block_layout(mask, harness.DTYPES[self.dtype]).block, act)
        return dense.provider(name, None, _eager(mask, self.activation))

    def reference(self, x, w, b, dy) -> dict[str, tuple[torch.Tensor, ...]]:
        mask = _mask(self.mask, self.n, self.k, str(x.device))
        return dense._reference(self, _eager(mask, self.activation), x, w, b, dy)


@functools.lru_cache(maxsize=None)
def _bsr_runs(dtype: str) -> bool:
    """Whether torch's F.linear takes a BSR weight of this dtype on the GPU (probed once at 64 x 64): where
    it raises, torch has no such path and the provider is left out rather than reported as failing."""
    if not torch.cuda.is_available():
        return False
    dtype_ = harness.DTYPES[dtype]
    weight = torch.randn(64, 64, device="cuda", dtype=dtype_)
    try:
        F.linear(torch.randn(16, 64, device="cuda", dtype=dtype_), weight.to_sparse_bsr((64, 64)))
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


def _eager(mask: torch.Tensor, activation: str | None):
    def masked_eager(x, w, b):
        return gpunn.reference.masked_linear(x, w, mask, b, activation, NEGATIVE_SLOPE)

    return masked_eager


def _bsr_forward(mask: torch.Tensor, block: tuple[int, int], act):
    """F.linear through a BSR weight, converted from (W masked) once per weight tensor and version."""
    converted = {}

    def bsr_forward(x, w, b):
        key = (id(w), w._version)
        if converted.get("key") != key:
            converted["key"] = key
            converted["weight"] = w.detach().masked_fill(~mask, 0).to_sparse_bsr(block)
        return act(F.linear(x, converted["weight"], b), NEGATIVE_SLOPE)

    return bsr_forward


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    """Every case of a preset, ordered by dtype, then forward before gradient shapes, then activation."""
    found = []
    for dtype in dtypes:
        for grad, key in ((False, "fwd"), (True, "grad")):
            for m, n, k, name in PRESETS[preset][key]:
                mask = _mask(name, n, k, "cpu")
                layout = masks.block_layout(mask, harness.DTYPES[dtype])
                found += [Case(m, n, k, dtype, act, grad, name, int(mask.sum()), layout.visited_blocks,
                               layout.dense_blocks) for act in activations]
    return found


def steps(all_cases: list[Case], providers: list[str]) -> int:
    """The progress counter's total: dense.steps plus the dense-layer timing of each gpunn mode."""
    return dense.steps(all_cases, providers) + ("gpunn" in providers) * sum(len(c.modes) for c in all_cases)


def _block_costs(all_cases: list[Case], records: list[Record], device: torch.device,
                 progress: harness.Progress) -> list[Record]:
    """For each gpunn result: the dense gpunn layer's time at the same shape, and the cost per block."""
    masked_ms = {r.key: r.p50 for r in records if r.provider == "gpunn" and r.metric == "ms"}
    extra = []
    for index, case in enumerate(all_cases):
        x, w, b, dy = case.inputs(device, seed=index)
        layer = dense.make_provider("gpunn", case.activation)
        for mode in case.modes:
            run, _ = dense.callables(mode, layer, x, w, b, dy)
            run()  # autotune
            timing = harness.time_ms(run, device)
            del run

            def rec(metric, p50, p20=None, p80=None, case=case, mode=mode):
                return Record(case.op, "gpunn", mode, case.shape, case.dtype, metric, p50, p20, p80)

            extra += [rec("dense_layer_ms", timing.p50, timing.p20, timing.p80),
                      rec("visited_fraction", case.visited_blocks / max(case.dense_blocks, 1))]
            ms = masked_ms.get((case.op, "gpunn", mode, case.shape, case.dtype))
            if ms is not None and case.visited_blocks:
                ratio = (ms / case.visited_blocks) / (timing.p50 / case.dense_blocks)
                extra.append(rec("block_cost_ratio", ratio))
                label = f"block cost ratio {ratio:.2f}"
            else:
                label = "no gpunn result"
            progress.step(f"{case.op} {mode} {case.dtype} {case.shape} gpunn dense layer: {timing.p50:.4g} ms, "
                          f"{label}")
        del x, w, b, dy
        harness.free_memory(device)
    return extra


def run(all_cases: list[Case], providers: list[str], device: torch.device, ceilings: harness.Ceilings,
        log: harness.Log, progress: harness.Progress) -> tuple[list[Record], list[str]]:
    """bench/dense.py's run over masked cases, then the per-block cost against the dense gpunn layer."""
    records, errors = dense.run(all_cases, providers, device, ceilings, log, progress)
    if "gpunn" in providers:
        records += _block_costs(all_cases, records, device, progress)
    return records, errors
