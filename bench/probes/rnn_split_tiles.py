"""GPU probe: the column-split RNN (hidden sizes past the resident limit) at the issue's large case, 256 steps,
batch 64, hidden 1024, bf16, forward and backward through time, for each (BLOCK_B, BLOCK_N, BLOCK_K) tile and
the grid it gets (at most one program an SM), beside split_tiles' own choice and cuDNN's forward. Some of
these tiles spilled in the sm_90 compile report (see SPLIT_TILES); they are timed anyway.

    python -m bench.probes.rnn_split_tiles    (STEPS=3 BATCH=20 HIDDEN=40 TRITON_INTERPRET=1: on the CPU, untimed)

Each line: the tile, the grid, forward and backward (one layer, one direction) in us a step, median of
triton.testing.do_bench. A tile that fails to compile or launch prints its error and the sweep goes on.
"""
import itertools
import os

import torch

import gpunn.functional as F
from gpunn.kernels import rnn_sequence
from gpunn.kernels.runtime import cdiv

from .. import harness

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS, BATCH, HIDDEN = (int(os.environ.get(name, default)) for name, default in
                        (("STEPS", 256), ("BATCH", 64), ("HIDDEN", 1024)))


def bench_us(fn) -> float:
    """Median us of fn (the harness's do_bench on CUDA; on the CPU one untimed call)."""
    if DEVICE == "cpu":
        fn()
        return 0.0
    return harness.time_ms(fn, torch.device(DEVICE), warmup_ms=5, rep_ms=50).p50 * 1e3


def per_step(forward, backward) -> str:
    return f"forward {forward / STEPS:7.2f} us/step, backward {backward / STEPS:7.2f} us/step"


def main() -> None:
    torch.manual_seed(0)
    if DEVICE == "cpu":
        rnn_sequence.RESIDENT_BYTES = 0  # the split path at the small sizes the interpreter can run
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x = torch.randn(STEPS, BATCH, HIDDEN, device=DEVICE, dtype=dtype, requires_grad=True)
    h0 = torch.zeros(1, BATCH, HIDDEN, device=DEVICE, dtype=dtype)
    weights = [(torch.randn(*shape, device=DEVICE, dtype=dtype) * HIDDEN ** -0.5).requires_grad_()
               for shape in ((HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN,), (HIDDEN,))]
    dy = torch.randn(STEPS, BATCH, HIDDEN, device=DEVICE, dtype=dtype)

    def measure() -> str:
        y = F.rnn(x, h0, weights)[0]
        backward = bench_us(lambda: torch.autograd.grad(y, [x, *weights], dy, retain_graph=True))
        return per_step(bench_us(lambda: F.rnn(x, h0, weights)), backward)

    print(f"rnn {STEPS} steps, batch {BATCH}, hidden {HIDDEN}, {dtype}, {DEVICE}")
    if DEVICE == "cuda":
        with torch.no_grad():
            w_ih, w_hh, b_ih, b_hh = weights
            cudnn = bench_us(lambda: torch.rnn_tanh(x, h0, [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False,
                                                     False, False))
        print(f"cuDNN forward: {cudnn / STEPS:7.2f} us/step")
    chosen = rnn_sequence.split_tiles
    print(f"split_tiles' choice {chosen(HIDDEN, BATCH, dtype, x.device)}: {measure()}")
    for block_b, block_n, block_k, warps in itertools.product((16, 32, 64), (16, 32, 64), (32, 64, 128), (4, 8)):
        def tiles(hidden, batch, dtype, device, block_b=block_b, block_n=block_n, block_k=block_k, warps=warps):
            sms = rnn_sequence._sm_count(device)
            columns = cdiv(hidden, block_n)
            grid = (max(1, min(cdiv(batch, block_b), sms // columns)), columns)
            return grid, dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                              num_stages=rnn_sequence.SPLIT_STAGES)

        rnn_sequence.split_tiles = tiles
        label = f"BLOCK_B {block_b:2} BLOCK_N {block_n:2} BLOCK_K {block_k:2} warps {warps}, grid " \
                f"{tiles(HIDDEN, BATCH, dtype, x.device)[0]}"
        try:
            print(f"{label}: {measure()}")
        except Exception as error:  # noqa: BLE001 - one tile's failure must not end the sweep
            print(f"{label}: {type(error).__name__}: {str(error)[:200]}")
        finally:
            rnn_sequence.split_tiles = chosen


if __name__ == "__main__":
    main()
