"""The benchmark (python -m bench): its smoke preset end to end, and the rule that a result failing its
accuracy check gets no speedup.

On CPU the smoke run goes through Triton's interpreter (conftest.py selects it): the timings mean nothing,
but the harness, the float64 accuracy checks, the CSV and the markdown are all exercised.
"""
import collections
import csv
from pathlib import Path

import pytest
import torch

from bench import harness
from bench.__main__ import ACTIVATIONS, main, parse_args
from gpunn.kernels import launch_counts

# Under pytest-xdist with --dist loadgroup (bench/device_check.sh), this module's tests run on one worker,
# so the smoke run they share runs once.
pytestmark = pytest.mark.xdist_group("bench_smoke")

KERNELS = ("dense_forward_kernel", "dense_grad_preactivation_kernel", "dense_grad_input_kernel",
           "dense_grad_weight_kernel", "masked_forward_kernel", "masked_grad_input_kernel", "masked_grad_weight_kernel",
           "local_forward_kernel", "local_grad_input_kernel", "local_grad_weight_kernel",
           "rnn_sequence_forward_kernel", "rnn_sequence_backward_kernel", "cross_entropy_forward_kernel",
           "cross_entropy_backward_kernel", "sgd_kernel", "rnn_cell_forward_kernel", "rnn_cell_grad_input_kernel",
           "rnn_cell_grad_weight_kernel", "mse_forward_kernel", "mse_backward_kernel", "dense_double_backward_kernel")
# The kernels an op's gpunn provider must launch in its own measurements (local1d shares local2d's kernels,
# so the totals above cannot tell that it ran them).
OP_KERNELS = {"local1d": ("local_forward_kernel", "local_grad_input_kernel", "local_grad_weight_kernel"),
              "rnn_cell": ("rnn_cell_forward_kernel", "rnn_cell_grad_input_kernel", "rnn_cell_grad_weight_kernel"),
              "mse": ("mse_forward_kernel", "mse_backward_kernel"),
              "penalty_step": ("dense_forward_kernel", "dense_double_backward_kernel", "dense_grad_weight_kernel"),
              "per_sample": ("dense_forward_kernel", "dense_grad_weight_kernel", "cross_entropy_backward_kernel",
                             "rnn_sequence_forward_kernel", "rnn_sequence_backward_kernel"),
              "ensemble": ("dense_forward_kernel", "dense_grad_weight_kernel", "cross_entropy_backward_kernel"),
              # forward_mode's ops: jvp (the dense tangent's GEMM and elementwise pass; the RNN's tangent
              # recurrence, run by the backward kernel) and hvp (the tangents of the backward's passes).
              "jvp": ("dense_forward_kernel", "dense_grad_preactivation_kernel", "rnn_sequence_forward_kernel",
                      "rnn_sequence_backward_kernel"),
              "hvp": ("dense_forward_kernel", "dense_double_backward_kernel", "dense_grad_weight_kernel",
                      "cross_entropy_double_backward_kernel")}


# The smoke run's default dtype: bf16 on a GPU, fp16 on the CPU (Triton's interpreter rounds fp32 to bf16 by
# truncation, the GPU to nearest, which leaves some of gpunn's bf16 errors past the 1e-2 tolerance there).
SMOKE_DTYPE = "bf16" if torch.cuda.is_available() else "fp16"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run shared by the tests below: (output dir, exit status, launches of each kernel, launches
    per (op, provider)). Each progress step ends one measurement, whose label starts "op mode dtype shape
    provider"; the kernels launched since the step before are that measurement's."""
    out = tmp_path_factory.mktemp("bench")
    before = launch_counts()
    argv = ["--smoke", "--out", str(out)]  # the default --dtype: SMOKE_DTYPE
    if torch.cuda.is_available():
        argv.append("--no-compile")  # compiling each tiny case would dominate the GPU suite's time
    by_step = collections.defaultdict(collections.Counter)
    last = [before]
    step = harness.Progress.step

    def counting_step(self, label):
        now = launch_counts()
        op, _, _, _, provider = label.split(":")[0].split()[:5]
        by_step[op.split("[")[0], provider].update({k: n - last[0].get(k, 0) for k, n in now.items()})
        last[0] = now
        step(self, label)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness.Progress, "step", counting_step)
        status = main(argv)
    after = launch_counts()
    return out, status, {k: after.get(k, 0) - before.get(k, 0) for k in KERNELS}, by_step


