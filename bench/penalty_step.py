"""Benchmark of a critic's training step with a gradient penalty (op penalty_step): double backward.

The 4-layer MLP of bench/mlp_step.py (width W) with GELU between the layers, as a WGAN-GP critic: a step
computes the output, the input's gradient with create_graph=True, the loss mean(output) + 10 mean((||dx||
- 1)^2) over the batch's rows, its backward (through the input gradient: double backward through every
layer) and an SGD step with momentum. GELU, not ReLU: its second derivative is not zero, so the double
backward takes its full path (z recomputed, act''(z)).

Providers: torch = nn.Linear + nn.GELU and torch.optim.SGD (eager; torch.compile does not take double
backward); gpunn = the same model through gpunn.convert (GELU fused into gpunn.Linear) and gpunn.optim.SGD.
Mode fwd+bwd is one step. FLOPs, the work the step needs, per layer in units of B W^2: forward 2, the
input gradient 2, and the backward of the loss 12 (the first-order weight gradient 2 and input gradient 2;
through the input gradient: g_dz 2, g_W 4 and g_x 2), 16 in all. Not counted, gpunn's extra work: it
recomputes z (2), and its create_graph pass also forms the weight gradients (2), which autograd.grad(...,
x) then drops (a custom autograd function's needs_input_grad is fixed at forward time). Bytes: a rough
model, mlp_step's count twice over, not a minimum. Accuracy: one step from the same weights against the
float64 torch model: the loss and the first layer's updated weight (mlp_step's check).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import mlp_step

NOTES = [
    "penalty_step: mlp_step's 4 layers with GELU as a WGAN-GP critic: output mean + 10 x the squared gap of "
    "||d output / d x|| to 1, backward through the input gradient (double backward), SGD momentum 0.9; torch = "
    "eager (torch.compile does not take double backward); gpunn = gpunn.convert of it + gpunn.optim.SGD.",
]

PRESETS = mlp_step.PRESETS  # the same (batch, width) sizes
PENALTY = 10.0


@dataclass(frozen=True)
class Case(mlp_step.Case):
    op = "penalty_step"
    LAYER_ACTIVATION: ClassVar[type] = torch.nn.GELU

    def flops(self, mode: str) -> float:
        return 16 * self.batch * self.width * self.width * mlp_step.LAYERS

    def bytes(self, mode: str) -> float:
        # A rough model, not a minimum: mlp_step's count twice over (the penalty's passes repeat the backward's
        # reads and writes; SGD's share, counted twice, is small beside them at these batch sizes).
        return 2 * super().bytes(mode)

    def loss(self, provider: str, model, x, y) -> torch.Tensor:
        x = x.detach().requires_grad_()
        output = model(x)
        (grad_x,) = torch.autograd.grad(output.sum(), x, create_graph=True)
        return output.mean() + PENALTY * (grad_x.norm(dim=1) - 1).pow(2).mean()


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    return [Case(batch, width, dtype) for dtype in dtypes for batch, width in PRESETS[preset]]


steps, run = mlp_step.steps, mlp_step.run
