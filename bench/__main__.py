"""python -m bench: gpunn's kernels against torch eager and torch.compile, with ceilings and accuracy.

This module imports neither torch nor triton at its top level: on a machine without CUDA, Triton's
interpreter has to be selected (TRITON_INTERPRET=1) before triton is first imported, and `--help` should
not wait for torch.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

OPS = ("dense", "masked", "local2d", "local1d", "rnn", "rnn_cell", "xent", "mse", "sgd", "mlp_step", "penalty_step",
       "per_sample", "ensemble", "forward_mode")
ACTIVATIONS = ("none", "relu", "leaky_relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "silu")
DTYPE_CHOICES = ("bf16", "fp16", "fp32", "all")

DESCRIPTION = """\
Benchmark gpunn's fused dense layer (op dense: gpunn.functional.linear, matmul + bias + activation in one
Triton kernel) and its masked block-sparse form (op masked: gpunn.functional.masked_linear) against torch
eager (F.linear through cuBLAS, on the masked weight for masked, then the activation), torch.compile of
that same eager function and, for masked forward on CUDA, torch's BSR sparse path; the locally connected
layers (ops local2d and local1d: gpunn.functional.locally_connected2d / 1d) against F.unfold + einsum
(gpunn.reference) and its torch.compile; the sequence RNN (op rnn: gpunn.functional.rnn, one tanh layer)
against torch.rnn_tanh (cuDNN) without torch.compile (inductor does not lower RNNs); one RNN cell step
(op rnn_cell: gpunn.functional.rnn_cell, tanh) against torch.rnn_tanh_cell (nn.RNNCell's function) and
torch.compile of gpunn.reference.rnn_cell; cross-entropy (op xent) and mean squared error (op mse) against
F.cross_entropy / F.mse_loss and their torch.compile; one SGD step (op sgd) against torch.optim.SGD; and a
whole training step of a 4-layer MLP (op mlp_step: forward, loss, backward, SGD) and of the same MLP as a
critic with a gradient penalty (op penalty_step: double backward through every layer) against eager torch;
and torch.func: per-sample gradients (op per_sample: vmap(grad(loss)) over a batch's samples, of that MLP
with ReLU, per_sample[mlp], and of an RNN over each sample's sequence, per_sample[rnn]) and an ensemble of
the MLP's members (op ensemble: vmap over their stacked weights, forward and every member's gradients)
against the same torch.func calls over torch's layers (for the RNN, its parameters a step at a time in
torch ops: torch.nn.RNN does not take vmap); and forward-mode AD (op forward_mode: torch.func.jvp of that
MLP with GELU, jvp[mlp], and of an RNN's output sequence, jvp[rnn], along a random direction in the input
and every parameter; the MLP's Hessian-vector product as jvp of grad, hvp[mlp]) against the same calls over
torch's layers; all in this process.
Ceilings are measured first (a bf16 matmul for TFLOP/s, a device copy for GB/s); each result reports time
(median of triton.testing.do_bench, with p20/p80), TFLOP/s, GB/s, fractions of the ceilings, peak memory
(CUDA) and its speedup over torch eager; masked results also report the cost per visited block against
the dense gpunn layer (bench/masked.py), rnn results the time per step and its arithmetic fraction.
Every result is checked against a float64 reference (relative norm error; tolerance bf16 1e-2, fp16
3e-3, fp32 1e-3); a result that fails gets no speedup. fp32 matmuls run with TF32 in every provider.

Presets (shapes are MxNxK: x is MxK, the weight NxK):
  --quick   forward 4096^3 and 8192^3, forward 16x4096x4096 and 64x4096x4096 (weight-read bound),
            backward and forward+backward 4096^3. A few minutes on one H100.
            masked: a band of nine (gpunn.masks.local_1d) at 4096 features, batch 4096, all modes.
            local2d: batch 64, 64 -> 64 channels, 32x32, 3x3, padding 1, all modes.
            local1d: batch 64, 64 -> 64 channels, length 1024, kernel 9, padding 4, all modes.
            rnn: 512 steps, batch 8, 256 -> 256; 256 steps, batch 64, 1024 -> 1024; all modes.
            rnn_cell: one step, batch 64, 1024 -> 1024 and batch 8, 256 -> 256; all modes.
            xent: 8192 x 32768 logits, all modes. mse: 8192 x 32768, all modes.
            sgd: 100M parameters (fp32, and --dtype). mlp_step, penalty_step: batch 1024, width 4096.
            per_sample: batch 1024 at width 256, batch 64 at width 1024; the RNN: batch 256, 64 steps,
            width 256. ensemble: 8 members, batch 256, width 512; 64 members, batch 256, width 128.
            forward_mode: the MLP at batch 1024, width 4096 (jvp and hvp); the RNN: batch 64, 256
            steps, width 1024.
  default   the quick shapes plus 1024^3, 2048^3, 256x4096x4096, Llama-8B MLP shapes
            (8192x14336x4096, 8192x4096x14336) forward, and 2048^3, 8192^3 and the MLP shapes backward.
            masked: also batch 16, bands of 33 and 129, a 3x3 neighbourhood on a 64x64 image, 1% and 10%
            random connections, 8192^3.
            local2d: also batch 256, a 5x5 window from 3 channels at 64x64, 128 channels at 16x16.
            local1d: also batch 256, and a window of 33 over length 4096 (16 -> 32 channels).
            rnn: also batch 1 at hidden 128 and batch 256 at hidden 512. rnn_cell: the same two.
            xent: also 4096 x 128256 and 65536 x 1000. mse: also 1024 x 4096 and 16384 x 32768.
            sgd: also 10M parameters. mlp_step, penalty_step: also batch 4096.
            per_sample: also batch 256 at width 1024; the RNN also batch 1024, 32 steps, width 128.
            ensemble: also 32 members, batch 1024, width 256. forward_mode: also the MLP at batch 4096,
            and the RNN at batch 8, 512 steps, width 256.
  --smoke   tiny shapes, to check the harness, accuracy checks and outputs, not performance. Without
            CUDA (or with TRITON_INTERPRET=1 set) it runs on the CPU through Triton's interpreter,
            without torch.compile (its CPU compile is slow), and only --smoke runs there. There it
            also reports a cost model: per gpunn call, the Triton launches, programs, dot FLOPs and
            bytes loaded and stored as the interpreter counts them, beside the op's minimal FLOPs and
            bytes (bench/cost_model.py). The interpreter rounds fp32 to bf16 by truncation, not to
            nearest as GPUs do, so gpunn's bf16 errors there run up to ~3.5x torch's, past the bf16
            tolerance in a few cases: on the CPU --dtype defaults to fp16, the precise check there.
Each dense and masked shape runs with every --activations entry (all: every activation, none included);
every shape with every --dtype.

Writes to --out: bench.csv (long format: op, provider, mode, shape, dtype, metric, p50, p20, p80, gpu,
torch, triton, git_sha, date), bench.md, bench.log (what was printed), and bench_<mode>_<dtype>.png when
matplotlib is installed. The first three are rewritten as each op finishes, so a run stopped early keeps
the ops it finished. Exit status 1 if any provider raised or failed its accuracy check.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the target shapes only (see above)")
    preset.add_argument("--smoke", action="store_true",
                        help="tiny shapes; the CPU interpreter when there is no CUDA device (see above)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="input dtype (default: bf16 on a GPU, fp16 on the CPU: see --smoke)")
    parser.add_argument("--activations", default="relu,gelu", metavar="LIST",
                        help=f"comma-separated, from: {', '.join(ACTIVATIONS)}; or all (default: relu,gelu)")
    parser.add_argument("--only", default=",".join(OPS), metavar="OPS",
                        help=f"comma-separated ops to run, from: {', '.join(OPS)} (default: all)")
    parser.add_argument("--out", default="bench-out", metavar="DIR", help="output directory (default: bench-out)")
    parser.add_argument("--max-autotune", action="store_true",
                        help='also time torch.compile(mode="max-autotune-no-cudagraphs"); compiling takes minutes')
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--skip-providers", default="", metavar="LIST",
                        help="comma-separated providers not to run, e.g. torch.sparse,torch.compile")
    args = parser.parse_args(argv)

    args.activations = [a.strip() for a in args.activations.split(",") if a.strip()]
    if "all" in args.activations:
        args.activations = list(ACTIVATIONS)
    for name in args.activations:
        if name not in ACTIVATIONS:
            parser.error(f"--activations: unknown {name!r}; choose from {', '.join(ACTIVATIONS)}")
    if not args.activations:
        parser.error("--activations: give at least one")
    args.activations = [None if a == "none" else a for a in args.activations]
    args.only = [o.strip() for o in args.only.split(",") if o.strip()]
    for name in args.only:
        if name not in OPS:
            parser.error(f"--only: unknown op {name!r}; choose from {', '.join(OPS)}")
    if not args.only:
        parser.error(f"--only: give at least one op, from {', '.join(OPS)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: a file, not a directory")
    args.skip_providers = {p.strip() for p in args.skip_providers.split(",") if p.strip()}
    args.preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    return args


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def choose_device():
    """CUDA when there is a GPU and Triton's interpreter is not selected; the CPU otherwise, with the
    interpreter selected here if nothing has imported triton yet (it reads the variable on import)."""
    import torch

    if torch.cuda.is_available() and not _interpreting():
        return torch.device("cuda")
    if not _interpreting():
        if "triton" in sys.modules:
            raise SystemExit("error: no CUDA device, and triton was imported before its interpreter could be "
                             "selected; run with TRITON_INTERPRET=1 in the environment")
        os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = choose_device()
    if device.type != "cuda" and not args.smoke:
        print("error: no CUDA device (or TRITON_INTERPRET=1 is set): only --smoke runs here", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp16")
    args.dtypes = ["bf16", "fp16", "fp32"] if dtype == "all" else [dtype]

    import torch

    # These import triton: after choose_device.
    from . import (cost_model, dense, ensemble, forward_mode, harness, local, local1d, masked, mlp_step, mse,
                   penalty_step, per_sample, rnn, rnn_cell, sgd, xent)

    modules = {"dense": dense, "masked": masked, "local2d": local, "local1d": local1d, "rnn": rnn,
               "rnn_cell": rnn_cell, "xent": xent, "mse": mse, "sgd": sgd, "mlp_step": mlp_step,
               "penalty_step": penalty_step, "per_sample": per_sample, "ensemble": ensemble,
               "forward_mode": forward_mode}

    log = harness.Log()
    info = harness.RunInfo.collect(device)

    providers = ["torch", "torch.compile"] + (["torch.compile-max-autotune"] if args.max_autotune else []) + ["gpunn"]
    notes = []
    if device.type == "cuda":
        notes.append("Timing: triton.testing.do_bench after a warm-up that finishes autotuning and compilation; "
                     "median reported, p20/p80 kept; L2 flushed before every timed call.")
        if args.smoke:
            notes.append("Smoke preset: tiny shapes and ceilings; the numbers are not performance results.")
    else:
        notes.append("CPU smoke run through Triton's interpreter: timings, ceilings and ratios are meaningless; "
                     "only the harness, accuracy checks and outputs are exercised. The interpreter truncates fp32 "
                     "to bf16 (GPUs round to nearest): bf16 errors of gpunn's kernels are inflated here.")
    if os.environ.get("GPUNN_AUTOTUNE", "1") == "0":
        notes.append("GPUNN_AUTOTUNE=0 is set: gpunn ran the first config that suits each launch, untuned.")
    if args.no_compile:
        providers = [p for p in providers if not p.startswith("torch.compile")]
        notes.append("torch.compile skipped (--no-compile).")
    elif device.type != "cuda":
        providers = [p for p in providers if not p.startswith("torch.compile")]
        notes.append("torch.compile skipped on the CPU smoke run (inductor's CPU compile takes ~30 s per case).")
    notes.append("fp32 matmuls use TF32 in every provider (torch.set_float32_matmul_precision('high')).")
    notes += [note for op in OPS if op in args.only for note in modules[op].NOTES]
    # Providers only some ops have, run on CUDA only (an op module's CUDA_PROVIDERS): torch's BSR path for the
    # masked forward (its CPU product has no 16-bit kernels).
    op_providers = {op: [p for p in providers[:-1] + list(getattr(modules[op], "CUDA_PROVIDERS", ())) *
                         (device.type == "cuda") + providers[-1:] if p not in args.skip_providers]
                    for op in OPS if op in args.only}
    every_provider = list(dict.fromkeys(p for ps in op_providers.values() for p in ps))
    known = {"torch", "gpunn", *dense.COMPILE_MODES,
             *(p for module in modules.values() for p in getattr(module, "CUDA_PROVIDERS", ()))}
    if args.skip_providers - known:
        print(f"error: --skip-providers: unknown {', '.join(sorted(args.skip_providers - known))}; known: "
              f"{', '.join(sorted(known))}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    log(f"gpunn bench: {info.gpu}; torch {info.torch}; triton {info.triton}; git {info.git_sha}; {info.date}")
    log(f"preset {args.preset}; ops {','.join(args.only)}; dtypes {','.join(args.dtypes)}; activations "
        f"{','.join(a or 'none' for a in args.activations)}; providers "
        f"{','.join(every_provider)}")
    for note in notes:
        log(f"note: {note}")

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for fp32, read by torch and by gpunn's launchers
    try:
        log("measuring ceilings ...")
        ceilings = harness.measure_ceilings(device, smoke=args.smoke)
        log(f"ceilings: bf16 matmul {ceilings.matmul_shape}: {ceilings.matmul_tflops:.1f} TFLOP/s; "
            f"copy {ceilings.copy_bytes / 2**20:.0f} MiB: {ceilings.copy_gbps:.0f} GB/s (read + write)")

        records, errors = [], []
        runs = [(modules[op], modules[op].cases(args.preset, args.dtypes, args.activations), op_providers[op])
                for op in OPS if op in args.only]
        progress = harness.Progress(sum(module.steps(cases, ps) for module, cases, ps in runs), log)
        for module, cases, providers_of_op in runs:
            new, new_errors = module.run(cases, providers_of_op, device, ceilings, log, progress)
            records += new
            errors += new_errors
            # After every op, so that a run cut off (a time limit on a lent GPU) keeps the ops it finished.
            written = _write(records, info, ceilings, notes, out_dir)
            log.save(out_dir / "bench.log")
    finally:
        torch.set_float32_matmul_precision(precision)
        if any(p.startswith("torch.compile") for p in providers):
            torch._dynamo.reset()

    records = written  # every op's rows, as the last op's write left them
    failures = [f"{op} {mode} {dtype} {shape} {provider}: rel err {m['rel_err'].p50:.2e} > "
                f"{harness.TOLERANCE[dtype]:g}"
                for (op, provider, mode, shape, dtype), m in harness.index(records).items()
                if "rel_err" in m and not harness.accuracy_ok(m, dtype)]

    log("")
    log(harness.summary(records, every_provider))
    log(cost_model.summary(records))
    for path in harness.plot(records, info, ceilings, every_provider, out_dir, log):
        log(f"wrote {path}")
    for problem in failures:
        log(f"ACCURACY FAIL {problem}")
    for problem in errors:
        log(f"ERROR {problem}")
    log(f"wrote {out_dir / 'bench.csv'}, {out_dir / 'bench.md'}, {out_dir / 'bench.log'}")
    log.save(out_dir / "bench.log")
    return 1 if failures or errors else 0


def _write(records, info, ceilings, notes, out_dir: Path) -> list:
    """Write bench.csv and bench.md from the measurements so far; returns every row written (the ceilings,
    the measurements and their speedups)."""
    from . import cost_model, harness

    rows = ceilings.records() + harness.add_speedups(records)
    # Each file written beside, then renamed over the last: a run killed mid-write keeps the previous whole file.
    harness.write_csv(rows, info, out_dir / "bench.csv.part")
    (out_dir / "bench.md.part").write_text(harness.markdown(rows, info, ceilings, notes) + "\n"
                                           + cost_model.markdown(rows))
    for name in ("bench.csv", "bench.md"):
        os.replace(out_dir / f"{name}.part", out_dir / name)
    return rows


if __name__ == "__main__":
    sys.exit(main())
