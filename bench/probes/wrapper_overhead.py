"""CPU probe: the host time gpunn's own Python path adds to a layer call, with the kernel launchers stubbed
(they return empty outputs), so it runs on any machine and measures only the wrappers (functional checks,
the op, autograd). Kernel launch time (Triton's autotuner and launcher) is not included: see
bench/probes/host_overhead.py on a GPU for the whole call.

    python -m bench.probes.wrapper_overhead
"""
import os
import time

os.environ["TRITON_INTERPRET"] = "1"  # the Triton path for CPU tensors (no kernel runs: launchers are stubbed)

import torch  # noqa: E402

import gpunn.functional as F  # noqa: E402
from gpunn.kernels import dense  # noqa: E402

CALLS, REPEATS = 2000, 5


def _stub_launchers() -> None:
    def forward(x, weight, bias, activation, slope, save, out_shape=None):
        derivative = torch.empty(x.m, weight.shape[0]) if save else None
        return torch.empty(out_shape or (x.m, weight.shape[0])), derivative

    def grad_input(dy, saved, weight, activation, slope):
        return torch.empty(dy.m, weight.shape[1])

    def grad_weight(dy, saved, x, shape, activation, slope, bias_grad):
        return (torch.empty(shape) if x is not None else None), (torch.empty(shape[0]) if bias_grad else None)

    dense.forward, dense.grad_input, dense.grad_weight = forward, grad_input, grad_weight


def main() -> None:
    _stub_launchers()
    x, w, b = torch.randn(16, 64), torch.randn(32, 64), torch.randn(32)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))

    def step():
        y = F.linear(xg, wg, bg, "gelu")
        y.backward(torch.ones_like(y))

    cases = {"dense forward, no grad": lambda: F.linear(x, w, b, "relu"), "dense forward + backward": step}
    for name, fn in cases.items():
        for _ in range(200):
            fn()
        best = float("inf")
        for _ in range(REPEATS):
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            best = min(best, (time.perf_counter() - start) / CALLS)
        print(f"{name}: {best * 1e6:.1f} us a call (best of {REPEATS} x {CALLS} calls)")


if __name__ == "__main__":
    main()
