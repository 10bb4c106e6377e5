"""Machinery shared by gpunn's benchmarks: timing, the ceilings measured at the start of a run, accuracy,
result records and their CSV / markdown / plot / stdout forms.

Nothing here knows about a particular op: an op module (bench/dense.py) builds its cases, times them with
`time_ms`, checks them with `rel_err`, and returns `Record`s. Import this module only after the device
has been chosen (bench/__main__.py): it imports triton, and Triton's interpreter must be selected
(TRITON_INTERPRET=1) before that first import.
"""
from __future__ import annotations

import csv
import datetime
import gc
import math
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.testing

from gpunn.check import rel_err  # noqa: F401  (the benchmarks' accuracy measure: gpunn check's)

QUANTILES = (0.5, 0.2, 0.8)  # do_bench's order: the median first, then p20 and p80
BASELINE = "torch"  # the provider every speedup is measured against

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Bounds on ||out - ref|| / ||ref|| against a float64 reference on the same (already rounded) inputs.
# fp32 runs with TF32 tensor cores (see bench/__main__.py), hence 1e-3 rather than IEEE's 1e-5.
TOLERANCE = {"bf16": 1e-2, "fp16": 3e-3, "fp32": 1e-3}

CSV_COLUMNS = ("op", "provider", "mode", "shape", "dtype", "metric", "p50", "p20", "p80",
               "gpu", "torch", "triton", "git_sha", "date")


# ----------------------------------------------------------------------------------------------------
# Records

@dataclass
class Record:
    """One row of the long-format results: one metric of one (op, provider, mode, shape, dtype).

    p20/p80 are None for metrics without a spread (accuracy, memory, ratios). For throughputs, p20 is
    the throughput at the p80 time and p80 the one at the p20 time, so that p20 <= p50 <= p80 holds.
    """

    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    metric: str
    p50: float
    p20: float | None = None
    p80: float | None = None

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return self.op, self.provider, self.mode, self.shape, self.dtype


class CaseBase:
    """What benchmark cases share unless they say otherwise: a forward case (grad False) runs mode fwd, a
    gradient case bwd and fwd+bwd; every provider runs every mode; no separate weight-read metric."""

    grad: bool

    @property
    def modes(self) -> tuple[str, ...]:
        return ("bwd", "fwd+bwd") if self.grad else ("fwd",)

    def modes_for(self, provider: str) -> tuple[str, ...]:
        """The modes `provider` runs for this case."""
        return self.modes

    def weight_read_bound(self) -> bool:
        """Whether the forward's time is the weight read (then GB/s of that read is reported too)."""
        return False


@dataclass
class RunInfo:
    """Where and with what the results were produced (repeated on every CSV row)."""

    gpu: str
    torch: str
    triton: str
    git_sha: str
    date: str

    @staticmethod
    def collect(device: torch.device) -> "RunInfo":
        if device.type == "cuda":
            gpu = torch.cuda.get_device_name(device)
        else:
            gpu = "cpu (triton interpreter)"
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return RunInfo(gpu, torch.__version__, triton.__version__, _git_sha(), date)


def _git_sha() -> str:
    """The checkout's commit, with "+dirty" when tracked files differ from it; "unknown" without git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def passes(dtype: str, err: float) -> bool:
    """Whether a relative error is within the dtype's tolerance (NaN never passes)."""
    return math.isfinite(err) and err <= TOLERANCE[dtype]


# ----------------------------------------------------------------------------------------------------
# Device helpers

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Return cached blocks between cases, so that one case's tensors never crowd the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call of fn allocates at its peak beyond what was allocated before it (MiB; CUDA only).

    Measured on a separate call, not inside do_bench: do_bench allocates its own L2-flush buffer."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - before) / 2**20


