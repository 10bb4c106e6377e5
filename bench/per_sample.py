"""Benchmark of per-sample gradients (op per_sample): torch.func.vmap(torch.func.grad(loss)) over a batch.

The 4-layer MLP of bench/mlp_step.py (width W, ReLU between the layers, cross-entropy over W classes): one
call computes the loss's gradient for each of the B samples apart, every parameter's (B, *shape) stack, as
DP-SGD's clipping needs.

Providers: torch = nn.Linear + nn.ReLU and F.cross_entropy through torch.func (vmap turns each sample's
weight gradient into a batched product); gpunn = the same model through gpunn.convert (ReLU fused into
gpunn.Linear) and gpunn.functional.cross_entropy through the same torch.func call, where gpunn folds the
samples: each kernel runs once for the whole batch, the weight-gradient kernels summing each sample's rows
apart. Mode fwd+bwd is one call. FLOPs, per layer in units of B W^2: forward 2, input gradient 2, the
per-sample weight gradients 2 (a product over one row each). Bytes, the least the call moves: the
per-sample gradients written, B (W^2 + W) per layer; the weights and activations are small beside them.
Accuracy: each parameter's per-sample gradients, as one (B, *shape) stack, against the float64 torch
model's (the relative norm error of the stack; the worst parameter's is reported).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import harness, mlp_step

NOTES = [
    "per_sample: mlp_step's 4 layers with ReLU, cross-entropy; one call = torch.func.vmap(torch.func.grad(loss)) "
    "over the batch's samples; torch = nn.Linear + F.cross_entropy; gpunn = gpunn.convert of it + "
    "gpunn.functional.cross_entropy (the samples fold: one launch a kernel for the batch). GB/s counts the "
    "per-sample gradients written.",
]

# (batch, width): many samples of a narrow model, and few of a wide one; the per-sample gradients are
# 268M elements in both.
PRESETS = {"smoke": [(5, 24)], "quick": [(1024, 256), (64, 1024)], "full": [(1024, 256), (64, 1024), (256, 1024)]}


def per_sample_gradients(model: torch.nn.Module, loss) -> callable:
    """f(x (B, W), y (B,)) -> per-sample gradients of loss(model(x_i), y_i): a tuple in
    model.named_parameters() order, each (B, *parameter shape)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def sample_loss(params, x, y):
        return loss(torch.func.functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    gradients = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))

    def call(x, y):
        grads = gradients(params, x, y)
        return tuple(grads[name] for name in params)

    return call


@dataclass(frozen=True)
class Case(mlp_step.Case):
    op = "per_sample"

    def flops(self, mode: str) -> float:
        return 6 * self.batch * self.width * self.width * mlp_step.LAYERS

    def bytes(self, mode: str) -> float:
        return self.batch * (self.width ** 2 + self.width) * mlp_step.LAYERS * harness.DTYPES[self.dtype].itemsize

    def _gradients_fn(self, provider: str, x, y, seed: int):
        model = mlp_step.model_of(provider, self, x.dtype, x.device, seed)
        gradients = per_sample_gradients(model, mlp_step.criterion(provider))
        return lambda: gradients(x, y)

    def callables(self, mode: str, provider: str, x, y, seed, _):
        run = self._gradients_fn(provider, x, y, seed)
        return run, run

    def reference(self, x, y, seed, _) -> dict[str, tuple[torch.Tensor, ...]]:
        return {"fwd+bwd": self._gradients_fn("torch", x.to(torch.float64), y, seed)()}


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    return [Case(batch, width, dtype) for dtype in dtypes for batch, width in PRESETS[preset]]


steps, run = mlp_step.steps, mlp_step.run
