"""Benchmark of the fused dense layer, y = act(x W^T + b).

Providers, all run in the same process on the same inputs:
- torch:          F.linear (cuBLAS) followed by the activation as its own op: what eager torch runs.
- torch.compile:  that same eager function through torch.compile (mode default, dynamic=False, so each
                  shape gets static kernels); torch.compile-max-autotune adds mode
                  "max-autotune-no-cudagraphs" (kernel autotuning without CUDA graphs, which would
                  change what a timed call includes).
- gpunn:          gpunn.functional.linear: one Triton kernel forward, two backward.

Modes:
- fwd:      forward on inputs that need no gradient (inference).
- bwd:      backward alone. The forward graph is built once, outside the timed region; each timed call is
            torch.autograd.grad(y, (x, W, b), dy, retain_graph=True).
- fwd+bwd:  a training step of the layer: torch.autograd.grad(f(x, W, b), (x, W, b), dy).
x, W and b all need gradients in bwd and fwd+bwd.

Work model (element size e):
- FLOPs: 2 M N K forward, 4 M N K backward (dx and dW), 6 M N K for both; bias and activation ignored.
- Fewest bytes: fwd reads x (M K), W (N K), b (N) and writes y (M N). bwd reads dy (M N), x, W and the
  one (M N) tensor the activation's derivative needs (none without an activation), and writes dx (M K),
  dW (N K), db (N). fwd+bwd: the sum of both.
Forward cases where the weight is at least half the traffic (M <= N K / (N + K), the small batches whose
time is the weight read) also report that read alone (N K e bytes per call) in GB/s and as a fraction of
the measured copy bandwidth.

Accuracy: every provider's outputs (fwd: y; bwd: dx, dW, db; fwd+bwd: all four) against a float64
reference on float64 copies of the same inputs, as the largest relative norm error.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import gpunn.functional
import gpunn.reference

from . import cost_model, harness
from .harness import Record

OP = "dense"
NEGATIVE_SLOPE = 0.01  # leaky_relu's slope, torch's default
PROVIDERS = ("torch", "torch.compile", "torch.compile-max-autotune", "gpunn")
COMPILE_MODES = {"torch.compile": None, "torch.compile-max-autotune": "max-autotune-no-cudagraphs"}

# (M, N, K) per preset: "fwd" shapes run the forward mode, "grad" shapes run bwd and fwd+bwd.
_SQUARE = lambda n: (n, n, n)  # noqa: E731
PRESETS = {
    # Tiny, for the CPU interpreter: odd sizes and a small batch exercise the masks.
    "smoke": {"fwd": [(64, 64, 64), (16, 64, 64), (33, 70, 50)], "grad": [(64, 64, 64), (33, 70, 50)]},
    # The targets: compute-bound squares, weight-read-bound small batches, training at 4096.
    "quick": {"fwd": [_SQUARE(4096), _SQUARE(8192), (16, 4096, 4096), (64, 4096, 4096)],
              "grad": [_SQUARE(4096)]},
    # The targets plus smaller squares, a larger batch and a Llama-8B-sized MLP (up and down projections).
    "full": {"fwd": [_SQUARE(1024), _SQUARE(2048), _SQUARE(4096), _SQUARE(8192),
                     (16, 4096, 4096), (64, 4096, 4096), (256, 4096, 4096),
                     (8192, 14336, 4096), (8192, 4096, 14336)],
             "grad": [_SQUARE(2048), _SQUARE(4096), _SQUARE(8192), (8192, 14336, 4096), (8192, 4096, 14336)]},
}

NOTES = [
    "dense: torch = F.linear (cuBLAS) then the activation as a separate op; torch.compile = that function "
    "compiled (dynamic=False); gpunn = gpunn.functional.linear (one fused Triton kernel forward).",
    "dense: FLOPs 2MNK fwd, 4MNK bwd, 6MNK fwd+bwd; GB/s counts the fewest bytes the op must move "
    "(bench/dense.py); bwd is backward alone, on a graph built outside the timed region.",
    "dense: inputs x ~ N(0, 1), W and b ~ N(0, 1/K), dy ~ N(0, 1); x, W, b need gradients in bwd and fwd+bwd.",
]



@dataclass(frozen=True)
class Case(harness.CaseBase):
    """One problem: x (M, K), W (N, K), b (N,), an activation, a dtype; grad=True for bwd and fwd+bwd."""

    m: int
    n: int
    k: int
    dtype: str
    activation: str | None
    grad: bool

    @property
    def op(self) -> str:
        return f"{OP}[{self.activation or 'none'}]"

    @property
    def shape(self) -> str:
        return f"{self.m}x{self.n}x{self.k}"

    def flops(self, mode: str) -> float:
        return 2 * self.m * self.n * self.k * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]

    def bytes(self, mode: str) -> float:
        m, n, k = self.m, self.n, self.k
        forward = m * k + n * k + n + m * n
        saved = m * n if self.activation is not None else 0
        backward = (m * n + m * k + n * k + saved) + (m * k + n * k + n)
        elements = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]
        return elements * harness.DTYPES[self.dtype].itemsize

    def weight_bytes(self) -> float:
        return self.n * self.k * harness.DTYPES[self.dtype].itemsize

    def weight_read_bound(self) -> bool:
        """Whether the weight is at least half the forward's traffic (N K >= M K + M N, up to the bias)."""
        return 2 * self.weight_bytes() >= self.bytes("fwd")

    def make_provider(self, name: str, device: torch.device):
        """The callable f(x, w, b) provider `name` benchmarks."""
        return make_provider(name, self.activation)

    def inputs(self, device: torch.device, seed: int):
        """(x, w, b, dy) on device; x, w and b need gradients for bwd and fwd+bwd."""
        return _inputs(self, device, seed)

    def reference(self, x, w, b, dy) -> dict[str, tuple[torch.Tensor, ...]]:
        """Each mode's outputs in float64 from float64 copies of the inputs."""
        return _reference(self, eager(self.activation), x, w, b, dy)