def capture_cuda_graph(step: Callable[[], object], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, the step's outputs as captured) of step() recorded in a CUDA graph, after `warmup` eager
    steps on a side stream (autotuning, compilation and every cache gpunn fills on first use: mask layouts,
    SGD's device table, RNN step tables); graph.replay() then runs the step again, writing the same output
    tensors. The step must keep its tensors' memory between calls (zero_grad(set_to_none=False))."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


# ----------------------------------------------------------------------------------------------------
# Timing

@dataclass
class Timing:
    """Milliseconds per call: median, 20th and 80th percentiles."""

    p50: float
    p20: float
    p80: float


def time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: int = 25, rep_ms: int = 100,
            cpu_reps: int = 3) -> Timing:
    """Time fn, already warmed up by the caller (autotuning and compilation done).

    CUDA: triton.testing.do_bench. It zeroes a 256 MB buffer before every timed call, which evicts the
    whole L2 (50 MB on H100), so each call reads its inputs from HBM even when they would fit in L2 (the
    weight of a small-batch layer does). That is the cold-cache effect rotating several input sets would
    give, without multiplying memory; the flush runs outside the timed events.

    CPU (the interpreter smoke run): a plain wall-clock loop; these numbers only exercise the harness.
    """
    if device.type == "cuda":
        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return Timing(p50, p20, p80)
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    if len(times) == 1:
        return Timing(times[0], times[0], times[0])
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")  # the 20/40/60/80% cut points
    return Timing(statistics.median(times), p20, p80)


def throughput(amount: float, timing: Timing, scale: float) -> tuple[float, float, float]:
    """(p50, p20, p80) of amount / time in units of `scale` per second; p20 comes from the slow (p80) time."""
    return tuple(amount / (ms * 1e-3) / scale for ms in (timing.p50, timing.p80, timing.p20))


# ----------------------------------------------------------------------------------------------------
# Ceilings

@dataclass
class Ceilings:
    """What this device achieves on the simplest compute-bound and memory-bound work, measured now."""

    matmul_tflops: float  # a large bf16 matmul (cuBLAS through torch.mm)
    copy_gbps: float  # a large device-to-device copy, counting the read and the write
    matmul_shape: str
    copy_bytes: int

    @property
    def ridge_flop_per_byte(self) -> float:
        """Arithmetic intensity below which a kernel is bound by memory rather than by the matmul rate."""
        return self.matmul_tflops * 1e12 / (self.copy_gbps * 1e9)

    def records(self) -> list[Record]:
        mm = Record("ceiling[matmul]", BASELINE, "fwd", self.matmul_shape, "bf16", "tflops", self.matmul_tflops)
        copy = Record("ceiling[copy]", BASELINE, "fwd", f"{self.copy_bytes}B", "fp32", "gbps", self.copy_gbps)
        return [mm, copy]


def measure_ceilings(device: torch.device, smoke: bool) -> Ceilings:
    """Time an (n x n) @ (n x n) bf16 matmul and a copy of `nbytes` bytes on `device`; the medians set the
    ceilings every result is compared with. Tiny sizes on the smoke run (meaningless numbers)."""
    n, nbytes = (256, 8 * 2**20) if smoke else (8192, 2**30)
    gen = torch.Generator(device=device).manual_seed(1234)
    t_mm = _time_matmul(n, device, gen)
    t_copy = _time_copy(nbytes, device, gen)
    free_memory(device)
    return Ceilings(matmul_tflops=2 * n**3 / (t_mm.p50 * 1e-3) / 1e12,
                    copy_gbps=2 * nbytes / (t_copy.p50 * 1e-3) / 1e9,
                    matmul_shape=f"{n}x{n}x{n}", copy_bytes=nbytes)


def _time_matmul(n: int, device: torch.device, gen: torch.Generator) -> Timing:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)

    def matmul():
        torch.mm(a, b, out=c)

    for _ in range(3):
        matmul()
    synchronize(device)
    # A longer run than the default lets the clocks settle at what sustained tensor-core work gets.
    return time_ms(matmul, device, warmup_ms=100, rep_ms=500)


