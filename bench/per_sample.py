"""Benchmark of per-sample gradients (op per_sample): torch.func.vmap(torch.func.grad(loss)) over a batch.

per_sample[mlp]: the 4-layer MLP of bench/mlp_step.py (width W, ReLU between the layers, cross-entropy over W
classes). per_sample[rnn]: a one-layer tanh RNN (W -> W) over each sample's sequence of T steps, its last
state the logits of a cross-entropy over W classes. One call computes the loss's gradient for each of the B
samples apart, every parameter's (B, *shape) stack, as DP-SGD's clipping needs.

Providers: torch = torch's layers through torch.func (vmap turns each sample's weight gradient into a
batched product); for the RNN, whose torch.nn.RNN vmap cannot take (its fused kernel has no batching rule),
the same parameters run a step at a time in torch ops (F.linear and tanh per step, as a module without a
fused kernel would). gpunn = the same models through gpunn's layers (gpunn.convert of the MLP, ReLU fused
into gpunn.Linear; gpunn.RNN) and gpunn.functional.cross_entropy through the same torch.func call, where
gpunn folds the samples: each kernel runs once for the whole batch (the RNN's sequences become one call's
batch), the weight-gradient kernels summing each sample's rows apart. Mode fwd+bwd is one call.
FLOPs, in units of B W^2: the MLP per layer forward 2, input gradient 2, per-sample weight gradients 2; the
RNN per step forward 4 (both products), the state's gradient 2, per-sample weight gradients 4. Bytes, the
least the call moves: the per-sample gradients written, B x the parameters; the weights and activations
are small beside them.
Accuracy: each parameter's per-sample gradients, as one (B, *shape) stack, against the float64 torch
model's (the relative norm error of the stack; the worst parameter's is reported).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import gpunn
import gpunn.reference

from . import harness, mlp_step

NOTES = [
    "per_sample: one call = torch.func.vmap(torch.func.grad(loss)) over the batch's samples, cross-entropy; "
    "[mlp] mlp_step's 4 layers with ReLU, torch = nn.Linear, gpunn = gpunn.convert of it; [rnn] one tanh RNN "
    "layer over each sample's sequence, its last state the logits, torch = the same parameters a step at a "
    "time in torch ops (torch.nn.RNN does not take vmap), gpunn = gpunn.RNN. gpunn folds the samples: one "
    "launch a kernel for the batch. GB/s counts the per-sample gradients written.",
]

# (batch, width): many samples of a narrow model, and few of a wide one; the per-sample gradients are
# 268M elements in both.
PRESETS = {"smoke": [(5, 24)], "quick": [(1024, 256), (64, 1024)], "full": [(1024, 256), (64, 1024), (256, 1024)]}
# (batch, steps, width) of the RNN.
RNN_PRESETS = {"smoke": [(4, 5, 12)], "quick": [(256, 64, 256)], "full": [(256, 64, 256), (1024, 32, 128)]}


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
    op = "per_sample[mlp]"

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


class StepwiseRNN(torch.nn.RNN):
    """torch.nn.RNN's parameters (one layer, one direction, with biases; batch_first), its forward a step at a
    time in torch ops (gpunn.reference.rnn_cell): what torch.func.vmap can batch, where torch.nn.RNN's fused
    kernel has no rule."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_layers != 1 or self.bidirectional or not self.bias or not self.batch_first:
            raise ValueError("StepwiseRNN runs one batch_first layer, one direction, with biases")

    def forward(self, x: torch.Tensor, hx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.new_zeros(x.shape[0], self.hidden_size) if hx is None else hx[0]
        states = []
        for t in range(x.shape[1]):
            h = gpunn.reference.rnn_cell(x[:, t], h, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0,
                                         self.bias_hh_l0, "relu" if self.mode == "RNN_RELU" else "tanh")
            states.append(h)
        return torch.stack(states, 1), h.unsqueeze(0)


class LastState(torch.nn.Module):
    """An RNN's last state (the last layer's h_n, (B, H)): the logits of the per-sample loss."""

    def __init__(self, rnn: torch.nn.RNN):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[1][-1]


@dataclass(frozen=True)
class RnnCase(Case):
    steps: int = 64

    op = "per_sample[rnn]"

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.steps}x{self.width}"

    def flops(self, mode: str) -> float:
        return 10 * self.batch * self.steps * self.width ** 2

    def bytes(self, mode: str) -> float:
        return self.batch * 2 * (self.width ** 2 + self.width) * harness.DTYPES[self.dtype].itemsize

    def inputs(self, device: torch.device, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(self.batch, self.steps, self.width, device=device, generator=gen)
        y = torch.randint(0, self.width, (self.batch,), device=device, generator=gen)
        return x.to(harness.DTYPES[self.dtype]), y, seed, None

    def _gradients_fn(self, provider: str, x, y, seed: int):
        """Per-sample gradients of a fresh RNN (seeded init made in the case's dtype, then cast to x's): each
        sample's x (T, W) a batch of one sequence."""
        torch.manual_seed(seed)
        kind = gpunn.RNN if provider == "gpunn" else StepwiseRNN
        rnn = kind(self.width, self.width, batch_first=True, device=x.device, dtype=harness.DTYPES[self.dtype])
        gradients = per_sample_gradients(LastState(rnn.to(x.dtype)), mlp_step.criterion(provider))
        return lambda: gradients(x, y)


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    return ([Case(batch, width, dtype) for dtype in dtypes for batch, width in PRESETS[preset]]
            + [RnnCase(batch, width, dtype, steps=steps) for dtype in dtypes
               for batch, steps, width in RNN_PRESETS[preset]])


steps, run = mlp_step.steps, mlp_step.run
