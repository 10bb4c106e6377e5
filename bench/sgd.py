"""Benchmark of one SGD step (op sgd): momentum 0.9, weight decay 1e-4, over a model's parameters split
into tensors of a million elements.

Providers: torch = torch.optim.SGD (its foreach path), gpunn = gpunn.optim.SGD (one launch). Mode fwd is
the step; the momentum buffers exist (made in the warm-up). Fewest bytes: read parameters, gradients and
buffers, write parameters and buffers (5 accesses a parameter). Accuracy: one step from fresh copies
against torch.optim.SGD in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import gpunn.optim

from . import dense, harness

NOTES = [
    "sgd: one step, momentum 0.9, weight decay 1e-4, tensors of 1M elements; torch = torch.optim.SGD (foreach), "
    "gpunn = gpunn.optim.SGD (one launch); GB/s counts 5 accesses a parameter (p, grad, buf read; p, buf written).",
]

PRESETS = {"smoke": [3_000], "quick": [100_000_000], "full": [10_000_000, 100_000_000]}  # parameters
TENSOR = 1_000_000  # elements per parameter tensor (1000 below a million parameters)


@dataclass(frozen=True)
class Case(harness.CaseBase):
    parameters: int
    dtype: str
    grad: bool = False
    activation: None = None

    op = "sgd"
    settings = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)

    @property
    def shape(self) -> str:
        return f"{self.parameters}"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd",)

    def flops(self, mode: str) -> float:
        return 5 * self.parameters

    def bytes(self, mode: str) -> float:
        return 5 * self.parameters * harness.DTYPES[self.dtype].itemsize

    def modes_for(self, provider: str) -> tuple[str, ...]:
        return self.modes if provider in ("torch", "gpunn") else ()

    def make_provider(self, name: str, device: torch.device):
        return {"torch": torch.optim.SGD, "gpunn": gpunn.optim.SGD}[name]

    def _tensor_sizes(self) -> list[int]:
        size = TENSOR if self.parameters >= TENSOR else 1000
        return [size] * (self.parameters // size) + ([self.parameters % size] if self.parameters % size else [])

    def inputs(self, device: torch.device, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = harness.DTYPES[self.dtype]
        params = [torch.randn(n, device=device, generator=gen).to(dtype) for n in self._tensor_sizes()]
        grads = [torch.randn(n, device=device, generator=gen).to(dtype) for n in self._tensor_sizes()]
        return params, grads, None, None

    def callables(self, mode: str, optimizer_class, params, grads, _, __):
        def fresh():
            copies = [torch.nn.Parameter(p.clone()) for p in params]
            for p, g in zip(copies, grads):
                p.grad = g
            return copies, optimizer_class(copies, **self.settings)

        timed, optimizer = fresh()

        def check():
            copies, one = fresh()
            one.step()
            return tuple(p.detach() for p in copies)

        return optimizer.step, check

    def reference(self, params, grads, _, __) -> dict[str, tuple[torch.Tensor, ...]]:
        copies = [torch.nn.Parameter(p.detach().to(torch.float64)) for p in params]
        for p, g in zip(copies, grads):
            p.grad = g.to(torch.float64)
        torch.optim.SGD(copies, **self.settings).step()
        return {"fwd": tuple(p.detach() for p in copies)}


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    """fp32 (the target) and every other dtype asked for (activations ignored)."""
    return [Case(n, dtype) for dtype in dict.fromkeys(["fp32", *dtypes]) for n in PRESETS[preset]]


def steps(all_cases: list[Case], providers: list[str]) -> int:
    return dense.steps(all_cases, providers)


run = dense.run
