"""Benchmark of one SGD step (op sgd): momentum 0.9, weight decay 1e-4, over a model's parameters split
into tensors of a million elements.

Providers: torch = torch.optim.SGD (its foreach path), gpunn = gpunn.optim.SGD (one launch). Mode fwd is
the step; the momentum buffers exist (made in the warm-up). Fewest bytes: read parameters, gradients and
buffers, write parameters and buffers (5 accesses a parameter). Accuracy: two steps (making the buffers, then
using them) from fresh copies at 1/100 of the parameters' scale (CHECK_SCALE) against torch.optim.SGD in
float64.
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
        copies = _with_grads([p.clone() for p in params], grads)
        return optimizer_class(copies, **self.settings).step, lambda: _two_steps(optimizer_class, _scaled(params),
                                                                                 grads, self.settings)

    def reference(self, params, grads, _, __) -> dict[str, tuple[torch.Tensor, ...]]:
        return {"fwd": _two_steps(torch.optim.SGD, [p.to(torch.float64) for p in _scaled(params)],
                                  [g.to(torch.float64) for g in grads], self.settings)}


# The accuracy check's parameters, as a fraction of the timed ones: two steps' update (about 3 lr |g|) then
# outweighs them, so that a wrong update shows in their error (at full scale it moves them by ~3e-2 of themselves:
# a momentum lost in the second step had passed in bf16).
CHECK_SCALE = 0.01


def _with_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    copies = [torch.nn.Parameter(p) for p in params]
    for p, g in zip(copies, grads):
        p.grad = g
    return copies


def _scaled(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The check's starting parameters, rounded in the parameters' dtype (the reference starts from the same)."""
    return [p * CHECK_SCALE for p in params]


def _two_steps(optimizer_class, params, grads, settings) -> tuple[torch.Tensor, ...]:
    """The parameters after two steps from copies of params: the first makes the momentum buffers, the
    second, as every timed step, uses them."""
    copies = _with_grads([p.clone() for p in params], grads)
    optimizer = optimizer_class(copies, **settings)
    optimizer.step()
    optimizer.step()
    return tuple(p.detach() for p in copies)


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    """fp32 (the target) and every other dtype asked for (activations ignored)."""
    return [Case(n, dtype) for dtype in dict.fromkeys(["fp32", *dtypes]) for n in PRESETS[preset]]


steps = dense.steps


run = dense.run