def _rows(out: Path) -> list[dict]:
    with open(out / "bench.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_writes_csv_markdown_and_log(smoke):
    out, status, *_ = smoke
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
    out, *_ = smoke
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
    _, _, launches, by_step = smoke
    for kernel in KERNELS:
        assert launches[kernel] > 0, kernel
    for op, kernels in OP_KERNELS.items():
        for kernel in kernels:
            assert by_step[op, "gpunn"][kernel] > 0, (op, kernel)
    # The baselines are torch's own: no gpunn kernel runs in a torch measurement.
    assert not [key for key, counts in by_step.items() if key[1] == "torch" and +counts]


def test_smoke_masked_reports_block_costs(smoke):
    out, *_ = smoke
    rows = [r for r in _rows(out) if r["op"].startswith("masked[")]
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["provider"] for r in rows} >= {"gpunn", "torch"}
    gpunn_timed = {(r["op"], r["mode"], r["shape"]) for r in rows if r["provider"] == "gpunn" and r["metric"] == "ms"}
    for metric in ("dense_layer_ms", "block_cost_ratio", "visited_fraction"):
        assert {(r["op"], r["mode"], r["shape"]) for r in rows if r["metric"] == metric} == gpunn_timed, metric
    assert all(0 < float(r["p50"]) <= 1 for r in rows if r["metric"] == "visited_fraction")
    assert {r["op"].split(",")[0] for r in rows} >= {"masked[local_1d_9", "masked[local_1d_33"}
    assert "Cost per visited block" in (out / "bench.md").read_text()


def test_smoke_local2d_rows(smoke):
    out, *_ = smoke
    rows = [r for r in _rows(out) if r["op"].startswith("local2d[")]
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {(r["provider"], r["metric"]) for r in rows} >= {("gpunn", "ms"), ("torch", "ms"), ("gpunn", "rel_err")}
    if torch.cuda.is_available():  # peak memory is measured on CUDA only
        assert any(r["metric"] == "peak_mem_ratio" for r in rows)


def test_smoke_rnn_rows(smoke):
    out, *_ = smoke
    rows = [r for r in _rows(out) if r["op"].startswith("rnn[")]
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["provider"] for r in rows} == {"gpunn", "torch"}
    timed = {(r["provider"], r["mode"], r["shape"]) for r in rows if r["metric"] == "ms"}
    for metric in ("us_per_step", "arith_fraction"):
        assert {(r["provider"], r["mode"], r["shape"]) for r in rows if r["metric"] == metric} == timed, metric
    assert "Time per step" in (out / "bench.md").read_text()


def test_smoke_xent_sgd_training_step_and_torch_func_rows(smoke):
    out, *_ = smoke
    rows = _rows(out)
    xent = {(r["provider"], r["mode"]) for r in rows if r["op"] == "xent" and r["metric"] == "rel_err"}
    assert xent >= {(p, m) for p in ("torch", "gpunn") for m in ("fwd", "bwd", "fwd+bwd")}
    sgd = {(r["provider"], r["dtype"]) for r in rows if r["op"] == "sgd" and r["metric"] == "ms"}
    assert {"torch", "gpunn"} == {p for p, _ in sgd} and "fp32" in {d for _, d in sgd}
    for op in ("mlp_step", "penalty_step"):
        assert {r["provider"] for r in rows if r["op"] == op and r["metric"] == "rel_err"} == {"torch", "gpunn"}, op
    for op, modes in (("per_sample[mlp]", {"fwd+bwd"}), ("per_sample[rnn]", {"fwd+bwd"}),
                      ("ensemble", {"fwd", "fwd+bwd"}), ("jvp[mlp]", {"fwd"}), ("jvp[rnn]", {"fwd"}),
                      ("hvp[mlp]", {"fwd+bwd"})):
        timed = {(r["provider"], r["mode"]) for r in rows if r["op"] == op and r["metric"] == "rel_err"}
        assert timed == {(p, m) for p in ("torch", "gpunn") for m in modes}, op


@pytest.mark.parametrize("op", ["local1d", "rnn_cell", "mse"])
def test_smoke_new_ops_ran_every_mode_accurately(smoke, op):
    out, *_ = smoke
    rows = [r for r in _rows(out) if r["op"].split("[")[0] == op]
    every = {(p, m) for p in ("torch", "gpunn") for m in ("fwd", "bwd", "fwd+bwd")}
    assert {(r["provider"], r["mode"]) for r in rows if r["metric"] == "rel_err"} == every
    # A speedup is given only where both gpunn's result and torch's passed their accuracy check.
    assert {r["mode"] for r in rows if r["provider"] == "gpunn" and r["metric"] == "speedup_vs_torch"} == \
        {"fwd", "bwd", "fwd+bwd"}


