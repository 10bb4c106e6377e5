"""Benchmark of the mean squared error loss (op mse).

Providers: torch = F.mse_loss (reduction "mean"), torch.compile of it, gpunn = gpunn.functional.mse_loss.
Modes as bench/xent.py's (whose Case this one extends): fwd (the loss), bwd (the input's gradient from a
graph built once), fwd+bwd. Input and target are (rows, cols) of one dtype; only the input needs a gradient.
Work model: FLOPs 3 an element forward (difference, square, sum) and 3 backward; fewest bytes: input and
target read once forward; read once and the input's gradient written once backward. Accuracy: loss and
gradient against F.mse_loss in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gpunn.functional

from . import dense, harness, xent

NOTES = [
    "mse: torch = F.mse_loss (mean), torch.compile of it, gpunn = gpunn.functional.mse_loss (one pass over input "
    "and target forward, one backward); GB/s counts input and target read (and the gradient written).",
]

# (rows, cols) per preset: "fwd" runs the forward mode, "grad" runs bwd and fwd+bwd.
PRESETS = {
    "smoke": {"fwd": [(37, 50)], "grad": [(37, 50), (3, 2500)]},
    "quick": {"fwd": [(8192, 32768)], "grad": [(8192, 32768)]},  # as xent's logits
    "full": {"fwd": [(8192, 32768), (1024, 4096), (16384, 32768)],
             "grad": [(8192, 32768), (1024, 4096), (16384, 32768)]},
}


def _eager(x, target, _):
    return F.mse_loss(x, target)


@dataclass(frozen=True)
class Case(xent.Case):
    """input and target (rows, classes): xent's Case, whose `classes` are the columns here."""

    op = "mse"

    def flops(self, mode: str) -> float:
        return 3 * self.rows * self.classes * {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode]

    def bytes(self, mode: str) -> float:
        tensor = self.rows * self.classes * harness.DTYPES[self.dtype].itemsize
        return tensor * {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode]

    def make_provider(self, name: str, device: torch.device):
        """The callable f(input, target, None) provider `name` benchmarks."""
        return dense.provider(name, lambda x, target, _: gpunn.functional.mse_loss(x, target), _eager)

    def inputs(self, device: torch.device, seed: int):
        """(input, target, None, None) on device; the input needs a gradient for bwd and fwd+bwd."""
        gen = torch.Generator(device=device).manual_seed(seed)
        x, target = (torch.randn(self.rows, self.classes, device=device, generator=gen).to(harness.DTYPES[self.dtype])
                     for _ in range(2))
        return x.requires_grad_(self.grad), target, None, None

    def reference(self, x, target, _, __) -> dict[str, tuple[torch.Tensor, ...]]:
        """Each mode's outputs of F.mse_loss in float64 from float64 copies of the same inputs."""
        x64 = x.detach().double().requires_grad_(self.grad)
        with torch.enable_grad():
            return {mode: tuple(t.detach() for t in self.callables(mode, _eager, x64, target.double(), None, None)[1]())
                    for mode in self.modes}


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    """Every case of a preset, by dtype, forward shapes first (activations ignored)."""
    return [Case(rows, cols, dtype, grad) for dtype in dtypes for grad, key in ((False, "fwd"), (True, "grad"))
            for (rows, cols) in PRESETS[preset][key]]


steps, run = xent.steps, xent.run
