#!/usr/bin/env bash
# The prepared GPU check: on a machine with an NVIDIA GPU (no network needed), install gpunn, run the whole
# test suite (the RNN grid-barrier tests in a stage of their own) and `python -m gpunn check` compiled on
# the GPU, then the quick benchmarks of every op, a CUDA-graph training-step probe, and keep every log and
# CSV in OUTDIR.
# Stage limits add up to about 11 minutes; the run is sized to be cut off by an outer limit of about 8 (a
# 15-minute lease, its start and a rerun). Each stage has its own time limit, and a stage that fails or
# times out does not stop the next; the most needed come first, so a run cut short loses the least.
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
# The tests compile most kernel variants; the check, after them, finds many in Triton's cache.
xdist=$("$python" -c 'import xdist' 2>/dev/null && echo "-n 8")
# -v: a test per line as it ends, so a run cut off at its limit still names its failures.
stage tests 180 env GPUNN_AUTOTUNE=0 "$python" -m pytest -v --durations=15 -p no:cacheprovider $xdist tests -k "not grid_sync"
# The RNN's grid barrier (GPUNN_RNN_GRID_SYNC=1) has never run on a GPU: alone and short, since a barrier that
# hangs holds the GPU until the limit; its benchmark runs only if these pass.
stage grid_sync 45 env GPUNN_AUTOTUNE=0 "$python" -m pytest -v -p no:cacheprovider tests -k grid_sync
skip_grid_sync=$(grep -q "^grid_sync rc=0 " "$out/status.txt" || echo --skip-providers=gpunn-gridsync)
# Then speed: the ops no GPU has timed yet, then the layers measured before (without torch.compile, whose
# numbers for them are committed), so that a run cut short loses the least.
stage bench 150 "$python" -m bench --quick --only rnn,rnn_cell,local1d,xent,mse,sgd,mlp_step $skip_grid_sync \
    --out "$out/bench"
# The split RNN's tiles at the large case, each timed (only if its tests passed).
[ -z "$skip_grid_sync" ] && stage rnn_split_tiles 45 "$python" -m bench.probes.rnn_split_tiles
# How much of a host-bound training step a CUDA graph recovers (gpunn and torch, eager and replayed; untuned
# kernel configs, to fit the limit: the question is host time).
stage graph_step 45 env GPUNN_AUTOTUNE=0 "$python" -m bench.probes.graph_step
stage check 60 env GPUNN_AUTOTUNE=0 "$python" -m gpunn check --out "$out/check.md"
stage bench_rnn_fp32 30 "$python" -m bench --quick --only rnn --dtype fp32 $skip_grid_sync --out "$out/bench_rnn_fp32"
stage bench_layers 60 "$python" -m bench --quick --only dense,masked,local2d --no-compile --out "$out/bench_layers"
echo "== summary"
cat "$out/status.txt"
[ -f "$out/bench/bench.md" ] && cat "$out/bench/bench.md"