def test_smoke_cost_model(smoke):
    """Interpreter counts per gpunn call beside each op's minimum (on the CPU, where the interpreter runs)."""
    if torch.cuda.is_available():
        pytest.skip("the cost model counts what Triton's interpreter executes")
    out, *_ = smoke
    cost = {(r["op"], r["mode"], r["shape"], r["dtype"], r["metric"]): float(r["p50"]) for r in _rows(out)
            if r["metric"].startswith("cost_")}
    counted = {key[:4] for key in cost}
    timed = {(r["op"], r["mode"], r["shape"], r["dtype"]) for r in _rows(out)
             if r["provider"] == "gpunn" and r["metric"] == "ms"}
    assert counted == timed  # every gpunn result, and only gpunn's, has its counts

    def of(op, mode, shape, dtype=SMOKE_DTYPE):
        return {m.removeprefix("cost_"): cost[op, mode, shape, dtype, m] for m in
                ("cost_launches", "cost_programs", "cost_dot_flops", "cost_bytes_loaded", "cost_bytes_stored",
                 "cost_flops_over_min", "cost_bytes_over_min")}

    # A dense 64^3 layer is one 64 x 64 x 64 interpreter tile: exactly the minimal work, in one launch.
    dense = of("dense[relu]", "fwd", "64x64x64")
    assert (dense["launches"], dense["programs"], dense["dot_flops"]) == (1, 1, 2 * 64**3)
    assert dense["bytes_loaded"] == 2 * (2 * 64 * 64 + 64) and dense["bytes_stored"] == 2 * 64 * 64
    assert dense["flops_over_min"] == dense["bytes_over_min"] == 1.0
    # The training step of the dense layer: the forward's launch plus three backward launches.
    assert of("dense[relu]", "fwd+bwd", "64x64x64")["launches"] == 4
    # A masked layer's dot work is its visited blocks': 64 x 64 blocks, each multiplied by one 64-row batch tile.
    visited = {r["shape"]: float(r["p50"]) for r in _rows(out)
               if r["op"] == "masked[local_1d_33,relu]" and r["metric"] == "visited_fraction"}
    assert 0 < visited["16x256x256"] < 1
    counted = of("masked[local_1d_33,relu]", "fwd", "16x256x256")["dot_flops"]
    assert counted == pytest.approx(visited["16x256x256"] * 2 * 64 * 256**2, rel=1e-6)
    # Loss and optimizer kernels do no dot work, and read what they must about once.
    assert of("xent", "bwd", "5x3000")["dot_flops"] == 0
    assert 1.0 <= of("xent", "bwd", "5x3000")["bytes_over_min"] < 1.01
    md = (out / "bench.md").read_text()
    assert "## Cost model" in md and f"| dense[relu] | fwd | 64x64x64 | {SMOKE_DTYPE} | 1 | 1 |" in md


def test_penalty_step_critic_has_gelu_and_mlp_step_relu():
    """The critic's activation has a second derivative, so its double backward takes the full path."""
    from bench import mlp_step, penalty_step

    assert penalty_step.Case(4, 8, "fp32").LAYER_ACTIVATION is torch.nn.GELU
    assert mlp_step.Case(4, 8, "fp32").LAYER_ACTIVATION is torch.nn.ReLU


@pytest.mark.parametrize("case, sizes, kernel, once", [
    ("per_sample.Case", [dict(batch=3), dict(batch=7)], "dense_forward_kernel", 4),
    ("per_sample.RnnCase", [dict(batch=3), dict(batch=7)], "rnn_sequence_forward_kernel", 1),
    ("ensemble.Case", [dict(members=2), dict(members=5)], "dense_forward_kernel", 4)])
def test_torch_func_benchmarks_time_gpunn_folded(device, case, sizes, kernel, once):
    """The per-sample and ensemble benchmarks time gpunn's folded path: the same launches a call whatever the
    samples or members (a call per sample or member would launch every kernel that many times)."""
    import importlib

    module, name = case.split(".")
    kind = getattr(importlib.import_module(f"bench.{module}"), name)
    launches = collections.defaultdict(set)
    for size in sizes:
        case = kind(**{"batch": 4, "width": 12, "dtype": "fp32", **size, **({"steps": 3} if "Rnn" in name else {})})
        x, y, _, _ = case.inputs(device, seed=0)
        for mode in case.modes:
            call, _ = case.callables(mode, "gpunn", x, y, 0, None)
            call()  # warm: on a GPU the first call also autotunes
            before = launch_counts()
            call()
            after = launch_counts()
            launches[mode].add(tuple(sorted((k, n - before.get(k, 0)) for k, n in after.items()
                                            if n != before.get(k, 0))))
    for mode, counts in launches.items():
        assert len(counts) == 1, (mode, counts)
        (count,) = counts
        assert dict(count)[kernel] == once, (mode, count)


def test_activations_all():
    assert parse_args(["--activations", "all"]).activations == [None if a == "none" else a for a in ACTIVATIONS]
    assert parse_args([]).activations == ["relu", "gelu"]


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


def test_skip_providers_refuses_an_unknown_name(tmp_path, capsys):
    # A typo must not silently run what it meant to skip.
    out = tmp_path / "out"
    assert main(["--smoke", "--only", "mse", "--skip-providers", "torch-sparse", "--out", str(out)]) == 2
    assert "unknown torch-sparse" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_a_run_stopped_early_keeps_the_ops_it_finished(tmp_path, monkeypatch):
    # On a lent GPU a time limit can stop the run: each op's results are written as it finishes.
    from bench import sgd

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sgd, "run", stopped)
    with pytest.raises(KeyboardInterrupt):
        main(["--smoke", "--only", "mse,sgd", "--dtype", SMOKE_DTYPE, "--no-compile", "--out", str(tmp_path)])
    rows = _rows(tmp_path)
    assert {row["op"] for row in rows if row["provider"] == "gpunn"} == {"mse"}
    assert any(row["op"] == "mse" and row["metric"] == "speedup_vs_torch" for row in rows)
    assert "| mse |" in (tmp_path / "bench.md").read_text()
    assert "mse" in (tmp_path / "bench.log").read_text()
