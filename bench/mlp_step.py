"""Benchmark of a whole training step (op mlp_step): a 4-layer MLP (width W, ReLU between layers),
forward, cross-entropy, backward and an SGD step with momentum, on a batch of B.

Providers: torch = nn.Linear + nn.ReLU, F.cross_entropy and torch.optim.SGD (eager); gpunn = the same
model through gpunn.convert (ReLU fused into gpunn.Linear), gpunn's cross-entropy and gpunn.optim.SGD.
Mode fwd+bwd is one step. FLOPs: 6 B W^2 per layer (forward and backward). Accuracy: one step from the
same weights against the float64 torch model: the loss and the first layer's updated weight (see
Case._checked_step for what that cannot catch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import gpunn

from . import dense, harness

NOTES = [
    "mlp_step: 4 layers, ReLU, cross-entropy over width classes, SGD momentum 0.9; torch = eager nn.Linear + "
    "torch.optim.SGD; gpunn = gpunn.convert of it + gpunn.functional.cross_entropy + gpunn.optim.SGD; one step a call.",
]

PRESETS = {"smoke": [(16, 32)], "quick": [(1024, 4096)], "full": [(1024, 4096), (4096, 4096)]}  # (batch, width)
LAYERS = 4


def _model(width: int, device, dtype, seed: int, activation=torch.nn.ReLU) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for index in range(LAYERS):
        layers.append(torch.nn.Linear(width, width, device=device, dtype=dtype))
        if index < LAYERS - 1:
            layers.append(activation())
    return torch.nn.Sequential(*layers)


def model_of(provider: str, case, dtype: torch.dtype, device, seed: int) -> torch.nn.Sequential:
    """A fresh model of the case (its width and activation, seeded init made in its dtype, then cast to dtype,
    so that a float64 reference holds the same rounded weights): torch's layers, or for gpunn the same model
    through gpunn.convert (the activation fused into gpunn.Linear)."""
    model = _model(case.width, device, harness.DTYPES[case.dtype], seed, case.LAYER_ACTIVATION).to(dtype)
    return gpunn.convert(model, inplace=True) if provider == "gpunn" else model


def criterion(provider: str):
    """The provider's cross-entropy function."""
    return gpunn.functional.cross_entropy if provider == "gpunn" else F.cross_entropy


@dataclass(frozen=True)
class Case(harness.CaseBase):
    batch: int
    width: int
    dtype: str
    grad: bool = True
    activation: None = None  # the harness's per-case activation: none (the model has its own, below)

    op = "mlp_step"
    LAYER_ACTIVATION: ClassVar[type] = torch.nn.ReLU  # between the layers; gpunn.convert fuses it into gpunn.Linear

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.width}x{LAYERS}"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd+bwd",)

    def flops(self, mode: str) -> float:
        return 6 * self.batch * self.width * self.width * LAYERS

    def bytes(self, mode: str) -> float:
        # Per weight: read forward, read for dx, dW written, then SGD's five accesses. Per activation
        # (B x W a layer): written forward, then x and dy read and dx written backward.
        per_layer = 8 * self.width * self.width + 4 * self.batch * self.width
        return LAYERS * per_layer * harness.DTYPES[self.dtype].itemsize

    def modes_for(self, provider: str) -> tuple[str, ...]:
        return self.modes if provider in ("torch", "gpunn") else ()

    def make_provider(self, name: str, device: torch.device):
        return name

    def inputs(self, device: torch.device, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(self.batch, self.width, device=device, generator=gen).to(harness.DTYPES[self.dtype])
        y = torch.randint(0, self.width, (self.batch,), device=device, generator=gen)
        return x, y, seed, None

    def loss(self, provider: str, model, x, y) -> torch.Tensor:
        """The step's loss: cross-entropy of the model's output (width classes) against y."""
        return criterion(provider)(model(x), y)

    def _step_fn(self, provider: str, x, y, seed: int):
        """(step, model): one training step (returning its loss) of a fresh model (the case's dtype, seeded init)
        on x, in x's dtype."""
        model = model_of(provider, self, x.dtype, x.device, seed)
        optimizer = (gpunn.optim.SGD if provider == "gpunn" else torch.optim.SGD)(model.parameters(), lr=0.01,
                                                                                   momentum=0.9)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss(provider, model, x, y)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return step, model

    def _checked_step(self, provider: str, x, y, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the accuracy check compares: one step of a fresh model, its loss and the first layer's updated
        weight. A weak check (a step moves that weight by about 1e-4 of itself: a gradient of zero passes), but
        the gradients themselves are no better: at width 4096 in bf16, torch's own are 4-5e-2 from float64's
        (backpropagation through random layers cancels), past every tolerance. The layers' gradients are
        checked by their own ops (dense, xent), the update by sgd's."""
        step, model = self._step_fn(provider, x, y, seed)
        return step(), model[0].weight.detach()

    def callables(self, mode: str, provider: str, x, y, seed, _):
        return self._step_fn(provider, x, y, seed)[0], lambda: self._checked_step(provider, x, y, seed)

    def reference(self, x, y, seed, _) -> dict[str, tuple[torch.Tensor, ...]]:
        return {"fwd+bwd": self._checked_step("torch", x.to(torch.float64), y, seed)}


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    return [Case(batch, width, dtype) for dtype in dtypes for batch, width in PRESETS[preset]]


steps = dense.steps


run = dense.run
