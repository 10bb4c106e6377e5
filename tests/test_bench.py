"""The benchmark (python -m bench): its smoke preset end to end, and the rule that a result failing its
accuracy check gets no speedup.

On CPU the smoke run goes through Triton's interpreter (conftest.py selects it): the timings mean nothing,
but the harness, the float64 accuracy checks, the CSV and the markdown are all exercised.
"""
import csv
from pathlib import Path

import pytest
import torch

from bench.__main__ import main
from gpunn.kernels import launch_counts

KERNELS = ("dense_forward_kernel", "dense_grad_input_kernel", "dense_grad_weight_kernel",
           "dense_grad_bias_kernel", "masked_forward_kernel", "masked_grad_input_kernel", "masked_grad_weight_kernel",
           "local_forward_kernel", "local_grad_input_kernel", "local_grad_weight_kernel",
           "rnn_sequence_forward_kernel", "rnn_sequence_backward_kernel", "cross_entropy_forward_kernel",
           "cross_entropy_backward_kernel", "sgd_kernel")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run shared by the tests below: (output dir, exit status, launches of each kernel)."""
    out = tmp_path_factory.mktemp("bench")
    before = launch_counts()
    argv = ["--smoke", "--out", str(out)]
    if torch.cuda.is_available():
        argv.append("--no-compile")  # compiling each tiny case would dominate the GPU suite's time
    status = main(argv)
    after = launch_counts()
    return out, status, {k: after.get(k, 0) - before.get(k, 0) for k in KERNELS}


def _rows(out: Path) -> list[dict]:
    with open(out / "bench.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_writes_csv_markdown_and_log(smoke):
    out, status, _ = smoke
    assert status == 0
    for name in ("bench.csv", "bench.md", "bench.log"):
        assert (out / name).stat().st_size > 0, name
    rows = _rows(out)
    assert list(rows[0]) == ["op", "provider", "mode", "shape", "dtype", "metric", "p50", "p20", "p80",
                             "gpu", "torch", "triton", "git_sha", "date"]
    assert {"ceiling[matmul]", "ceiling[copy]"} <= {r["op"] for r in rows}
    dense = [r for r in rows if r["op"].startswith("dense[")]
    assert {r["provider"] for r in dense} >= {"gpunn", "torch"}
    assert {r["mode"] for r in dense} == {"fwd", "bwd", "fwd+bwd"}
    for r in dense:
        if r["metric"] == "ms":
            assert 0 < float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]), r

    md = (out / "bench.md").read_text()
    assert "| gpunn |" in md and "| torch |" in md
    assert "FAIL" not in md


def test_smoke_accuracy_passes_for_every_provider(smoke):
    out, _, _ = smoke
    tolerance = {"bf16": 1e-2, "fp16": 3e-3, "fp32": 1e-3}
    errors = [r for r in _rows(out) if r["metric"] == "rel_err"]
    assert {r["provider"] for r in errors} >= {"gpunn", "torch"}
    for r in errors:
        assert float(r["p50"]) <= tolerance[r["dtype"]], r
    # Every passing non-baseline result has a speedup; the baseline has none of its own.
    speedups = {(r["op"], r["provider"], r["mode"], r["shape"], r["dtype"])
                for r in _rows(out) if r["metric"] == "speedup_vs_torch"}
    timed = {(r["op"], r["provider"], r["mode"], r["shape"], r["dtype"])
             for r in _rows(out) if r["metric"] == "ms" and r["provider"] != "torch"}
    assert speedups == timed


def test_smoke_ran_gpunn_triton_kernels(smoke):
    _, _, launches = smoke
    for kernel in KERNELS:
        assert launches[kernel] > 0, kernel


def test_smoke_masked_reports_block_costs(smoke):
    out, _, _ = smoke
    rows = [r for r in _rows(out) if r["op"].startswith("masked[")]
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["provider"] for r in rows} >= {"gpunn", "torch"}
    gpunn_timed = {(r["op"], r["mode"], r["shape"]) for r in rows if r["provider"] == "gpunn" and r["metric"] == "ms"}
    for metric in ("dense_layer_ms", "block_cost_ratio", "visited_fraction"):
        assert {(r["op"], r["mode"], r["shape"]) for r in rows if r["metric"] == metric} == gpunn_timed, metric
    assert all(0 < float(r["p50"]) <= 1 for r in rows if r["metric"] == "visited_fraction")
    assert "Cost per visited block" in (out / "bench.md").read_text()


def test_smoke_local2d_rows(smoke):
    out, _, _ = smoke
    rows = [r for r in _rows(out) if r["op"].startswith("local2d[")]
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {(r["provider"], r["metric"]) for r in rows} >= {("gpunn", "ms"), ("torch", "ms"), ("gpunn", "rel_err")}
    if torch.cuda.is_available():  # peak memory is measured on CUDA only
        assert any(r["metric"] == "peak_mem_ratio" for r in rows)


def test_smoke_rnn_rows(smoke):
    out, _, _ = smoke
    rows = [r for r in _rows(out) if r["op"].startswith("rnn[")]
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["provider"] for r in rows} == {"gpunn", "torch"}
    timed = {(r["provider"], r["mode"], r["shape"]) for r in rows if r["metric"] == "ms"}
    for metric in ("us_per_step", "arith_fraction"):
        assert {(r["provider"], r["mode"], r["shape"]) for r in rows if r["metric"] == metric} == timed, metric
    assert "Time per step" in (out / "bench.md").read_text()


def test_smoke_xent_sgd_and_training_step_rows(smoke):
    out, _, _ = smoke
    rows = _rows(out)
    xent = {(r["provider"], r["mode"]) for r in rows if r["op"] == "xent" and r["metric"] == "rel_err"}
    assert xent >= {(p, m) for p in ("torch", "gpunn") for m in ("fwd", "bwd", "fwd+bwd")}
    sgd = {(r["provider"], r["dtype"]) for r in rows if r["op"] == "sgd" and r["metric"] == "ms"}
    assert {"torch", "gpunn"} == {p for p, _ in sgd} and "fp32" in {d for _, d in sgd}
    step = {r["provider"] for r in rows if r["op"] == "mlp_step" and r["metric"] == "rel_err"}
    assert step == {"torch", "gpunn"}


def test_failing_result_gets_no_speedup():
    from bench.harness import Record, add_speedups

    def results(provider, ms, err):
        return [Record("dense[relu]", provider, "fwd", "8x8x8", "bf16", "ms", ms, ms, ms),
                Record("dense[relu]", provider, "fwd", "8x8x8", "bf16", "rel_err", err)]

    records = add_speedups(results("torch", 2.0, 1e-3) + results("gpunn", 1.0, 5e-2)
                           + results("torch.compile", 1.0, 1e-3)
                           + results("torch.compile-max-autotune", 1.0, float("nan")))
    speedups = {r.provider: r.p50 for r in records if r.metric == "speedup_vs_torch"}
    assert speedups == {"torch.compile": 2.0}


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "--smoke" in capsys.readouterr().out