def _time_copy(nbytes: int, device: torch.device, gen: torch.Generator) -> Timing:
    src = torch.rand(nbytes // 4, device=device, dtype=torch.float32, generator=gen)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    copy()
    synchronize(device)
    return time_ms(copy, device, warmup_ms=50, rep_ms=300)


# ----------------------------------------------------------------------------------------------------
# Accuracy

def as_one_vector(tensors) -> torch.Tensor:
    """The tensors flattened and joined: a model's gradient, or a Hessian-vector product, as the one vector in
    parameter space an optimizer or a Krylov method uses; its relative error is then what an accuracy check
    reports. (A bias's block alone is a sum over the batch of terms that largely cancel: in bf16 it can sit
    past the tolerance in torch itself while the whole vector is well within it.)"""
    return torch.cat([t.reshape(-1) for t in tensors])


def add_speedups(records: list[Record]) -> list[Record]:
    """speedup_vs_torch = torch's median time / the provider's, for every provider whose result and whose
    baseline both passed their accuracy check; a failing result gets no speedup."""
    by_key = index(records)
    added = []
    for (op, provider, mode, shape, dtype), metrics in by_key.items():
        base = by_key.get((op, BASELINE, mode, shape, dtype))
        if provider == BASELINE or base is None or "ms" not in metrics or "ms" not in base:
            continue
        if not (accuracy_ok(metrics, dtype) and accuracy_ok(base, dtype)):
            continue
        added.append(Record(op, provider, mode, shape, dtype, "speedup_vs_torch",
                            base["ms"].p50 / metrics["ms"].p50))
    return records + added


def accuracy_ok(metrics: dict[str, Record], dtype: str) -> bool:
    return "rel_err" in metrics and passes(dtype, metrics["rel_err"].p50)


# ----------------------------------------------------------------------------------------------------
# Output

class Log:
    """print() that also keeps the lines, so the run's log can be saved beside its results."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, message: str = "", file=None) -> None:
        print(message, file=file or sys.stdout, flush=True)
        self.lines.append(message)

    def save(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")


class Progress:
    """A counter line per finished step: "[3/24 12s] label"."""

    def __init__(self, total: int, log: Log) -> None:
        self.total, self.done, self.log = total, 0, log
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        self.log(f"[{self.done}/{self.total} {elapsed:.0f}s] {label}")


def index(records: list[Record]) -> "OrderedDict[tuple, dict[str, Record]]":
    """Records grouped by (op, provider, mode, shape, dtype), in first-seen order, keyed by metric."""
    grouped: OrderedDict[tuple, dict[str, Record]] = OrderedDict()
    for record in records:
        grouped.setdefault(record.key, {})[record.metric] = record
    return grouped


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def write_csv(records: list[Record], info: RunInfo, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for r in records:
            writer.writerow([r.op, r.provider, r.mode, r.shape, r.dtype, r.metric, _fmt(r.p50), _fmt(r.p20),
                             _fmt(r.p80), info.gpu, info.torch, info.triton, info.git_sha, info.date])


def _sections(records: list[Record]) -> "OrderedDict[tuple[str, str], OrderedDict[tuple, dict]]":
    """Result groups per (mode, dtype), ceilings left out."""
    sections: OrderedDict[tuple[str, str], OrderedDict[tuple, dict]] = OrderedDict()
    for key, metrics in index(records).items():
        if key[0].startswith("ceiling"):
            continue
        _, _, mode, _, dtype = key
        sections.setdefault((mode, dtype), OrderedDict())[key] = metrics
    return sections


def _num(value: float) -> str:
    """Four significant digits without exponent noise for the usual magnitudes (612.3, 0.9812, 3.4e-05)."""
    return f"{value:.4g}"


def _cell(metrics: dict[str, Record], metric: str, scale: float = 1.0, spec: str | None = None) -> str:
    record = metrics.get(metric)
    if record is None:
        return "-"
    return format(record.p50 * scale, spec) if spec else _num(record.p50 * scale)


def markdown(records: list[Record], info: RunInfo, ceilings: Ceilings, notes: list[str]) -> str:
    """The results as markdown: run facts and ceilings, then one table per (mode, dtype)."""
    lines = [
        "# gpunn benchmark results", "",
        f"- GPU: {info.gpu}; torch {info.torch}; triton {info.triton}; git {info.git_sha}; {info.date}",
        f"- Ceilings measured at the start of the run: bf16 matmul {ceilings.matmul_shape} "
        f"**{ceilings.matmul_tflops:.1f} TFLOP/s**; device copy of {ceilings.copy_bytes / 2**20:.0f} MiB "
        f"**{ceilings.copy_gbps:.0f} GB/s** (read + write); ridge {ceilings.ridge_flop_per_byte:.0f} FLOP/byte.",
        *[f"- {note}" for note in notes], "",
    ]
    for (mode, dtype), group in _sections(records).items():
        lines += [f"## {mode}, {dtype} (tolerance {TOLERANCE[dtype]:g})", "",
                  "| op | shape (MxNxK) | provider | ms p50 [p20, p80] | TFLOP/s | % matmul ceiling | GB/s "
                  "| % copy ceiling | weight GB/s (% copy) | vs torch | rel err | accuracy | peak MiB |",
                  "|" + "---|" * 13]
        for (op, provider, _, shape, _), m in group.items():
            if "ms" not in m:
                continue
            ms = m["ms"]
            weight = "-"
            if "weight_gbps" in m:
                weight = f"{_num(m['weight_gbps'].p50)} ({_cell(m, 'weight_frac_copy_ceiling', 100)}%)"
            if provider == BASELINE:
                speedup = "baseline"
            elif "speedup_vs_torch" in m:
                speedup = f"{m['speedup_vs_torch'].p50:.2f}x"
            else:
                speedup = "-"
            lines.append(
                f"| {op} | {shape} | {provider} | {_num(ms.p50)} [{_num(ms.p20)}, {_num(ms.p80)}] "
                f"| {_cell(m, 'tflops')} | {_cell(m, 'frac_matmul_ceiling', 100)} "
                f"| {_cell(m, 'gbps')} | {_cell(m, 'frac_copy_ceiling', 100)} | {weight} "
                f"| {speedup} | {_cell(m, 'rel_err', spec='.2e')} "
                f"| {'ok' if accuracy_ok(m, dtype) else 'FAIL'} | {_cell(m, 'peak_mem_mib', spec='.0f')} |")
        lines.append("")
        sparse = [(key, m) for key, m in group.items() if "dense_layer_ms" in m]
        if sparse:
            lines += ["Cost per visited block against the dense layer of the same shape (target <= 1.5):", "",
                      "| op | shape (MxNxK) | provider | visited / dense blocks | ms | dense layer ms "
                      "| block cost ratio |", "|" + "---|" * 7]
            lines += [f"| {op} | {shape} | {provider} | {_cell(m, 'visited_fraction', spec='.4f')} "
                      f"| {_cell(m, 'ms')} | {_cell(m, 'dense_layer_ms')} "
                      f"| {_cell(m, 'block_cost_ratio', spec='.2f')} |"
                      for (op, provider, _, shape, _), m in sparse]
            lines.append("")
        recurrent = [(key, m) for key, m in group.items() if "us_per_step" in m]
        if recurrent:
            lines += ["Time per step, and the share of it the arithmetic at the matmul ceiling would take (the "
                      "rest is latency):", "", "| op | shape | provider | us per step | arithmetic fraction |",
                      "|" + "---|" * 5]
            lines += [f"| {op} | {shape} | {provider} | {_cell(m, 'us_per_step', spec='.2f')} "
                      f"| {_cell(m, 'arith_fraction', spec='.2e')} |" for (op, provider, _, shape, _), m in recurrent]
            lines.append("")
    return "\n".join(lines)


def summary(records: list[Record], providers: list[str]) -> str:
    """A plain-text table per (mode, dtype): TFLOP/s of each provider and its ratio to torch."""
    out = []
    for (mode, dtype), group in _sections(records).items():
        rows: OrderedDict[tuple[str, str], dict[str, str]] = OrderedDict()
        for (op, provider, _, shape, _), m in group.items():
            if "ms" not in m:
                continue
            cell = _num(m["tflops"].p50)
            if not accuracy_ok(m, dtype):
                cell += " FAIL"
            elif provider != BASELINE and "speedup_vs_torch" in m:
                cell += f" ({m['speedup_vs_torch'].p50:.2f}x)"
            rows.setdefault((op, shape), {})[provider] = cell
        names = [p for p in providers if any(p in cells for cells in rows.values())]
        title = f"{mode} {dtype}: TFLOP/s (speedup vs torch)"
        label_width = max([len(f"{op} {shape}") for op, shape in rows] + [len(title)])
        width = max([len(c) for cells in rows.values() for c in cells.values()] + [len(n) for n in names]) + 2
        out.append(title.ljust(label_width) + "".join(n.rjust(width) for n in names))
        for (op, shape), cells in rows.items():
            out.append(f"{op} {shape}".ljust(label_width) + "".join(cells.get(n, "-").rjust(width) for n in names))
        out.append("")
    return "\n".join(out)


def plot(records: list[Record], info: RunInfo, ceilings: Ceilings, providers: list[str], out_dir: Path,
         log: Log) -> list[Path]:
    """One PNG per (mode, dtype): TFLOP/s per case and provider (the matmul ceiling dashed) above the
    speedup vs torch. Skipped, with a message, where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []
    for (mode, dtype), group in _sections(records).items():
        cases = list(OrderedDict.fromkeys((op, shape) for (op, _, _, shape, _) in group))
        names = [p for p in providers if any(key[1] == p for key in group)]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(cases) + 2), 7), sharex=True)
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs, tflops, speedups = [], [], []
            for j, (op, shape) in enumerate(cases):
                m = group.get((op, name, mode, shape, dtype), {})
                if "tflops" in m:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    tflops.append(m["tflops"].p50)
                    if name == BASELINE:
                        speedups.append(1.0)
                    else:
                        speedups.append(m["speedup_vs_torch"].p50 if "speedup_vs_torch" in m else 0.0)
            top.bar(xs, tflops, width, label=name)
            bottom.bar(xs, speedups, width, label=name)
        top.axhline(ceilings.matmul_tflops, color="k", linestyle="--", linewidth=1, label="bf16 matmul ceiling")
        top.set_ylabel("TFLOP/s")
        top.set_title(f"{mode} {dtype} on {info.gpu}")
        top.legend(fontsize=8)
        bottom.axhline(1.0, color="k", linewidth=1)
        bottom.set_ylabel("speedup vs torch (0 = failed accuracy)")
        bottom.set_xticks(range(len(cases)), [f"{op}\n{shape}" for op, shape in cases], rotation=30,
                          ha="right", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"bench_{mode.replace('+', '-')}_{dtype}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written

