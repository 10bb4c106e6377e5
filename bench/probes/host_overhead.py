"""GPU probe: the host time of one gpunn call (300 calls, kernels warm), and where it goes (cProfile).

Host time per call equal to host+GPU time per call means the host, not the GPU, sets the pace.

    python -m bench.probes.host_overhead
"""
import cProfile
import pstats
import time

import torch

import gpunn.functional as F
from gpunn import masks

CALLS = 300


def main() -> None:
    device = "cuda"
    x = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    w = (torch.randn(4096, 4096, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_()
    b = torch.randn(4096, device=device, dtype=torch.bfloat16).requires_grad_()
    x16 = torch.randn(16, 4096, device=device, dtype=torch.bfloat16)
    dy = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    layout = masks.block_layout(masks.local_1d(4096, 4096, 9).to(device), torch.bfloat16)
    cases = {
        "masked fwd": lambda: F.masked_linear(x, w.detach(), layout, b.detach(), "relu"),
        "dense fwd 16 rows": lambda: F.linear(x16, w.detach(), b.detach(), "relu"),
        "masked fwd+bwd": lambda: torch.autograd.backward(F.masked_linear(x, w, layout, b, "relu"), dy),
    }
    for name, fn in cases.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        host = (time.perf_counter() - start) / CALLS
        torch.cuda.synchronize()
        total = (time.perf_counter() - start) / CALLS
        print(f"== {name}: host {host * 1e6:.1f} us/call, with GPU {total * 1e6:.1f} us/call")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(CALLS):
            fn()
        profile.disable()
        torch.cuda.synchronize()
        pstats.Stats(profile).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
