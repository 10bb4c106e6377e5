"""Benchmark of the locally connected layer (gpunn.functional.locally_connected2d).

Providers, all run in the same process on the same inputs:
- torch:          the usual workaround: F.unfold (the (N, C*KH*KW, L) patch tensor in memory), an einsum with
                  each position's weights, the bias added.
- torch.compile:  that same function through torch.compile (dynamic=False).
- gpunn:          gpunn.functional.locally_connected2d: patches gathered inside the Triton kernels.

Modes as in bench/dense.py (fwd, bwd, fwd+bwd); the --activations list does not apply (the layer has none).

Work model: FLOPs 2 N O L R forward (L = OH OW positions, R = C KH KW taps), twice that backward. Fewest
bytes: forward reads x, the weights (O L R) and bias, writes y; backward reads dy, x and the weights,
writes dx, dW and db. Memory: peak_mem_ratio = (inputs + weights + the peak a call allocates) / (inputs +
outputs + weights), where outputs are what the mode returns; the target is <= 1.10 (no patch tensor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gpunn.functional

from . import dense, harness
from .harness import Record

OP = "local2d"

# (N, C, O, H, W, kernel, padding) per preset: "fwd" runs the forward mode, "grad" runs bwd and fwd+bwd.
PRESETS = {
    "smoke": {"fwd": [(3, 2, 5, 5, 6, 3, 1), (16, 17, 16, 4, 4, 3, 0)], "grad": [(3, 2, 5, 5, 6, 3, 1)]},
    # The target: batch 64, 64 channels in and out, 32x32, 3x3, padding 1.
    "quick": {"fwd": [(64, 64, 64, 32, 32, 3, 1)], "grad": [(64, 64, 64, 32, 32, 3, 1)]},
    "full": {"fwd": [(64, 64, 64, 32, 32, 3, 1), (256, 64, 64, 32, 32, 3, 1), (64, 3, 64, 64, 64, 5, 2),
                     (16, 128, 128, 16, 16, 3, 1)],
             "grad": [(64, 64, 64, 32, 32, 3, 1), (256, 64, 64, 32, 32, 3, 1)]},
}

NOTES = [
    "local2d: torch = F.unfold + einsum (+ bias), the usual workaround; gpunn = "
    "gpunn.functional.locally_connected2d (patches gathered in the kernels). FLOPs 2 N O L R fwd; "
    "peak_mem_ratio = (inputs + weights + peak allocated) / (inputs + outputs + weights), target <= 1.10.",
]


@dataclass(frozen=True)
class Case:
    """One problem: x (N, C, H, W), a KxK window with padding, O output channels, stride and dilation 1."""

    n: int
    c: int
    o: int
    h: int
    w: int
    kernel: int
    padding: int
    dtype: str
    grad: bool
    activation: None = None  # the harness's records carry it; the layer has none

    @property
    def op(self) -> str:
        return f"{OP}[k{self.kernel}p{self.padding}]"

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.c}x{self.h}x{self.w}->{self.o}"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("bwd", "fwd+bwd") if self.grad else ("fwd",)

    @property
    def out_size(self) -> tuple[int, int]:
        return (self.h + 2 * self.padding - self.kernel + 1, self.w + 2 * self.padding - self.kernel + 1)

    @property
    def positions(self) -> int:
        return self.out_size[0] * self.out_size[1]

    @property
    def taps(self) -> int:
        return self.c * self.kernel * self.kernel

    def flops(self, mode: str) -> float:
        return 2 * self.n * self.o * self.positions * self.taps * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]

    def _elements(self) -> dict[str, int]:
        x = self.n * self.c * self.h * self.w
        y = self.n * self.o * self.positions
        weight, bias = self.o * self.positions * self.taps, self.o * self.positions
        return {"x": x, "y": y, "weight": weight, "bias": bias}

    def bytes(self, mode: str) -> float:
        e = self._elements()
        forward = e["x"] + e["weight"] + e["bias"] + e["y"]
        backward = (e["y"] + e["x"] + e["weight"]) + (e["x"] + e["weight"] + e["bias"])
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
        return self._elements()["weight"] * harness.DTYPES[self.dtype].itemsize

    def weight_read_bound(self) -> bool:
        return False  # the memory floor is reported through gbps and frac_copy_ceiling

    def modes_for(self, provider: str) -> tuple[str, ...]:
        return self.modes

    def make_provider(self, name: str, device: torch.device):
        padding = self.padding
        if name == "gpunn":
            return lambda x, w, b: gpunn.functional.locally_connected2d(x, w, b, padding=padding)
        if name == "torch":
            return _unfold_einsum(padding)
        if name in dense.COMPILE_MODES:
            torch._dynamo.reset()  # one compiled variant per case (see bench/dense.py)
            return torch.compile(_unfold_einsum(padding), mode=dense.COMPILE_MODES[name], dynamic=False)
        raise ValueError(f"unknown provider {name!r}")

    def inputs(self, device: torch.device, seed: int):
        dtype = harness.DTYPES[self.dtype]
        gen = torch.Generator(device=device).manual_seed(seed)
        oh, ow = self.out_size
        randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=gen)  # noqa: E731
        scale = self.taps ** -0.5
        x = randn(self.n, self.c, self.h, self.w)
        w = randn(self.o, oh, ow, self.c, self.kernel, self.kernel) * scale
        b = randn(self.o, oh, ow) * scale
        dy = randn(self.n, self.o, oh, ow)
        for t in (x, w, b):
            t.requires_grad_(self.grad)
        return x, w, b, dy

    def reference(self, x, w, b, dy) -> dict[str, tuple[torch.Tensor, ...]]:
        return dense._reference(self, _unfold_einsum(self.padding), x, w, b, dy)


def _unfold_einsum(padding: int):
    def unfold_einsum(x, w, b):
        o, oh, ow, c, kh, kw = w.shape
        patches = F.unfold(x, (kh, kw), padding=padding)  # (N, C*KH*KW, L): the tensor gpunn avoids
        y = torch.einsum("nrl,olr->nol", patches, w.reshape(o, oh * ow, c * kh * kw)) + b.reshape(o, oh * ow)
        return y.reshape(x.shape[0], o, oh, ow)

    return unfold_einsum


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    """Every case of a preset, ordered by dtype, then forward before gradient shapes (activations ignored)."""
    return [Case(n, c, o, h, w, k, p, dtype, grad)
            for dtype in dtypes
            for grad, key in ((False, "fwd"), (True, "grad"))
            for (n, c, o, h, w, k, p) in PRESETS[preset][key]]


def steps(all_cases: list[Case], providers: list[str]) -> int:
    return dense.steps(all_cases, providers)


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
