"""The main job, `python -m gpunn train`, end to end on small data."""
from __future__ import annotations

import re

import numpy as np
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
        try:
            gpunn.cli.main(argv)
        except SystemExit as exit_:
            assert exit_.code == (0 if argv == ["--help"] else 2)
    captured = capsys.readouterr()
    assert "train" in captured.out and "unknown cnn" in captured.err
