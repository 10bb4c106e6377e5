"""Benchmark of the sequence RNN (gpunn.functional.rnn, one layer, one direction, tanh).

Providers, all run in the same process on the same inputs:
- torch:  torch.rnn_tanh, torch.nn.RNN's function (cuDNN on CUDA; the weights arrive as views, so torch
          packs them into cuDNN's buffer each call: a weight-sized copy, small beside the sequence).
- gpunn:  gpunn.functional.rnn: the input projection as one GEMM, then the recurrence (kernels/rnn_sequence.py:
          W_hh on chip, or past the resident limit the columns of h_t split across the GPU with a grid
          barrier a step, in one launch at the benchmark's sizes).
torch.compile is not run: inductor does not lower RNNs (it calls the same cuDNN kernels).

The case's (x, w, b) are x (T, B, I), w = [W_ih | W_hh] (H, I + H) and b = [b_ih; b_hh] (2, H); both providers
take W_ih, W_hh and the biases as views of them, so gradients are timed for the same tensors. h0 is zeros.

Work model: FLOPs 2 T B H (I + H) forward, twice that backward. Fewest bytes: forward reads x and the
weights and writes the output (T, B, H); backward reads dy, x and the output, writes dx and the weight
gradients. Per step: us_per_step = time / T; arith_fraction = (FLOPs at the measured bf16 matmul ceiling) /
time, the share of a step that arithmetic could account for (the rest is latency: launches, syncs, the
step-to-step dependency).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

import gpunn.functional

from . import dense, harness
from .harness import Record

OP = "rnn"

# (T, B, I, H) per preset: "fwd" runs the forward mode, "grad" runs bwd and fwd+bwd.
PRESETS = {
    "smoke": {"fwd": [(5, 3, 4, 8), (3, 17, 9, 20)], "grad": [(5, 3, 4, 8)]},
    # The targets: hidden 256, batch 8, 512 steps; hidden 1024, batch 64, 256 steps.
    "quick": {"fwd": [(512, 8, 256, 256), (256, 64, 1024, 1024)], "grad": [(512, 8, 256, 256), (256, 64, 1024, 1024)]},
    "full": {"fwd": [(512, 8, 256, 256), (256, 64, 1024, 1024), (512, 1, 128, 128), (128, 256, 512, 512)],
             "grad": [(512, 8, 256, 256), (256, 64, 1024, 1024), (128, 256, 512, 512)]},
}

NOTES = [
    "rnn: one layer, one direction, tanh; torch = torch.rnn_tanh (cuDNN); gpunn = gpunn.functional.rnn. "
    "us_per_step = time / steps; arith_fraction = (FLOPs / measured bf16 matmul ceiling) / time.",
]


@dataclass(frozen=True)
class Case(harness.CaseBase):
    """One problem: a sequence of `steps` steps of `batch` rows of `input_size` features, hidden size `hidden`."""

    steps: int
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
        return f"{self.steps}x{self.batch}x{self.input_size}->{self.hidden}"

    def flops(self, mode: str) -> float:
        forward = 2 * self.steps * self.batch * self.hidden * (self.input_size + self.hidden)
        return forward * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]

    def bytes(self, mode: str) -> float:
        x, y = self.steps * self.batch * self.input_size, self.steps * self.batch * self.hidden
        weights = self.hidden * (self.input_size + self.hidden + 2)
        forward = x + weights + y
        backward = (y + x + y + weights) + (x + weights)
        elements = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]
        return elements * harness.DTYPES[self.dtype].itemsize

    def make_provider(self, name: str, device: torch.device):
        h0 = torch.zeros(1, self.batch, self.hidden, device=device, dtype=harness.DTYPES[self.dtype])
        if name == "gpunn":
            return lambda x, w, b: gpunn.functional.rnn(x, h0, self._weights(w, b))[0]
        if name == "torch":
            return _torch_rnn(h0, self._weights)
        raise ValueError(f"unknown provider {name!r}")

    def inputs(self, device: torch.device, seed: int):
        dtype = harness.DTYPES[self.dtype]
        gen = torch.Generator(device=device).manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=gen)  # noqa: E731
        scale = self.hidden ** -0.5  # torch.nn.RNN's init range, as a normal's scale
        x = randn(self.steps, self.batch, self.input_size)
        w = randn(self.hidden, self.input_size + self.hidden) * scale
        b = randn(2, self.hidden) * scale
        dy = randn(self.steps, self.batch, self.hidden)
        for t in (x, w, b):
            t.requires_grad_(self.grad)
        return x, w, b, dy

    def reference(self, x, w, b, dy) -> dict[str, tuple[torch.Tensor, ...]]:
        h0 = torch.zeros(1, self.batch, self.hidden, device=x.device, dtype=torch.float64)
        return dense._reference(self, _torch_rnn(h0, self._weights), x, w, b, dy)

    def _weights(self, w, b):
        """W_ih, W_hh, b_ih, b_hh as views of the case's w and b."""
        return [w[:, :self.input_size], w[:, self.input_size:], b[0], b[1]]


def _torch_rnn(h0, weights):
    def torch_rnn(x, w, b):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "weights are not part of single contiguous chunk": by design here
            # train=True: cuDNN's backward needs it (dropout is 0, so it changes nothing else).
            return torch.rnn_tanh(x, h0.to(x.dtype), [t.contiguous() for t in weights(w, b)], True, 1, 0.0, True,
                                  False, False)[0]

    return torch_rnn


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    """Every case of a preset, ordered by dtype, then forward before gradient shapes (activations ignored:
    the benchmark runs tanh)."""
    return [Case(t, b, i, h, dtype, grad)
            for dtype in dtypes
            for grad, key in ((False, "fwd"), (True, "grad"))
            for (t, b, i, h) in PRESETS[preset][key]]


def steps(all_cases: list[Case], providers: list[str]) -> int:
    return dense.steps(all_cases, [p for p in providers if p in PROVIDERS])


PROVIDERS = ("torch", "gpunn")


def run(all_cases: list[Case], providers: list[str], device: torch.device, ceilings: harness.Ceilings,
        log: harness.Log, progress: harness.Progress) -> tuple[list[Record], list[str]]:
    """bench/dense.py's run over these cases (torch and gpunn), plus each result's time per step and
    arithmetic fraction."""
    records, errors = dense.run(all_cases, [p for p in providers if p in PROVIDERS], device, ceilings, log, progress)
    by_key = {(case.op, case.shape, case.dtype): case for case in all_cases}
    for record in list(records):
        case = by_key.get((record.op, record.shape, record.dtype))
        if record.metric == "ms" and case is not None:
            arithmetic_ms = case.flops(record.mode) / (ceilings.matmul_tflops * 1e12) * 1e3
            records += [Record(record.op, record.provider, record.mode, record.shape, record.dtype, "us_per_step",
                               record.p50 * 1e3 / case.steps),
                        Record(record.op, record.provider, record.mode, record.shape, record.dtype,
                               "arith_fraction", arithmetic_ms / record.p50)]
    return records, errors