def cases(preset: str, dtypes: list[str], activations: list[str | None]) -> list[Case]:
    """Every case of a preset, ordered by dtype, then forward before gradient shapes, then activation."""
    shapes = PRESETS[preset]
    return [Case(m, n, k, dtype, act, grad)
            for dtype in dtypes
            for grad, key in ((False, "fwd"), (True, "grad"))
            for (m, n, k) in shapes[key]
            for act in activations]


def steps(all_cases: list[Case], providers: list[str]) -> int:
    """How many (case, mode, provider) timings a run makes: the progress counter's total."""
    return sum(len(case.modes_for(provider)) for case in all_cases for provider in providers)


def eager(activation: str | None):
    """A fresh function computing act(F.linear(x, w, b)) with torch ops (gpunn.reference.linear)."""

    def dense_eager(x, w, b):
        return gpunn.reference.linear(x, w, b, activation, NEGATIVE_SLOPE)

    return dense_eager


def make_provider(name: str, activation: str | None):
    """The callable f(x, w, b) a provider benchmarks."""
    return provider(name, lambda x, w, b: gpunn.functional.linear(x, w, b, activation, NEGATIVE_SLOPE),
                    eager(activation))


def provider(name: str, gpunn_fn, eager_fn, compiled_fn=None):
    """What provider `name` runs for an op: gpunn_fn (gpunn), eager_fn (torch), or compiled_fn (default:
    eager_fn) through torch.compile in the provider's mode (torch.compile, torch.compile-max-autotune)."""
    if name == "gpunn":
        return gpunn_fn
    if name == "torch":
        return eager_fn
    if name in COMPILE_MODES:
        # Dynamo keeps its compiled variants on the function's code object, shared by every closure of one
        # function: without a reset, the shapes and dtypes of a sweep pile up until they pass its recompile
        # limit, after which it silently runs eager code. One reset per case keeps one variant.
        import torch._dynamo

        torch._dynamo.reset()
        return torch.compile(compiled_fn or eager_fn, mode=COMPILE_MODES[name], dynamic=False)
    raise ValueError(f"unknown provider {name!r}")


def _inputs(case: Case, device: torch.device, seed: int):
    dtype = harness.DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=gen)  # noqa: E731
    scale = case.k ** -0.5  # nn.Linear's weight scale keeps the pre-activation O(1)
    x, w, b, dy = randn(case.m, case.k), randn(case.n, case.k) * scale, randn(case.n) * scale, randn(case.m, case.n)
    for t in (x, w, b):
        t.requires_grad_(case.grad)
    return x, w, b, dy


