"""Each dense kernel timed alone beside the cuBLAS GEMM of the same shape, with the configs its autotuner
timed and the one it kept: which kernel (forward, grad_input, grad_weight) and which config fall short;
and the backward's elementwise pass (dz = dy * act'(z) and db) in GB/s of the bytes it must move.

    python -m bench.dense_kernels [--shapes 4096x4096x4096,16x4096x4096] [--activations none,relu,gelu]

Needs a CUDA device. Shapes are MxNxK (x is MxK, the weight NxK), bf16.
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dense_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096x4096,16x4096x4096,64x4096x4096")
    parser.add_argument("--activations", default="none,relu,gelu")
    args = parser.parse_args(argv)

    import torch
    import triton

    from gpunn.kernels import activations, dense
    from gpunn.kernels.runtime import Rows

    def ms(fn):
        return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]

    # Host time per call: tiny launches back to back, so the GPU waits on Python rather than the reverse.
    import time
    xs, ws = torch.randn(16, 64, device="cuda"), torch.randn(64, 64, device="cuda")
    for label, fn in [("gpunn forward", lambda: dense.forward(Rows.of(xs), ws, None, None, 0.01, False)),
                      ("F.linear", lambda: torch.nn.functional.linear(xs, ws))]:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        print(f"host time per call, {label}: {(time.perf_counter() - start) / 200 * 1e6:.1f} us", flush=True)

    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.split("x"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
        w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
        b = torch.randn(n, device="cuda", generator=gen).bfloat16()
        dy = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
        gemm = 2 * m * n * k
        cublas = {"forward": ms(lambda: x @ w.t()), "grad_input": ms(lambda: dy @ w),
                  "grad_weight": ms(lambda: dy.t() @ x)}
        def report(label: str, kernel: str, t: float, tuner) -> None:
            print(f"{shape} {label:28s} {t * 1e3:8.1f} us {gemm / t / 1e9:6.1f} TFLOP/s "
                  f"{n * k * 2 / t / 1e6:7.1f} GB/s(W)  cuBLAS {cublas[kernel] * 1e3:8.1f} us  "
                  f"best {tuner.best_config}", flush=True)
            for config, timing in sorted(getattr(tuner, "configs_timings", {}).items(), key=lambda kv: kv[1][0]):
                print(f"      {timing[0] * 1e3:8.1f} us  {config}")

        for name in args.activations.split(","):
            act = None if name == "none" else name
            report(f"{name:5s} forward", "forward", ms(lambda: dense.forward(Rows.of(x), w, b, act, 0.01, False)),
                   dense.dense_forward_kernel.autotuner)
        if m < 256:
            continue
        # The gradient GEMMs take dz whatever the activation: one timing each.
        report("grad_input", "grad_input", ms(lambda: dense.grad_input(Rows.of(dy), w)),
               dense.dense_grad_input_kernel.autotuner)
        report("grad_weight", "grad_weight", ms(lambda: dense.grad_weight(Rows.of(dy), Rows.of(x), (n, k))),
               dense.dense_grad_weight_kernel.autotuner)
        for name in args.activations.split(","):
            act = None if name == "none" else name
            source = activations.grad_source(act)
            y, g = dense.forward(Rows.of(x), w, b, act, 0.01, source == activations.GRAD_FROM_SAVED.value)
            saved = {activations.GRAD_FROM_OUTPUT.value: y, activations.GRAD_FROM_SAVED.value: g}.get(source)
            write_dz = act is not None
            t = ms(lambda: dense.grad_preactivation(Rows.of(dy), saved, act, write_dz, True))
            moved = m * n * 2 * (1 + (saved is not None) + write_dz) + n * 2  # dy, saved; dz, db
            label = f"{name:5s} grad_preactivation " + ("(dz+db)" if write_dz else "(db)")
            print(f"{shape} {label:28s} {t * 1e3:8.1f} us {moved / t / 1e6:7.1f} GB/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
