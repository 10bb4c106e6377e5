"""GPU probe: how much of the cross-entropy and SGD benchmark times is the kernel, and how much the host.

python -m bench's numbers come from do_bench, which flushes the L2 before each call, so every call starts
on an idle GPU and its host time before the first launch (gpunn's checks, the target check's device sync,
a table built per step) counts as GPU time. At the quick benchmark's shapes (xent: 8192 x 32768 bf16;
sgd: 100M fp32 parameters in 1M-element tensors, momentum and weight decay) this prints, for each call:
- do_bench: what the benchmark measures;
- back to back: CALLS calls queued between two CUDA events, so the host runs ahead of the GPU and the
  time is the GPU's (unless the host is the slower one: compare with the host column);
- host: wall clock of a call before any synchronisation.
Each with GB/s against the fewest bytes (xent forward: the logits once; backward: read and write them;
sgd: 5 accesses a parameter), and the copy ceiling measured here.

    python -m bench.probes.kernel_alone      (GPU only)
"""
import time

import torch

import gpunn.functional as F
import gpunn.losses
import gpunn.optim
from gpunn.kernels import losses

from .. import harness

CALLS = 20


def back_to_back_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(CALLS):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / CALLS * 1e3


def host_us(fn) -> float:
    torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    host = time.perf_counter() - begin
    torch.cuda.synchronize()
    return host * 1e6


def report(name: str, fn, nbytes: float, ceiling_gbps: float) -> None:
    fn()
    bench = harness.time_ms(fn, torch.device("cuda"), warmup_ms=25, rep_ms=200).p50 * 1e3
    queued = back_to_back_us(fn)
    host = min(host_us(fn) for _ in range(5))
    cells = " ".join(f"{label} {us:8.1f} us {nbytes / us / 1e3:6.0f} GB/s ({nbytes / us / 1e3 / ceiling_gbps:4.0%})"
                     for label, us in (("do_bench", bench), ("back to back", queued)))
    print(f"{name:34s} {cells}  host {host:7.1f} us", flush=True)


def main() -> None:
    device = torch.device("cuda")
    ceilings = harness.measure_ceilings(device, smoke=False)
    copy = ceilings.copy_gbps
    print(f"{torch.cuda.get_device_name(0)}: copy ceiling {copy:.0f} GB/s")

    rows, classes = 8192, 32768
    x = torch.randn(rows, classes, device=device, dtype=torch.bfloat16)
    target = torch.randint(0, classes, (rows,), device=device)
    logits = x.element_size() * x.numel()
    report("xent forward (F.cross_entropy)", lambda: F.cross_entropy(x, target), logits, copy)
    report("xent target check alone", lambda: gpunn.losses.check_targets(target, classes, -100), 0, copy)
    report("xent forward kernel + loss",
           lambda: losses.reduced_loss(*losses.cross_entropy_forward(x, target, None, -100, 0.0)[:2], x.dtype, "sum_b"),
           logits, copy)
    xg = x.detach().requires_grad_()
    loss = F.cross_entropy(xg, target)
    report("xent backward (autograd.grad)", lambda: torch.autograd.grad(loss, xg, retain_graph=True), 2 * logits,
           copy)

    params = [torch.nn.Parameter(torch.randn(1_000_000, device=device)) for _ in range(100)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = gpunn.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    optimizer.step()  # the momentum buffers exist from here, as in the benchmark
    report("sgd step, 100 x 1M fp32", optimizer.step, 5 * 4 * 100_000_000, copy)
    torch_optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    torch_optimizer.step()
    report("torch sgd step (foreach), same", torch_optimizer.step, 5 * 4 * 100_000_000, copy)


if __name__ == "__main__":
    main()
