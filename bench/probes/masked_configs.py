"""GPU probe: the masked layer at 4096^3 (bf16, band of 9) per weight block size, each autotuning
config's kernel time (Triton's own timings) beside the time of a whole call, to tell kernel time from
host time. Also a 64 MiB copy and the dense gpunn layer at the same shape.

    python -m bench.probes.masked_configs        (SIZE=128 TRITON_INTERPRET=1 runs it on CPU, untimed)
"""
import os

import torch
import triton

import gpunn.functional as F
from gpunn import masks
from gpunn.kernels import masked

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = int(os.environ.get("SIZE", 4096))


def bench_us(fn) -> float:
    if DEVICE == "cpu":
        fn()
        return 0.0
    return triton.testing.do_bench(fn, warmup=50, rep=300) * 1e3


def print_timings(kernel, indent: str, limit: int = 5) -> None:
    timings = getattr(kernel.autotuner, "configs_timings", None) or {}
    for config, ms in sorted(timings.items(), key=lambda item: item[1][0])[:limit]:
        print(indent, kernel.jit.__name__, config, [round(t * 1e3, 1) for t in ms], "us")
    kernel.clear()


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(SIZE, SIZE, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(SIZE, SIZE, device=DEVICE, dtype=torch.bfloat16) * 0.02
    b = torch.randn(SIZE, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(SIZE, SIZE, device=DEVICE, dtype=torch.bfloat16)
    source = torch.empty(64 * 2**20 if DEVICE == "cuda" else 16, device=DEVICE, dtype=torch.uint8)
    target = torch.empty_like(source)
    print(f"copy 64 MiB: {bench_us(lambda: target.copy_(source)):.1f} us")
    mask = masks.local_1d(SIZE, SIZE, 9).to(DEVICE)
    for block in [(64, 64), (32, 32), (16, 64), (64, 16), (128, 128)]:
        layout = masks.block_layout(mask, torch.bfloat16, block)
        forward_us = bench_us(lambda: F.masked_linear(x, w, layout, b, "relu"))
        print(f"block {block}: visited {layout.visited_blocks}/{layout.dense_blocks} "
              f"(full {int(layout.row_full.sum())}), forward call {forward_us:.1f} us")
        print_timings(masked.masked_forward_kernel, "   ")
        xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
        y = F.masked_linear(xr, wr, layout, br, "relu")
        backward_us = bench_us(lambda: torch.autograd.grad(y, (xr, wr, br), dy, retain_graph=True))
        print(f"    backward call {backward_us:.1f} us")
        print_timings(masked.masked_grad_input_kernel, "     ", 4)
        print_timings(masked.masked_grad_weight_kernel, "     ", 4)
    print(f"dense gpunn forward call: {bench_us(lambda: F.linear(x, w, b, 'relu')):.1f} us")


if __name__ == "__main__":
    main()
