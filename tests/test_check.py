"""`python -m gpunn check`: it passes on gpunn as it is, and it fails when gpunn is wrong or did not run."""
from __future__ import annotations

import re

import pytest
import torch

import gpunn.check
import gpunn.cli
from gpunn import functional, reference


def test_quick_check_covers_every_op_and_passes(capsys, tmp_path, device):
    out = tmp_path / "check.md"
    assert gpunn.cli.main(["check", "--quick", "--dtypes", "fp64,fp32", "--device", str(device),
                           "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = out.read_text()
    for op in gpunn.check.OPS:
        assert f"| {op} | " in table, op
        assert f"| {op} | " in printed, op
    assert "| backward |" in table and "| step |" in table
    assert "FAIL" not in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "| ok |" in line]
    quick = [case for case in gpunn.check.CASES if case.quick]
    assert len(rows) == 2 * sum(1 if case.op == "sgd" else 2 for case in quick)  # 2 dtypes; sgd has no backward
    assert "0 failed" in printed


def test_a_wrong_result_fails_with_exit_status_1(monkeypatch, capsys, device):
    wrong = lambda *args, **kwargs: functional_mse(*args, **kwargs) * (1 + 1e-4)  # noqa: E731
    functional_mse = functional.mse_loss
    monkeypatch.setattr(functional, "mse_loss", wrong)
    assert gpunn.check.main(str(device), True, ["mse_loss"], ["fp32"], 0, None) == 1
    printed = capsys.readouterr().out
    for direction in ("forward", "backward"):  # the gradient scales too; fp32 rounds the planted error
        error = re.search(rf"\| mse_loss \| 33x17 mean \| fp32 \| {direction} \| ([0-9.e+-]+) \|", printed)
        assert error and float(error[1]) == pytest.approx(1e-4, rel=0.02), direction
    assert "2 failed" in printed and "| FAIL |" in printed


def test_an_op_that_ran_no_triton_kernel_fails(monkeypatch, capsys, device):
    monkeypatch.setattr(functional, "linear", reference.linear)  # right numbers, but plain torch
    results = gpunn.check.run(device, quick=True, ops=["linear"], precisions=["fp64"], log=lambda line: None)
    assert results and all(not r.passed and r.gpunn_err < 1e-15 for r in results)
    assert "FAIL: no Triton launch" in gpunn.check.table(results)


def test_backward_errors_are_measured_on_gradients(monkeypatch, device):
    class Scaled(torch.autograd.Function):  # the forward is right, every gradient is 1% off
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    linear = functional.linear
    monkeypatch.setattr(functional, "linear", lambda *args: Scaled.apply(linear(*args)))
    forward, backward = gpunn.check.run(device, quick=True, ops=["linear"], precisions=["fp64"],
                                        log=lambda line: None)[:2]
    assert forward.passed and not backward.passed
    assert backward.gpunn_err == pytest.approx(0.01, rel=1e-6)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpunn.cli.main(["check", "--ops", "linear,conv"])
    assert exit_.value.code == 2 and "unknown conv" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpunn.cli.main(["check", "--dtypes", "bf16"]) == 2
        assert "CUDA only" in capsys.readouterr().err  # errors to stderr


def test_a_backward_that_ran_no_triton_kernel_fails(monkeypatch, device):
    """Forward values from gpunn's kernels, gradients from plain torch: the backward check must fail."""
    linear = functional.linear

    def torch_backward(x, w, b, activation):
        torch_y = reference.linear(x, w, b, activation)
        return linear(x.detach(), w.detach(), b.detach(), activation) + (torch_y - torch_y.detach())

    monkeypatch.setattr(functional, "linear", torch_backward)
    forward, backward = gpunn.check.run(device, quick=True, ops=["linear"], precisions=["fp64"],
                                        log=lambda line: None)[:2]
    assert forward.passed and backward.gpunn_err < 1e-12 and not backward.passed


def test_an_op_that_raises_fails_its_case_and_the_run_goes_on(monkeypatch, device):
    def broken(*args, **kwargs):
        raise RuntimeError("planted\nsecond line | bar")

    monkeypatch.setattr(functional, "mse_loss", broken)
    results = gpunn.check.run(device, ops=["mse_loss", "sgd"], precisions=["fp64"], log=lambda line: None)
    failed = [r for r in results if not r.passed]
    assert {r.op for r in failed} == {"mse_loss"} and len(failed) == 2  # its two cases; sgd's still ran and passed
    assert any(r.op == "sgd" for r in results)
    assert "FAIL: raised RuntimeError: planted |" in gpunn.check.table(results)


@pytest.mark.parametrize("plant", ["masked rows past 64", "weight gradient splits", "local dilation"])
def test_the_cases_reach_the_paths_a_planted_bug_breaks(monkeypatch, device, plant):
    """Bugs planted where only some shapes go (a masked layer's rows past its first 64, a second tile of
    rows under the interpreter; the weight gradient's split rows, summed in a second launch; a dilated local
    layer's input gradient): some case of the op fails."""
    import copy

    from gpunn.kernels import dense, local, masked

    if plant == "masked rows past 64":
        original = masked.forward

        def planted(*args, **kwargs):
            y, derivative = original(*args, **kwargs)
            y.view(-1, y.shape[-1])[64:] = 0
            return y, derivative

        monkeypatch.setattr(masked, "forward", planted)
        ops = ["masked_linear"]
    elif plant == "weight gradient splits":  # only the first partial sums reach dW (and db, summed alike)
        original = dense.add_partial_sums
        monkeypatch.setattr(dense, "add_partial_sums", lambda parts, out: original(parts[:1], out))
        ops = ["linear"]
    else:  # the input gradient ignores the dilation
        original = local.grad_input

        def planted(dy, weight, input_shape, geometry):
            undilated = copy.copy(geometry)
            undilated.dh = undilated.dw = 1
            return original(dy, weight, input_shape, undilated)

        monkeypatch.setattr(local, "grad_input", planted)
        ops = ["locally_connected2d", "locally_connected1d"]
    results = gpunn.check.run(device, ops=ops, precisions=["fp64"], log=lambda line: None)
    assert [r for r in results if not r.passed], plant
