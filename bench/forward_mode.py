"""Benchmark of forward-mode AD (op forward_mode): torch.func.jvp, and Hessian-vector products as jvp of grad.

jvp[mlp]: the 4-layer MLP of bench/mlp_step.py (width W, GELU between the layers), its output and the output's
directional derivative along one random direction in the input and every parameter (as forward-gradient
training and sensitivity analysis use it). jvp[rnn]: the same for a one-layer tanh RNN (W -> W) over a
batch of sequences of T steps, its output sequence. hvp[mlp]: the Hessian of the MLP's cross-entropy (W
classes) in its parameters times a random direction, torch.func.jvp(torch.func.grad(loss)) (forward over
reverse, the form torch.func's documentation recommends). GELU, not ReLU: its second derivative is not zero,
so the tangents of the backward take their full path.

Providers: torch = torch's layers through the same torch.func call (nn.Linear + nn.GELU, F.cross_entropy;
for the RNN, whose cuDNN kernel has no forward-mode formula, the same parameters a step at a time in torch
ops, bench/per_sample.py's StepwiseRNN); gpunn = gpunn.convert of the MLP (GELU fused into gpunn.Linear),
gpunn.functional.cross_entropy, gpunn.RNN. Mode fwd is one jvp call; fwd+bwd one Hessian-vector product.

FLOPs, the work the call needs, in units of B W^2 a layer: jvp[mlp] forward 2, the tangent x' W^T + x W'^T 4;
hvp[mlp] forward 2, its tangent 4, the gradients dx and dW 4, their tangents dx' = dz' W + dz W' and
dW' = dz'^T x + dz^T x' 8, less what the first layer (whose input is a constant) does not need: x' W^T, dz^T
x', dx and dx' (10): 18 L - 10 in all. jvp[rnn], in units of T B W^2: forward 4, the tangent 8. Not counted,
gpunn's extra work in hvp: the backward's tangent recomputes z and z' (the output's tangent had them) and
forms the first layer's terms its input does not need. Bytes, a rough model, not a minimum: jvp[mlp] per
layer the weight and its tangent read (2 W^2), the activation and its tangent written and read (4 B W);
hvp[mlp] per layer the weight and its tangent read twice and the product written (5 W^2), 8 B W of
activations and their tangents and gradients; jvp[rnn] the weights and their tangents (4 W^2), x, x', the
output and its tangent (4 T B W).
Accuracy, against the float64 torch model's (relative norm errors): the output and its tangent (jvp; the worse
is reported); the Hessian-vector product as one vector over every parameter (hvp; harness.as_one_vector:
in bf16 at the quick shape torch's own product is 6.6e-3 from float64 as one vector, 1.5-1.8e-2 in the
biases' blocks, sums over the batch of terms that largely cancel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import gpunn

from . import harness, mlp_step
from .harness import as_one_vector
from .per_sample import StepwiseRNN

NOTES = [
    "forward_mode: torch.func over torch's layers and gpunn's; jvp[mlp] = torch.func.jvp of mlp_step's 4 layers "
    "with GELU along a random direction in the input and every parameter (output and its tangent); jvp[rnn] = "
    "the same for one tanh RNN layer's output sequence (torch = its parameters a step at a time in torch ops: "
    "cuDNN's RNN has no forward-mode formula); hvp[mlp] = Hessian-vector product of the MLP's cross-entropy "
    "in its parameters, torch.func.jvp(torch.func.grad(loss)). gpunn = gpunn.convert of the MLP, "
    "gpunn.functional.cross_entropy, gpunn.RNN.",
]

PRESETS = {"smoke": [(16, 32)], "quick": [(1024, 4096)], "full": [(1024, 4096), (4096, 4096)]}  # (batch, width)
# (batch, steps, width) of the RNN: bench/rnn.py's larger target, and its smaller one.
RNN_PRESETS = {"smoke": [(3, 5, 12)], "quick": [(64, 256, 1024)], "full": [(64, 256, 1024), (8, 512, 256)]}


def random_direction(tensors: dict[str, torch.Tensor], case_dtype: str, dtype: torch.dtype,
                     seed: int) -> dict[str, torch.Tensor]:
    """A seeded random tangent for each tensor (made in the case's dtype, then cast to dtype, so that a float64
    reference moves along the same rounded direction)."""
    gen = torch.Generator(device=next(iter(tensors.values())).device).manual_seed(seed + 7919)
    return {name: torch.randn(t.shape, device=t.device, generator=gen, dtype=harness.DTYPES[case_dtype]).to(dtype)
            for name, t in tensors.items()}


@dataclass(frozen=True)
class Case(mlp_step.Case):
    op = "jvp[mlp]"
    LAYER_ACTIVATION: ClassVar[type] = torch.nn.GELU

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd",)

    def flops(self, mode: str) -> float:
        return 6 * self.batch * self.width ** 2 * mlp_step.LAYERS

    def bytes(self, mode: str) -> float:
        per_layer = 2 * self.width ** 2 + 4 * self.batch * self.width
        return mlp_step.LAYERS * per_layer * harness.DTYPES[self.dtype].itemsize

    def model(self, provider: str, x: torch.Tensor, seed: int) -> torch.nn.Module:
        """A fresh model of the case for provider, in x's dtype (seeded init made in the case's dtype)."""
        return mlp_step.model_of(provider, self, x.dtype, x.device, seed)

    def _call_fn(self, provider: str, x, y, seed: int):
        """The call timed: (output, its tangent) of torch.func.jvp over the input and every parameter."""
        model = self.model(provider, x, seed)
        params = {name: p.detach() for name, p in model.named_parameters()}
        tangents = random_direction({**params, "": x}, self.dtype, x.dtype, seed)
        x_tangent = tangents.pop("")

        def forward(params, x):
            return torch.func.functional_call(model, params, (x,))

        return lambda: torch.func.jvp(forward, (params, x), (tangents, x_tangent))

    def callables(self, mode: str, provider: str, x, y, seed, _):
        run = self._call_fn(provider, x, y, seed)
        return run, run

    def reference(self, x, y, seed, _) -> dict[str, tuple[torch.Tensor, ...]]:
        return {mode: tuple(self._call_fn("torch", x.to(torch.float64), y, seed)()) for mode in self.modes}


@dataclass(frozen=True)
class HvpCase(Case):
    op = "hvp[mlp]"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd+bwd",)

    def flops(self, mode: str) -> float:
        return (18 * mlp_step.LAYERS - 10) * self.batch * self.width ** 2

    def bytes(self, mode: str) -> float:
        per_layer = 5 * self.width ** 2 + 8 * self.batch * self.width
        return mlp_step.LAYERS * per_layer * harness.DTYPES[self.dtype].itemsize

    def _call_fn(self, provider: str, x, y, seed: int):
        """The call timed: every parameter's Hessian-vector product, jvp(grad(loss)) along a random direction."""
        model = self.model(provider, x, seed)
        params = {name: p.detach() for name, p in model.named_parameters()}
        direction = random_direction(params, self.dtype, x.dtype, seed)
        criterion = mlp_step.criterion(provider)

        def loss(params):
            return criterion(torch.func.functional_call(model, params, (x,)), y)

        def call():
            _, products = torch.func.jvp(torch.func.grad(loss), (params,), (direction,))
            return tuple(products[name] for name in params)

        return call

    def callables(self, mode: str, provider: str, x, y, seed, _):
        run = self._call_fn(provider, x, y, seed)
        return run, lambda: (as_one_vector(run()),)

    def reference(self, x, y, seed, _) -> dict[str, tuple[torch.Tensor, ...]]:
        return {mode: (as_one_vector(self._call_fn("torch", x.to(torch.float64), y, seed)()),) for mode in self.modes}


