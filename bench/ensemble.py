"""Benchmark of a model ensemble (op ensemble): E members of one MLP run as one, torch.func.vmap over their
stacked parameters (torch.func.stack_module_state's form).

The members are the 4-layer MLP of bench/mlp_step.py (width W, ReLU between the layers, cross-entropy over
W classes), each with its own weights, all on the same batch of B. Mode fwd: every member's output, (E, B,
W). Mode fwd+bwd: every member's parameter gradients of its loss, vmap(grad(loss)) over the members, as an
ensemble's training step computes them.

Providers: torch = nn.Linear + nn.ReLU and F.cross_entropy through torch.func (vmap over the weights turns
each layer into a batched product); gpunn = the same models through gpunn.convert (ReLU fused into
gpunn.Linear) and gpunn.functional.cross_entropy through the same torch.func calls, where gpunn runs every
member in one launch a kernel (the members on the grid's second axis). FLOPs, per layer in units of E B
W^2: forward 2, forward and backward 6. Bytes, a rough model: forward reads each member's weights and
writes its activations once, per layer E (W^2 + B W); backward adds the weights read again, their gradients
written, and the activations and their gradients read and written, E (2 W^2 + 3 B W) more. Accuracy: the
outputs (fwd) or each parameter's gradients of every member, as one (E, *shape) stack (fwd+bwd), against the
float64 torch models' (relative norm errors; the worst is reported).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from . import harness, mlp_step

NOTES = [
    "ensemble: E members of mlp_step's 4-layer MLP (ReLU), stacked (torch.func.stack_module_state) and run by "
    "torch.func.vmap over the stacks on one batch; fwd = every member's output, fwd+bwd = vmap(grad(loss)) "
    "over the members; torch = nn.Linear + F.cross_entropy; gpunn = gpunn.convert of them + "
    "gpunn.functional.cross_entropy (every member in one launch a kernel).",
]

# (members, batch, width): a few members of a mid-size MLP, and many of a small one.
PRESETS = {"smoke": [(3, 6, 20)], "quick": [(8, 256, 512), (64, 256, 128)],
           "full": [(8, 256, 512), (64, 256, 128), (32, 1024, 256)]}


@dataclass(frozen=True)
class Case(mlp_step.Case):
    members: int = 8

    op = "ensemble"

    @property
    def shape(self) -> str:
        return f"{self.members}x{self.batch}x{self.width}x{mlp_step.LAYERS}"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fwd", "fwd+bwd")

    def flops(self, mode: str) -> float:
        return (2 if mode == "fwd" else 6) * self.members * self.batch * self.width ** 2 * mlp_step.LAYERS

    def bytes(self, mode: str) -> float:
        w, b = self.width, self.batch
        per_layer = (w * w + b * w) + (0 if mode == "fwd" else 2 * w * w + 3 * b * w)
        return self.members * mlp_step.LAYERS * per_layer * harness.DTYPES[self.dtype].itemsize

    def _ensemble_fn(self, mode: str, provider: str, x, y, seed: int):
        """The call timed for mode: the members built from seeds seed * 1000 + i, stacked."""
        members = [mlp_step.model_of(provider, self, x.dtype, x.device, seed * 1000 + i) for i in range(self.members)]
        params, _ = torch.func.stack_module_state(members)
        params = {name: p.detach() for name, p in params.items()}
        base = copy.deepcopy(members[0]).to("meta")  # the structure functional_call runs with each member's tensors
        del members
        loss = mlp_step.criterion(provider)

        def forward(params, x):
            return torch.func.functional_call(base, params, (x,))

        if mode == "fwd":
            outputs = torch.func.vmap(forward, in_dims=(0, None))
            return lambda: outputs(params, x)

        gradients = torch.func.vmap(torch.func.grad(lambda params, x, y: loss(forward(params, x), y)),
                                    in_dims=(0, None, None))

        def call():
            grads = gradients(params, x, y)
            return tuple(grads[name] for name in params)

        return call

    def callables(self, mode: str, provider: str, x, y, seed, _):
        run = self._ensemble_fn(mode, provider, x, y, seed)
        return run, run

    def reference(self, x, y, seed, _) -> dict[str, tuple[torch.Tensor, ...]]:
        return {mode: self._ensemble_fn(mode, "torch", x.to(torch.float64), y, seed)() for mode in self.modes}


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    return [Case(batch, width, dtype, members=members) for dtype in dtypes
            for members, batch, width in PRESETS[preset]]


steps, run = mlp_step.steps, mlp_step.run
