#!/usr/bin/env bash
# The prepared GPU check: on a machine with an NVIDIA GPU (no network needed), install gpunn, run the whole
# test suite compiled on the GPU, the quick benchmarks of every op, `python -m gpunn check --quick`, then
# diagnostics (CUDA-graph training steps, torch.compile baselines, the dense kernels one by one, the split
# RNN's tiles, the loss and SGD kernels without host time), and keep every log and CSV in OUTDIR.
#
#   usage: bash bench/device_check.sh OUTDIR [SECONDS]
#
# SECONDS (default 420) is this invocation's budget. Stages run most needed first, each under its own time
# limit or what is left of the budget (less a margin for the summary), whichever is less; a stage with
# under 30 s left is skipped. A stage that fails or times out does not stop the next. Run it again with
# the same OUTDIR (on the same machine) to resume: stages that ran to their end or to their own limit are
# not run again; those cut short by the budget, or skipped, are (what a cut stage wrote is kept beside, as
# NAME.earlierN.log and, for a benchmark, the directory NAME.earlierN). The stage limits add up to about 26
# minutes, more than a 15-minute lease holds: its last stages are the first to go.
# The last run (H200, 2026-11-27, 465 tests on 8 workers): tests 169 s, its benchmark smoke test alone 111 s.
set -uo pipefail
out=${1:?usage: bash bench/device_check.sh OUTDIR [SECONDS]}
budget=${2:-420}
deadline=$(( $(date +%s) + budget ))
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
touch "$out/status.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, record the status
    local name=$1 own=$2; shift 2
    if grep -q "^$name rc=" "$out/status.txt"; then
        echo "== $name: ran in an earlier invocation"
        return
    fi
    local left=$(( deadline - $(date +%s) - 15 ))
    if (( left < 30 )); then
        echo "$name skipped: ${left}s of the budget left" | tee -a "$out/status.txt"
        return
    fi
    local limit=$(( own < left ? own : left ))
    # A stage run again (cut short before) keeps what the earlier try wrote: its log, and its output directory
    # (named as the stage), as NAME.earlierN.
    local n=1
    while [ -e "$out/$name.earlier$n.log" ] || [ -e "$out/$name.earlier$n" ]; do n=$(( n + 1 )); done
    [ -f "$out/$name.log" ] && mv "$out/$name.log" "$out/$name.earlier$n.log"
    [ -d "$out/$name" ] && mv "$out/$name" "$out/$name.earlier$n"
    local start=$(date +%s)
    echo "== $name (limit ${limit}s of its ${own}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$? seconds=$(( $(date +%s) - start ))
    if (( (rc == 124 || rc == 137) && limit < own )); then
        echo "$name cut by the budget: rc=$rc seconds=$seconds" | tee -a "$out/status.txt"
    else
        echo "$name rc=$rc seconds=$seconds" | tee -a "$out/status.txt"
    fi
    tail -n 25 "$out/$name.log"
}

if [ ! -f "$out/environment.txt" ]; then
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
        "$python" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__); print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))'
    } >"$out/environment.txt" 2>&1
fi
cat "$out/environment.txt"
echo "invocation $(date -u +%H:%M:%SZ), budget ${budget}s, git $(git rev-parse --short HEAD 2>/dev/null)" \
    | tee -a "$out/status.txt"

stage install 30 "$python" -m pip install --no-deps --no-build-isolation --no-index -e .
# Correctness first, with one config per kernel variant (GPUNN_AUTOTUNE=0: they check results, not speed).
# -v: a test per line as it ends, so a run cut off still names its failures. Kernel compiles dominate and
# use the CPU: 12 workers on the 16 cores; --dist loadgroup keeps the benchmark's tests, which share one
# smoke run, on one worker. A pytest stage spends about 15 s outside its tests (imports, workers, exit). A test
# past 150 s gets its threads' tracebacks in the log (faulthandler_timeout): a hang names where it waits.
# Two stages, so that a run cut short resumes with the half it did not finish: the layers' own tests, then
# those of transforms and tools over them (torch.func, forward mode, double backward, torch.compile,
# conversion, the CLI, the check, the benchmark's smoke run, compile reports, distributed); a test file not
# listed in the second is in the first.
xdist=$("$python" -c 'import xdist' 2>/dev/null && echo "-n 12 --dist loadgroup")
pytest_gpu=(env GPUNN_AUTOTUNE=0 "$python" -m pytest -v --durations=15 -p no:cacheprovider -o faulthandler_timeout=150
            $xdist)
