"""Benchmark of one RNN cell step (op rnn_cell): h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh).

Providers, all run in the same process on the same inputs:
- torch:          torch.rnn_tanh_cell, what torch.nn.RNNCell calls (two F.linear and the tanh).
- torch.compile:  gpunn.reference.rnn_cell (the same arithmetic in torch ops) through torch.compile
                  (dynamic=False).
- gpunn:          gpunn.functional.rnn_cell: one fused Triton kernel forward, two backward.

Modes as in bench/dense.py (fwd, bwd, fwd+bwd). The case's (x, w, b) are pairs: (x (B, I), h (B, H)),
(W_ih (H, I), W_hh (H, H)), (b_ih (H,), b_hh (H,)); all six need gradients in bwd and fwd+bwd.

Work model (K = I + H): FLOPs 2 B K H forward, twice that backward. Fewest bytes, as the dense layer of
x = [x | h] (B, K) and W = [W_ih | W_hh] (H, K) with two biases: forward reads x, h, the weights and biases
and writes h' (B, H); backward reads dh', h' (tanh's derivative), x, h and the weights, and writes dx, dh and
the weight and bias gradients. Small batches, whose time is the weight read, also report that read alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import gpunn.functional
import gpunn.reference

from . import dense, harness

OP = "rnn_cell"

# (B, I, H) per preset: "fwd" runs the forward mode, "grad" runs bwd and fwd+bwd.
PRESETS = {
    "smoke": {"fwd": [(3, 5, 7), (17, 9, 20)], "grad": [(3, 5, 7)]},
    # The targets: batch 64 at 1024 -> 1024, batch 8 at 256 -> 256 (bound by the weight read).
    "quick": {"fwd": [(64, 1024, 1024), (8, 256, 256)], "grad": [(64, 1024, 1024), (8, 256, 256)]},
    "full": {"fwd": [(64, 1024, 1024), (8, 256, 256), (1, 128, 128), (256, 512, 512)],
             "grad": [(64, 1024, 1024), (8, 256, 256), (256, 512, 512)]},
}

NOTES = [
    "rnn_cell: one tanh step; torch = torch.rnn_tanh_cell (nn.RNNCell's function); torch.compile = "
    "gpunn.reference.rnn_cell compiled; gpunn = gpunn.functional.rnn_cell (one fused kernel forward). FLOPs "
    "2 B (I + H) H fwd; x, h, W_ih, W_hh, b_ih, b_hh all need gradients in bwd and fwd+bwd.",
]


@dataclass(frozen=True)
class Case(harness.CaseBase):
    """One step: x (B, I), h (B, H), W_ih (H, I), W_hh (H, H), b_ih and b_hh (H,), tanh."""

    batch: int
    input_size: int
    hidden: int
    dtype: str
    grad: bool
    activation: str = "tanh"

    @property
    def op(self) -> str:
        return f"{OP}[{self.activation}]"

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.input_size}->{self.hidden}"

    def flops(self, mode: str) -> float:
        forward = 2 * self.batch * (self.input_size + self.hidden) * self.hidden
        return forward * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]

    def bytes(self, mode: str) -> float:
        b, k, h = self.batch, self.input_size + self.hidden, self.hidden
        forward = b * k + h * k + 2 * h + b * h
        backward = (b * h + b * h + b * k + h * k) + (b * k + h * k + 2 * h)
        elements = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]
        return elements * harness.DTYPES[self.dtype].itemsize

    def weight_bytes(self) -> float:
        return self.hidden * (self.input_size + self.hidden) * harness.DTYPES[self.dtype].itemsize

    def weight_read_bound(self) -> bool:
        """Whether the weights are at least half the forward's traffic (as for the dense layer)."""
        return 2 * self.weight_bytes() >= self.bytes("fwd")

    def make_provider(self, name: str, device: torch.device):
        """The callable f(x, h, w_ih, w_hh, b_ih, b_hh) provider `name` benchmarks."""
        return dense.provider(name, gpunn.functional.rnn_cell, torch.rnn_tanh_cell, gpunn.reference.rnn_cell)

    def inputs(self, device: torch.device, seed: int):
        """((x, h), (w_ih, w_hh), (b_ih, b_hh), dh') on device; all six need gradients for bwd and fwd+bwd."""
        dtype = harness.DTYPES[self.dtype]
        gen = torch.Generator(device=device).manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=gen)  # noqa: E731
        scale = self.hidden ** -0.5  # nn.RNNCell's init range, as a normal's scale
        x, h = randn(self.batch, self.input_size), randn(self.batch, self.hidden).tanh()  # h: a previous output
        w = randn(self.hidden, self.input_size) * scale, randn(self.hidden, self.hidden) * scale
        b = randn(self.hidden) * scale, randn(self.hidden) * scale
        for t in (x, h, *w, *b):
            t.requires_grad_(self.grad)
        return (x, h), w, b, randn(self.batch, self.hidden)

    def callables(self, mode: str, f, x, w, b, dy):
        """(run, check) for one mode, as bench/dense.py's callables over the six tensors of the step."""
        inputs = (*x, *w, *b)
        if mode == "fwd":
            run = lambda: f(*inputs)  # noqa: E731
            return run, lambda: (run(),)
        if mode == "bwd":
            y = f(*inputs)  # built once, untimed; every timed call walks back through this graph

            def run_backward():
                return torch.autograd.grad(y, inputs, dy, retain_graph=True)

            return run_backward, run_backward

        def check_step():
            y = f(*inputs)
            return (y, *torch.autograd.grad(y, inputs, dy))

        return (lambda: torch.autograd.grad(f(*inputs), inputs, dy)), check_step

    def reference(self, x, w, b, dy) -> dict[str, tuple[torch.Tensor, ...]]:
        """Each mode's outputs of torch.rnn_tanh_cell in float64 from float64 copies of the same inputs."""
        x64, w64, b64 = (tuple(t.detach().double().requires_grad_(self.grad) for t in pair) for pair in (x, w, b))
        with torch.enable_grad():
            return {mode: tuple(t.detach() for t in self.callables(mode, torch.rnn_tanh_cell, x64, w64, b64,
                                                                   dy.double())[1]())
                    for mode in self.modes}


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    """Every case of a preset, ordered by dtype, then forward before gradient shapes (activations ignored:
    the benchmark runs tanh)."""
    return [Case(b, i, h, dtype, grad)
            for dtype in dtypes
            for grad, key in ((False, "fwd"), (True, "grad"))
            for (b, i, h) in PRESETS[preset][key]]


steps = dense.steps


run = dense.run
