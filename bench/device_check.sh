#!/usr/bin/env bash
# The prepared GPU check: on a machine with an NVIDIA GPU (no network needed), install gpunn, run the whole
# test suite compiled on the GPU, then the quick benchmarks of every op, the dense kernels one by one, a
# CUDA-graph training-step probe, `python -m gpunn check --quick` and the split RNN's tile sweep, and keep
# every log and CSV in OUTDIR.
# Each stage has its own time limit, and a stage that fails or times out does not stop the next. The
# limits add up to about 15 minutes; give the run an outer limit of about 8 (a 15-minute lease, a start of
# about 30 s, and a rerun): the most needed stages come first, so a run cut short loses the least. The
# last run (H200, 2026-11-27): tests 169 s, the quick benchmarks of the RNN and the newer ops with
# torch.compile 150 s, graph_step 25 s; at those times the dense_kernels stage ends by about 7 minutes.
#
#   usage: bash bench/device_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash bench/device_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, record the status
    local name=$1 limit=$2; shift 2
    local start=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$out/status.txt"
    tail -n 25 "$out/$name.log"
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$python" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__); print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))'
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"
: >"$out/status.txt"

stage install 30 "$python" -m pip install --no-deps --no-build-isolation --no-index -e .
# Correctness first, with one config per kernel variant (GPUNN_AUTOTUNE=0: they check results, not speed).
# The tests compile most kernel variants; the check, after them, finds many in Triton's cache. A pytest
# stage spends about 15 s outside its tests (imports, workers, exit).
xdist=$("$python" -c 'import xdist' 2>/dev/null && echo "-n 8")
# -v: a test per line as it ends, so a run cut off at its limit still names its failures.
stage tests 220 env GPUNN_AUTOTUNE=0 "$python" -m pytest -v --durations=15 -p no:cacheprovider $xdist tests
# Then speed: the RNN first (its split kernels, past the resident limit, became the default after the last
# run), then the other ops with torch.compile, then the layers measured before (without it).
stage bench 180 "$python" -m bench --quick --only rnn,rnn_cell,local1d,xent,mse,sgd,mlp_step --out "$out/bench"
# The dense backward's new split (an elementwise dz pass, then plain GEMMs), kernel by kernel, beside the
# fused kernels' times in bench/results/2026-11-27-h100-run3/kernels.log; and a weight gradient whose rows
# split (an RNN's recurrent weight at hidden 256 over 256 steps of 64), beside cuBLAS.
stage dense_kernels 75 "$python" -m bench.dense_kernels --shapes 4096x4096x4096,16384x256x256 \
  --activations none,relu,gelu
# How much of a host-bound training step a CUDA graph recovers (gpunn and torch, eager and replayed; untuned
# kernel configs, to fit the limit: the question is host time).
stage graph_step 45 env GPUNN_AUTOTUNE=0 "$python" -m bench.probes.graph_step
stage check 60 env GPUNN_AUTOTUNE=0 "$python" -m gpunn check --quick --out "$out/check.md"
# Double backward's first GPU time (a critic's step with a gradient penalty), in a stage of its own: a bench
# run cut off at its limit writes nothing, and the stage above must not lose its results to it.
stage penalty_step 45 "$python" -m bench --quick --only penalty_step --no-compile --out "$out/bench-penalty"
# The split RNN's tiles at the large case, each timed.
stage rnn_split_tiles 120 "$python" -m bench.probes.rnn_split_tiles
stage bench_rnn_fp32 45 "$python" -m bench --quick --only rnn --dtype fp32 --out "$out/bench_rnn_fp32"
stage bench_layers 90 "$python" -m bench --quick --only dense,masked,local2d --no-compile --out "$out/bench_layers"
# Whether the cross-entropy and SGD misses are the kernels or host time inside do_bench.
stage kernel_alone 60 "$python" -m bench.probes.kernel_alone
echo "== summary"
cat "$out/status.txt"
[ -f "$out/bench/bench.md" ] && cat "$out/bench/bench.md"
