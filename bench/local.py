"""Benchmark of the locally connected layers: op local2d (gpunn.functional.locally_connected2d) here, op
local1d (gpunn.functional.locally_connected1d) in bench/local1d.py; one Case serves both, by the number of
spatial dims of its input.

Providers, all run in the same process on the same inputs:
- torch:          the usual workaround, gpunn.reference.locally_connected{1,2}d: F.unfold (the (N, C*K^d, L)
                  patch tensor in memory), an einsum with each position's weights, the bias added.
- torch.compile:  that same function through torch.compile (dynamic=False).
- gpunn:          gpunn.functional.locally_connected{1,2}d: patches gathered inside the Triton kernels.

Modes as in bench/dense.py (fwd, bwd, fwd+bwd); the --activations list does not apply (the layer has none).

Work model: FLOPs 2 N O P forward (P = the (position, tap) pairs of an output channel whose tap lies inside
the input, at most L C K^d for L output positions), twice that backward. Fewest bytes: forward reads x, the
weights of those taps (O P) and the bias, writes y; backward reads dy, x and those weights, writes dx, dW
(every tap's: O L C K^d) and db. Memory: peak_mem_ratio = (inputs + weights + the peak a call allocates) / (inputs +
outputs + weights), where outputs are what the mode returns; the target is <= 1.10 (no patch tensor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import gpunn.functional
import gpunn.reference

from . import dense, harness
from .harness import Record

OP = "local2d"

# (N, C, O, (H, W), kernel, padding) per preset: "fwd" runs the forward mode, "grad" runs bwd and fwd+bwd.
PRESETS = {
    "smoke": {"fwd": [(3, 2, 5, (5, 6), 3, 1), (16, 17, 16, (4, 4), 3, 0)], "grad": [(3, 2, 5, (5, 6), 3, 1)]},
    # The target: batch 64, 64 channels in and out, 32x32, 3x3, padding 1.
    "quick": {"fwd": [(64, 64, 64, (32, 32), 3, 1)], "grad": [(64, 64, 64, (32, 32), 3, 1)]},
    "full": {"fwd": [(64, 64, 64, (32, 32), 3, 1), (256, 64, 64, (32, 32), 3, 1), (64, 3, 64, (64, 64), 5, 2),
                     (16, 128, 128, (16, 16), 3, 1)],
             "grad": [(64, 64, 64, (32, 32), 3, 1), (256, 64, 64, (32, 32), 3, 1)]},
}

NOTES = [
    "local2d: torch = F.unfold + einsum (+ bias), the usual workaround (gpunn.reference.locally_connected2d); "
    "gpunn = gpunn.functional.locally_connected2d (patches gathered in the kernels). FLOPs 2 N O P fwd (P: "
    "(position, tap) pairs inside the input); "
    "peak_mem_ratio = (inputs + weights + peak allocated) / (inputs + outputs + weights), target <= 1.10.",
]

# The layer of each spatial rank: (gpunn's, the plain-torch baseline's), both f(x, w, b, stride, padding, dilation).
LAYERS = {1: (gpunn.functional.locally_connected1d, gpunn.reference.locally_connected1d),
          2: (gpunn.functional.locally_connected2d, gpunn.reference.locally_connected2d)}


@dataclass(frozen=True)
class Case(harness.CaseBase):
    """One problem: x (N, C, *size) with size (H, W) or (L,), a window of `kernel` taps along each spatial dim
    with zero padding, O output channels, stride and dilation 1. The weight is (O, *out_size, C, *window),
    the bias (O, *out_size)."""

    n: int
    c: int
    o: int
    size: tuple[int, ...]
    kernel: int
    padding: int
    dtype: str
    grad: bool
    activation: None = None  # the harness's records carry it; the layer has none

    @property
    def op(self) -> str:
        return f"local{len(self.size)}d[k{self.kernel}p{self.padding}]"

    @property
    def shape(self) -> str:
        return "x".join(map(str, (self.n, self.c, *self.size))) + f"->{self.o}"

    @property
    def out_size(self) -> tuple[int, ...]:
        return tuple(s + 2 * self.padding - self.kernel + 1 for s in self.size)

    @property
    def positions(self) -> int:
        return math.prod(self.out_size)

    @property
    def taps(self) -> int:
        return self.c * self.kernel ** len(self.size)

    @property
    def connections(self) -> int:
        """(position, tap) pairs of one output channel whose tap lies inside the input: the least work (a
        padding tap's weight is never read, and its input is zero; the forward and weight-gradient kernels
        multiply those zeros all the same, so their dot FLOPs run above this minimum)."""
        inside = [sum(min(p - self.padding + self.kernel, size) - max(p - self.padding, 0) for p in range(out))
                  for size, out in zip(self.size, self.out_size)]
        return self.c * math.prod(inside)

    def flops(self, mode: str) -> float:
        return 2 * self.n * self.o * self.connections * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]

    def _elements(self) -> dict[str, int]:
        x = self.n * self.c * math.prod(self.size)
        y = self.n * self.o * self.positions
        weight, bias = self.o * self.positions * self.taps, self.o * self.positions
        return {"x": x, "y": y, "weight": weight, "read_weight": self.o * self.connections, "bias": bias}

    def bytes(self, mode: str) -> float:
        e = self._elements()
        # Weights of taps in the padding are never read; their gradient (zero) is written with the others.
        forward = e["x"] + e["read_weight"] + e["bias"] + e["y"]
        backward = (e["y"] + e["x"] + e["read_weight"]) + (e["x"] + e["weight"] + e["bias"])
        elements = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]
        return elements * harness.DTYPES[self.dtype].itemsize

    def memory_floor(self, mode: str) -> tuple[float, float]:
        """(inputs + weights, outputs) in bytes for the peak-memory ratio."""
        e = self._elements()
        size = harness.DTYPES[self.dtype].itemsize
        inputs = e["x"] + e["weight"] + e["bias"] + (e["y"] if mode != "fwd" else 0)  # dy is an input backward
        outputs = {"fwd": e["y"], "bwd": e["x"] + e["weight"] + e["bias"],
                   "fwd+bwd": e["y"] + e["x"] + e["weight"] + e["bias"]}[mode]
        return inputs * size, outputs * size

    def weight_bytes(self) -> float:
        return self._elements()["read_weight"] * harness.DTYPES[self.dtype].itemsize

    def make_provider(self, name: str, device: torch.device):
        """The callable f(x, w, b) provider `name` benchmarks."""
        gpunn_layer, torch_layer = LAYERS[len(self.size)]
        padding = self.padding
        return dense.provider(name, lambda x, w, b: gpunn_layer(x, w, b, 1, padding, 1),
                              lambda x, w, b: torch_layer(x, w, b, 1, padding, 1))

    def inputs(self, device: torch.device, seed: int):
        """(x, w, b, dy) on device; x, w and b need gradients for bwd and fwd+bwd."""
        dtype = harness.DTYPES[self.dtype]
        gen = torch.Generator(device=device).manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=gen)  # noqa: E731
        scale = self.taps ** -0.5
        window = (self.kernel,) * len(self.size)
        x = randn(self.n, self.c, *self.size)
        w = randn(self.o, *self.out_size, self.c, *window) * scale
        b = randn(self.o, *self.out_size) * scale
        dy = randn(self.n, self.o, *self.out_size)
        for t in (x, w, b):
            t.requires_grad_(self.grad)
        return x, w, b, dy

    def reference(self, x, w, b, dy) -> dict[str, tuple[torch.Tensor, ...]]:
        return dense._reference(self, self.make_provider("torch", x.device), x, w, b, dy)


def cases(preset: str, dtypes: list[str], activations: list[str | None], presets=PRESETS) -> list[Case]:
    """Every case of a preset (of `presets`: this module's 2-D shapes unless given), ordered by dtype, then
    forward before gradient shapes (activations ignored)."""
    return [Case(n, c, o, size, k, p, dtype, grad)
            for dtype in dtypes
            for grad, key in ((False, "fwd"), (True, "grad"))
            for (n, c, o, size, k, p) in presets[preset][key]]


steps = dense.steps


def run(all_cases: list[Case], providers: list[str], device: torch.device, ceilings: harness.Ceilings,
        log: harness.Log, progress: harness.Progress) -> tuple[list[Record], list[str]]:
    """bench/dense.py's run over these cases, plus each result's peak-memory ratio."""
    records, errors = dense.run(all_cases, providers, device, ceilings, log, progress)
    by_key = {(case.op, case.shape, case.dtype): case for case in all_cases}
    for record in list(records):
        case = by_key.get((record.op, record.shape, record.dtype))
        if record.metric == "peak_mem_mib" and case is not None:
            fixed, outputs = case.memory_floor(record.mode)
            ratio = (fixed + record.p50 * 2**20) / (fixed + outputs)
            records.append(Record(record.op, record.provider, record.mode, record.shape, record.dtype,
                                  "peak_mem_ratio", ratio))
    return records, errors
