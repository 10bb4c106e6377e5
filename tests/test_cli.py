"""The main job, `python -m gpunn train`, end to end on small data."""
from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import count_launches

import gpunn.cli


def _digits_like(path, samples=160, side=8, classes=4, seed=0):
    """Images whose class shows as a brighter quadrant, noisy: learnable in an epoch or two."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, samples)
    x = rng.normal(0, 0.3, (samples, side, side))
    for i, label in enumerate(y):
        row, col = divmod(int(label), 2)
        x[i, row * side // 2:(row + 1) * side // 2, col * side // 2:(col + 1) * side // 2] += 1.0
    np.savez(path, X=x.reshape(samples, -1), y=y * 3)  # labels need not be 0..C-1
    return path


def test_train_runs_all_three_networks_and_matches_torch(capsys, tmp_path):
    data = _digits_like(tmp_path / "data.npz")
    plot = tmp_path / "loss.png"
    with count_launches() as launches:
        assert gpunn.cli.main(["train", "--epochs", "3", "--batch-size", "64", "--data", str(data),
                               "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "epoch 3/3" in out
    for network in ("mlp", "local", "rnn"):
        match = re.search(rf"summary {network}\s+gpunn test accuracy\s+([\d.]+)%\s+torch test accuracy\s+([\d.]+)%"
                          rf"\s+largest loss gap (\S+)", out)
        assert match, network
        ours, theirs, gap = (float(value) for value in match.groups())
        assert ours == theirs and ours >= 60.0, (network, ours)  # 4 classes: chance is 25%
        assert gap < 1e-4
    # gpunn's side ran its own kernels: 2 batches x 3 epochs of SGD steps per network, and every layer kind.
    assert launches["sgd_kernel"] == launches["cross_entropy_backward_kernel"] == 3 * 6
    for kernel in ("local_forward_kernel", "masked_forward_kernel", "rnn_sequence_forward_kernel",
                   "dense_forward_kernel"):
        assert launches[kernel] > 0, kernel
    assert plot.stat().st_size > 0


def test_features_that_are_not_an_image_train_the_mlp_only(capsys, tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "flat.npz", X=rng.normal(size=(90, 10)), y=rng.integers(0, 3, 90))
    assert gpunn.cli.main(["train", "--epochs", "1", "--data", str(tmp_path / "flat.npz"),
                           "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "summary mlp" in out and "summary rnn" not in out


def test_help_lists_train_and_bad_networks_are_refused(capsys):
    for argv in (["--help"], ["train", "--networks", "mlp,cnn"]):
        with pytest.raises(SystemExit) as exit_:
            gpunn.cli.main(argv)
        assert exit_.value.code == (0 if argv == ["--help"] else 2)
    captured = capsys.readouterr()
    assert "train" in captured.out and "unknown cnn" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["train", "--batch-size", "0"], "--batch-size: must be an integer of at least 1, got 0"),
    (["train", "--epochs", "1.5"], "--epochs: must be an integer of at least 1, got 1.5"),
    (["train", "--lr", "abc"], "--lr: must be a finite number >= 0, got abc"),
    (["train", "--lr", "-1"], "--lr: must be a finite number >= 0"),
    (["train", "--momentum", "nan"], "--momentum: must be a finite number >= 0"),
    (["train", "--device", "foo"], "--device"),
    (["train", "--device", "meta"], "gpunn runs on cpu or cuda"),
    (["train", "--plot", "/no/such/directory/loss.png"], "no directory /no/such/directory"),
    (["train", "--plot", "/"], "a directory, not a file"),
    (["check", "--out", "/no/such/directory/check.md"], "no directory /no/such/directory"),
    (["check", "--seed", str(2**64 - 1)], "--seed: must be an integer from 0 to 2**62"),  # torch takes it, not + a case
    (["train", "--seed", "-1"], "--seed: must be an integer from 0 to 2**62, got -1"),
], ids=lambda value: value if isinstance(value, str) else " ".join(value))
def test_bad_options_are_refused_before_any_work(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        gpunn.cli.main(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert message in error and f"gpunn {argv[0]}: error" in error  # the command's own usage


def _arrays(samples=40, features=16, seed=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(samples, features)), rng.integers(0, 3, samples)


def _with_nan(x):
    x = x.copy()
    x[7, 3] = np.nan
    return x


@pytest.mark.parametrize("arrays, message", [
    (lambda x, y: dict(X=x, y=y[:30]), "X has 40 examples and y 30 labels"),
    (lambda x, y: dict(X=x, y=np.eye(3)[y]), "one-hot labels"),
    (lambda x, y: dict(X=_with_nan(x), y=y), "NaN or infinite values in 1 of its examples (the first: 7)"),
    (lambda x, y: dict(X=x, y=np.where(y == 1, np.nan, y)), "NaN or infinite labels"),
    (lambda x, y: dict(X=x[:1], y=y[:1]), "at least 2 examples"),
    (lambda x, y: dict(X=np.full((4, 2), "a"), y=y[:4]), "X must be numbers"),
    (lambda x, y: dict(features=x, labels=y), "must hold arrays X"),
], ids=["short y", "one-hot", "nan X", "nan y", "one example", "strings", "names"])
def test_data_it_cannot_train_on_is_refused_with_the_reason(tmp_path, arrays, message):
    np.savez(tmp_path / "data.npz", **arrays(*_arrays()))
    with pytest.raises(SystemExit) as exit_:
        gpunn.cli.main(["train", "--data", str(tmp_path / "data.npz"), "--plot", str(tmp_path / "p.png")])
    assert message in str(exit_.value.code)


def test_files_that_are_not_an_npz_and_networks_that_cannot_run_are_refused(tmp_path):
    x, y = _arrays(features=15)
    np.save(tmp_path / "plain.npy", x)
    np.savez(tmp_path / "flat.npz", X=x, y=y)
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "text.npz").write_text("X,y\n1,2\n")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "flat.npz").read_bytes()[:100])
    for argv, message in ((["--data", str(tmp_path / "plain.npy")], "is not an .npz archive"),
                          (["--data", str(tmp_path / "empty.npz")], "is not an .npz archive"),
                          (["--data", str(tmp_path / "text.npz")], "is not an .npz archive"),
                          (["--data", str(tmp_path / "cut.npz")], "cannot read"),
                          (["--data", str(tmp_path / "missing.npz")], "cannot read"),
                          (["--data", str(tmp_path / "flat.npz"), "--networks", "mlp,rnn"], "rnn: need square")):
        with pytest.raises(SystemExit) as exit_:
            gpunn.cli.main(["train", *argv, "--plot", str(tmp_path / "p.png")])
        assert message in str(exit_.value.code)


def test_labels_of_shape_n_by_1_train(capsys, tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "data.npz", X=x, y=y[:, None])
    assert gpunn.cli.main(["train", "--epochs", "1", "--networks", "mlp", "--data", str(tmp_path / "data.npz"),
                           "--plot", str(tmp_path / "p.png")]) == 0
    assert "summary mlp" in capsys.readouterr().out


def test_a_nan_loss_shows_as_a_nan_gap_and_fails_the_job(capsys, tmp_path, monkeypatch):
    import gpunn.train

    class NaNLoss(gpunn.train.CrossEntropyLoss):
        def forward(self, input, target):
            return super().forward(input, target) * float("nan")

    monkeypatch.setattr(gpunn.train, "CrossEntropyLoss", NaNLoss)  # gpunn's side only
    x, y = _arrays()
    np.savez(tmp_path / "data.npz", X=x, y=y)
    assert gpunn.cli.main(["train", "--epochs", "1", "--networks", "mlp", "--data", str(tmp_path / "data.npz"),
                           "--plot", str(tmp_path / "p.png")]) == 1
    captured = capsys.readouterr()
    assert "largest loss gap nan" in captured.out and "NaN or infinite loss in mlp" in captured.err


def test_a_name_given_twice_runs_once():
    # `gpunn check --dtypes fp64,fp64` had run every fp64 check twice.
    parser = gpunn.cli.build_parser()
    assert gpunn.cli._names(parser, "--dtypes", "fp64,fp32,fp64,", ("fp64", "fp32")) == ["fp64", "fp32"]
