"""CPU probe: the host time of gpunn's calls without the kernels, beside torch's at the same tiny shapes.

Triton's interpreter is told to run nothing (its launch entry point is stubbed), so everything else runs
as on a GPU: gpunn's checks, ops and autograd glue, its launchers, and Triton's autotuner and heuristics
wrappers. Not included: the compiled path's own launch (Triton's JIT binder and the driver), which only a
GPU has; bench/probes/host_overhead.py measures whole calls there. The interpreter has one config a
kernel, so a launch that goes through Triton's autotuner costs less here than with a GPU's tile table.
torch runs its CPU kernels at shapes (16 x 16) where they take a few microseconds, so its numbers are
mostly host time too.

    python -m bench.probes.wrapper_overhead

Each line: microseconds a call, the best of REPEATS rounds of CALLS calls, gpunn's and torch's rounds
interleaved (this machine's timings drift by tens of percent over seconds).
"""
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # the Triton path for CPU tensors, whose kernels are then stubbed

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import gpunn  # noqa: E402
import gpunn.functional as F  # noqa: E402

CALLS, REPEATS, WIDTH = 500, 7, 16


def _stub_kernels() -> None:
    interpreter.InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None


def _linear_cases() -> dict:
    x = torch.randn(WIDTH, WIDTH)
    w, b = torch.randn(WIDTH, WIDTH, requires_grad=True), torch.randn(WIDTH, requires_grad=True)
    logits, target = torch.randn(WIDTH, WIDTH, requires_grad=True), torch.randint(0, WIDTH, (WIDTH,))

    def forward(linear):
        return lambda: linear(x, w.detach(), b.detach())

    def forward_backward(linear):
        return lambda: linear(x, w, b).backward(torch.ones(WIDTH, WIDTH))

    return {
        "linear + relu forward, no grad": (forward(lambda *a: F.linear(*a, "relu")),
                                           forward(lambda *a: torch.relu(torch.nn.functional.linear(*a)))),
        "linear + relu forward + backward": (forward_backward(lambda *a: F.linear(*a, "relu")),
                                             forward_backward(lambda *a: torch.relu(torch.nn.functional.linear(*a)))),
        "cross-entropy forward + backward": (lambda: F.cross_entropy(logits, target).backward(),
                                             lambda: torch.nn.functional.cross_entropy(logits, target).backward()),
    }


def _training_cases() -> dict:
    params = [torch.randn(WIDTH, WIDTH) for _ in range(6)]
    many = [torch.randn(1000) for _ in range(100)]  # the SGD benchmark's tensor count
    for p in params + many:
        p.grad = torch.randn_like(p)
    mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH),
                              torch.nn.ReLU(), torch.nn.Linear(WIDTH, 10))
    x, target = torch.randn(WIDTH, WIDTH), torch.randint(0, 10, (WIDTH,))

    def step(model, loss_fn, optimizer):
        def run():
            optimizer.zero_grad(set_to_none=False)
            loss_fn(model(x), target).backward()
            optimizer.step()
        return run

    ours = gpunn.convert(mlp)
    return {
        "SGD with momentum, 6 tensors": (gpunn.optim.SGD(params, lr=1e-3, momentum=0.9).step,
                                         torch.optim.SGD(params, lr=1e-3, momentum=0.9).step),
        "SGD with momentum, 100 tensors": (gpunn.optim.SGD(many, lr=1e-3, momentum=0.9).step,
                                           torch.optim.SGD(many, lr=1e-3, momentum=0.9).step),
        "training step, MLP of 3 layers": (
            step(ours, gpunn.CrossEntropyLoss(), gpunn.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9)),
            step(mlp, torch.nn.CrossEntropyLoss(), torch.optim.SGD(mlp.parameters(), lr=1e-3, momentum=0.9))),
    }


def _best_us(fns) -> list[float]:
    for fn in fns:
        for _ in range(50):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(REPEATS):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / CALLS * 1e6)
    return best


def main() -> None:
    _stub_kernels()
    torch.manual_seed(0)
    print(f"{'call (kernels stubbed)':36s} {'gpunn us':>9s} {'torch us':>9s}")
    for name, pair in {**_linear_cases(), **_training_cases()}.items():
        ours, theirs = _best_us(pair)
        print(f"{name:36s} {ours:9.1f} {theirs:9.1f}", flush=True)


if __name__ == "__main__":
    main()