transform_tests=(tests/test_func.py tests/test_forward_mode.py tests/test_autodiff.py tests/test_compile.py
                 tests/test_convert.py tests/test_cli.py tests/test_check.py tests/test_bench.py
                 tests/test_compile_report.py tests/test_distributed.py)
layer_tests=()
for file in tests/test_*.py; do
    [[ " ${transform_tests[*]} " == *" $file "* ]] || layer_tests+=("$file")
done
stage tests_layers 200 "${pytest_gpu[@]}" "${layer_tests[@]}"
# Speed of the layers (bench.csv is rewritten as each op finishes: a stage cut short keeps the ops it ran).
stage bench 200 "$python" -m bench --quick --no-compile --only dense,masked,local2d,local1d,rnn,rnn_cell \
  --out "$out/bench"
stage tests_transforms 200 "${pytest_gpu[@]}" "${transform_tests[@]}"
# Speed of the losses, SGD and training steps; then torch.func's per-sample gradients and ensembles, a stage
# of their own (a stage cut at its own limit is not run again: they would be the ops lost).
stage bench_training 150 "$python" -m bench --quick --no-compile --only xent,mse,sgd,mlp_step,penalty_step \
  --out "$out/bench_training"
stage bench_func 90 "$python" -m bench --quick --no-compile --only per_sample,ensemble --out "$out/bench_func"
# Every op against torch's reference in float64, through the public API (kernels mostly cached by the tests).
stage check 60 env GPUNN_AUTOTUNE=0 "$python" -m gpunn check --quick --out "$out/check.md"
# How much of a host-bound training step a CUDA graph recovers (gpunn and torch, eager and replayed; untuned
# kernel configs, to fit the limit: the question is host time).
stage graph_step 45 env GPUNN_AUTOTUNE=0 "$python" -m bench.probes.graph_step
# Forward mode: jvp through the MLP and the RNN, the MLP's Hessian-vector product (never timed on a GPU yet;
# its first calls autotune kernels at shapes no other stage runs: [x' | x] of depth 2K, [dz | dz'] of 2M rows).
stage bench_forward_mode 120 "$python" -m bench --quick --no-compile --only forward_mode --out "$out/bench_forward_mode"
# torch.compile beside torch eager, for the ops inductor compiles (not the RNN: it does not lower RNNs).
stage bench_compile 180 "$python" -m bench --quick --only dense,local2d,rnn_cell,xent,mse --skip-providers gpunn \
  --out "$out/bench_compile"
# The dense backward's split (an elementwise dz pass, then plain GEMMs), kernel by kernel, beside the fused
# kernels' times in bench/results/2026-11-27-h100-run3/kernels.log; and a weight gradient whose rows split
# (an RNN's recurrent weight at hidden 256 over 256 steps of 64), beside cuBLAS.
stage dense_kernels 75 "$python" -m bench.dense_kernels --shapes 4096x4096x4096,16384x256x256 \
  --activations none,relu,gelu
# The split RNN's tiles at the large case, each timed; the RNN in fp32.
stage rnn_split_tiles 120 "$python" -m bench.probes.rnn_split_tiles
stage bench_rnn_fp32 45 "$python" -m bench --quick --only rnn --dtype fp32 --out "$out/bench_rnn_fp32"
# Whether the cross-entropy and SGD misses are the kernels or host time inside do_bench.
stage kernel_alone 60 "$python" -m bench.probes.kernel_alone
echo "== summary"
cat "$out/status.txt"
for bench in bench bench_training bench_func bench_forward_mode; do
    [ -f "$out/$bench/bench.md" ] && cat "$out/$bench/bench.md"
done
exit 0
