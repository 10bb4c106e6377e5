#!/usr/bin/env bash
# The prepared GPU check: on a machine with an NVIDIA GPU (no network needed), install gpunn, run the
# quick benchmarks, each dense kernel timed alone, `python -m gpunn check` and the whole test suite
# compiled on the GPU, and keep every log and CSV in OUTDIR.
# Stage limits add up to 12 minutes on one H100 (every op's quick benchmark, the RNN's in fp32 too, then
# about 480 tests); expect about 8 (the check with the first three ops took 5.6). Each stage has its own time limit,
# and a stage that fails or times out does not stop the next.
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

stage install 60 "$python" -m pip install --no-deps --no-build-isolation --no-index -e .
stage bench 300 "$python" -m bench --quick --out "$out/bench"
stage bench_rnn_fp32 60 "$python" -m bench --quick --only rnn --dtype fp32 --out "$out/bench_rnn_fp32"
stage kernels 50 "$python" -m bench.dense_kernels --shapes 4096x4096x4096,16x4096x4096 --activations none,gelu
# One config per kernel variant (GPUNN_AUTOTUNE=0): the check and the tests check results, the benchmark speed.
stage check 60 env GPUNN_AUTOTUNE=0 "$python" -m gpunn check --out "$out/check.md"
xdist=$("$python" -c 'import xdist' 2>/dev/null && echo "-n 8")
stage tests 240 env GPUNN_AUTOTUNE=0 "$python" -m pytest -q -p no:cacheprovider $xdist tests
echo "== summary"
cat "$out/status.txt"
[ -f "$out/bench/bench.md" ] && cat "$out/bench/bench.md"
