"""The CPU cost model of the smoke run: what gpunn's kernels do per call, as Triton's interpreter counts it,
beside the least work the op needs.

For each gpunn result of a run under the interpreter: Triton launches, programs, dot FLOPs, and bytes
loaded and stored per call (gpunn.kernels.work.count_work), next to the case's minimal FLOPs and bytes
(its work model: the same numbers TFLOP/s and GB/s divide by). The ratios make fusion and skipped work
visible without a GPU: a dense layer's dot FLOPs equal 2MNK up to tile padding; a masked layer's are
the listed blocks', a few percent of the dense layer's; bytes above the minimum are operands read again,
by neighbouring programs of one launch (from L2 on a GPU) or by separate launches (the dense backward's
elementwise pass writes dz, which both of its GEMMs read), or outputs written for backward (act'(z)); an
unfused forward activation would show as one more launch and a round trip of the output.
"""
from __future__ import annotations

from collections import OrderedDict

from gpunn.kernels.work import count_work

from .harness import Record

METRICS = ("launches", "programs", "dot_flops", "bytes_loaded", "bytes_stored", "flops_over_min", "bytes_over_min")


def measure(case, mode: str, run) -> list[Record]:
    """Records of one call of `run` (warmed up) under the interpreter: counts, and ratios to the minimum."""
    with count_work() as work:
        run()
    minimal_bytes = case.bytes(mode)
    values = {"launches": work.launches, "programs": work.programs, "dot_flops": work.dot_flops,
              "bytes_loaded": work.bytes_loaded, "bytes_stored": work.bytes_stored,
              "flops_over_min": work.dot_flops / case.flops(mode) if case.flops(mode) else 0.0,
              "bytes_over_min": (work.bytes_loaded + work.bytes_stored) / minimal_bytes if minimal_bytes else 0.0}
    return [Record(case.op, "gpunn", mode, case.shape, case.dtype, f"cost_{name}", float(value))
            for name, value in values.items()]


def _rows(records: list[Record]) -> "OrderedDict[tuple, dict[str, float]]":
    rows: OrderedDict[tuple, dict[str, float]] = OrderedDict()
    for r in records:
        if r.metric.startswith("cost_"):
            rows.setdefault((r.op, r.mode, r.shape, r.dtype), {})[r.metric.removeprefix("cost_")] = r.p50
    return rows


def markdown(records: list[Record]) -> str:
    """The cost model as a markdown section ("" when the run counted nothing)."""
    rows = _rows(records)
    if not rows:
        return ""
    lines = ["## Cost model (Triton interpreter counts per gpunn call)", "",
             "Dot FLOPs include tile padding past the tensors' edges; bytes count the distinct addresses of the "
             "lanes a mask lets through, per load and program (on a GPU, programs re-reading the same data share "
             "it through L2). The minimum is the op's work model (its TFLOP/s and GB/s denominators).", "",
             "| op | mode | shape | dtype | launches | programs | dot FLOPs | / min FLOPs | bytes loaded "
             "| bytes stored | / min bytes |", "|" + "---|" * 11]
    for (op, mode, shape, dtype), m in rows.items():
        lines.append(f"| {op} | {mode} | {shape} | {dtype} | {m['launches']:.0f} | {m['programs']:.0f} "
                     f"| {m['dot_flops']:.4g} | {m['flops_over_min']:.3g} | {m['bytes_loaded']:.4g} "
                     f"| {m['bytes_stored']:.4g} | {m['bytes_over_min']:.3g} |")
    return "\n".join(lines) + "\n"


def summary(records: list[Record]) -> str:
    """One plain-text line per counted call, for the log."""
    rows = _rows(records)
    if not rows:
        return ""
    width = max(len(f"{op} {mode} {shape} {dtype}") for op, mode, shape, dtype in rows)
    lines = ["cost model (interpreter counts per gpunn call; ratios to the op's minimal FLOPs and bytes):"]
    for (op, mode, shape, dtype), m in rows.items():
        lines.append(f"{f'{op} {mode} {shape} {dtype}'.ljust(width)}  {m['launches']:.0f} launches, "
                     f"{m['programs']:.0f} programs, dot FLOPs {m['flops_over_min']:.2f}x min, bytes "
                     f"{m['bytes_over_min']:.2f}x min")
    return "\n".join(lines) + "\n"
