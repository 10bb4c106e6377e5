"""Benchmark of cross-entropy over class indices (op xent).

Providers: torch = F.cross_entropy (log_softmax + nll_loss), torch.compile of it, gpunn =
gpunn.functional.cross_entropy. Modes: fwd (the loss), bwd (the logits' gradient from a graph built
once), fwd+bwd. Fewest bytes: the logits read once forward; read once and the gradient written once
backward. Accuracy: loss and gradient against F.cross_entropy in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gpunn.functional

from . import dense, harness

NOTES = [
    "xent: torch = F.cross_entropy (log_softmax + nll), torch.compile of it, gpunn = gpunn.functional.cross_entropy "
    "(one pass over the logits forward, one backward); GB/s counts the logits read (and the gradient written).",
]

PRESETS = {
    "smoke": {"fwd": [(37, 50)], "grad": [(37, 50), (5, 3000)]},
    "quick": {"fwd": [(8192, 32768)], "grad": [(8192, 32768)]},  # the target
    "full": {"fwd": [(8192, 32768), (4096, 128256)], "grad": [(8192, 32768), (4096, 128256), (65536, 1000)]},
}


@dataclass(frozen=True)
class Case(harness.CaseBase):
    rows: int
    classes: int
    dtype: str
    grad: bool
    activation: None = None

    op = "xent"

    @property
    def shape(self) -> str:
        return f"{self.rows}x{self.classes}"

    def flops(self, mode: str) -> float:
        return 4 * self.rows * self.classes * {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode]

    def bytes(self, mode: str) -> float:
        logits = self.rows * self.classes * harness.DTYPES[self.dtype].itemsize
        return logits * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]

    def make_provider(self, name: str, device: torch.device):
        return dense.provider(name, lambda x, target, _: gpunn.functional.cross_entropy(x, target),
                              lambda x, target, _: F.cross_entropy(x, target))

    def inputs(self, device: torch.device, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(self.rows, self.classes, device=device, generator=gen).to(harness.DTYPES[self.dtype])
        target = torch.randint(0, self.classes, (self.rows,), device=device, generator=gen)
        return x.requires_grad_(self.grad), target, None, None

    def callables(self, mode: str, f, x, target, _, __):
        if mode == "fwd":
            run = lambda: f(x, target, None)  # noqa: E731
            return run, lambda: (run(),)
        if mode == "bwd":
            loss = f(x, target, None)
            run = lambda: torch.autograd.grad(loss, x, retain_graph=True)  # noqa: E731
            return run, run

        def check():
            loss = f(x, target, None)
            return (loss, *torch.autograd.grad(loss, x))

        return (lambda: torch.autograd.grad(f(x, target, None), x)), check

    def reference(self, x, target, _, __) -> dict[str, tuple[torch.Tensor, ...]]:
        x64 = x.detach().to(torch.float64).requires_grad_(self.grad)
        with torch.enable_grad():
            loss = F.cross_entropy(x64, target)
        if not self.grad:
            return {"fwd": (loss,)}
        (grad,) = torch.autograd.grad(loss, x64)
        return {"bwd": (grad,), "fwd+bwd": (loss.detach(), grad)}


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    """Every case of a preset, by dtype, forward shapes first (activations ignored)."""
    return [Case(n, c, dtype, grad) for dtype in dtypes for grad, key in ((False, "fwd"), (True, "grad"))
            for (n, c) in PRESETS[preset][key]]


steps = dense.steps


run = dense.run