def _reference(case: Case, function, x, w, b, dy) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each mode's outputs of function(x, w, b) in float64 from float64 copies of the same inputs (on the
    same device)."""
    xd, wd, bd = (t.detach().to(torch.float64).requires_grad_(case.grad) for t in (x, w, b))
    with torch.enable_grad():
        y = function(xd, wd, bd)
    if not case.grad:
        return {"fwd": (y,)}
    grads = torch.autograd.grad(y, (xd, wd, bd), dy.to(torch.float64))
    return {"bwd": grads, "fwd+bwd": (y.detach(), *grads)}


def callables(mode: str, f, x, w, b, dy):
    """(run, check) for one mode: run is what gets timed, check returns the outputs compared for accuracy."""
    inputs = (x, w, b)
    if mode == "fwd":
        run = lambda: f(x, w, b)  # noqa: E731
        return run, lambda: (run(),)
    if mode == "bwd":
        y = f(x, w, b)  # built once, untimed; every timed call walks back through this graph

        def run_backward():
            return torch.autograd.grad(y, inputs, dy, retain_graph=True)

        return run_backward, run_backward

    def run_step():
        return torch.autograd.grad(f(x, w, b), inputs, dy)

    def check_step():
        y = f(x, w, b)
        return (y, *torch.autograd.grad(y, inputs, dy))

    return run_step, check_step


def measure(case: Case, mode: str, provider: str, run, check, ref, device, ceilings: harness.Ceilings,
             warmup_calls: int) -> tuple[list[Record], str]:
    """Warm up, check accuracy, measure peak memory, time; the records and a one-line progress label."""
    start = time.perf_counter()
    for _ in range(warmup_calls):  # the first call autotunes (gpunn) or compiles (torch.compile)
        run()
    harness.synchronize(device)
    warm_s = time.perf_counter() - start
    err = harness.rel_err(check(), ref)
    peak = harness.peak_memory_mib(run, device)
    timing = harness.time_ms(run, device)

    def rec(metric, p50, p20=None, p80=None):
        return Record(case.op, provider, mode, case.shape, case.dtype, metric, p50, p20, p80)

    tflops = harness.throughput(case.flops(mode), timing, 1e12)
    gbps = harness.throughput(case.bytes(mode), timing, 1e9)
    records = [rec("ms", timing.p50, timing.p20, timing.p80), rec("tflops", *tflops), rec("gbps", *gbps),
               rec("frac_matmul_ceiling", tflops[0] / ceilings.matmul_tflops),
               rec("frac_copy_ceiling", gbps[0] / ceilings.copy_gbps), rec("rel_err", err)]
    if mode == "fwd" and case.weight_read_bound():
        weight = harness.throughput(case.weight_bytes(), timing, 1e9)
        records += [rec("weight_gbps", *weight), rec("weight_frac_copy_ceiling", weight[0] / ceilings.copy_gbps)]
    if peak is not None:
        records.append(rec("peak_mem_mib", peak))
    if provider == "gpunn" and device.type == "cpu":  # the interpreter: count what the kernels do per call
        records += cost_model.measure(case, mode, run)
    verdict = "ok" if harness.passes(case.dtype, err) else f"FAIL (tolerance {harness.TOLERANCE[case.dtype]:g})"
    label = (f"{case.op} {mode} {case.dtype} {case.shape} {provider}: {timing.p50:.4g} ms, "
             f"{tflops[0]:.1f} TFLOP/s, {gbps[0]:.0f} GB/s, rel err {err:.1e} {verdict}, warm-up {warm_s:.1f}s")
    return records, label


def run(all_cases: list[Case], providers: list[str], device: torch.device, ceilings: harness.Ceilings,
        log: harness.Log, progress: harness.Progress) -> tuple[list[Record], list[str]]:
    """Benchmark every case with every provider; returns the records and a list of errors raised.

    A provider that raises (a compile failure, out of memory) is logged and skipped; the run goes on."""
    records: list[Record] = []
    errors: list[str] = []
    warmup_calls = 3 if device.type == "cuda" else 1
    for index, case in enumerate(all_cases):
        x, w, b, dy = case.inputs(device, seed=index)
        ref = case.reference(x, w, b, dy)
        for provider in providers:
            f = None
            try:
                if not case.modes_for(provider):
                    continue
                f = case.make_provider(provider, device)
                for mode in case.modes_for(provider):
                    # A case may bring its own (a loss, an optimizer step); layers use the default.
                    run_fn, check = getattr(case, "callables", callables)(mode, f, x, w, b, dy)
                    new, label = measure(case, mode, provider, run_fn, check, ref[mode], device, ceilings,
                                          warmup_calls)
                    del run_fn, check  # the bwd graph dies here
                    records += new
                    progress.step(label)
            except Exception as exc:  # noqa: BLE001 - one provider's failure must not end a long run
                message = f"{case.op} {case.dtype} {case.shape} {provider}: {type(exc).__name__}: {exc}"
                errors.append(message)
                log(f"ERROR {message}")
            finally:
                del f
                harness.free_memory(device)
        del x, w, b, dy, ref
        harness.free_memory(device)
    return records, errors