@dataclass(frozen=True)
class RnnCase(Case):
    steps: int = 64

    op = "jvp[rnn]"

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.steps}x{self.width}"

    def flops(self, mode: str) -> float:
        return 12 * self.batch * self.steps * self.width ** 2

    def bytes(self, mode: str) -> float:
        return (4 * self.width ** 2 + 4 * self.batch * self.steps * self.width) * harness.DTYPES[self.dtype].itemsize

    def inputs(self, device: torch.device, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(self.batch, self.steps, self.width, device=device, generator=gen)
        return x.to(harness.DTYPES[self.dtype]), None, seed, None

    def model(self, provider: str, x: torch.Tensor, seed: int) -> torch.nn.Module:
        """A fresh one-layer tanh RNN (batch_first) returning its output sequence, in x's dtype."""
        torch.manual_seed(seed)
        kind = gpunn.RNN if provider == "gpunn" else StepwiseRNN
        rnn = kind(self.width, self.width, batch_first=True, device=x.device, dtype=harness.DTYPES[self.dtype])
        return OutputSequence(rnn.to(x.dtype))


class OutputSequence(torch.nn.Module):
    """An RNN's output sequence (B, T, H), without its last state."""

    def __init__(self, rnn: torch.nn.RNN):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    return ([kind(batch, width, dtype) for dtype in dtypes for batch, width in PRESETS[preset]
             for kind in (Case, HvpCase)]
            + [RnnCase(batch, width, dtype, steps=steps) for dtype in dtypes
               for batch, steps, width in RNN_PRESETS[preset]])


steps, run = mlp_step.steps, mlp_step.run
