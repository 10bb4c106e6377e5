"""The main job, `python -m gpunn train`, end to end on a tiny setting."""
from __future__ import annotations

import re

from helpers import count_launches

import gpunn.cli


def test_train_runs_and_matches_torch(capsys):
    with count_launches() as launches:
        assert gpunn.cli.main(["train", "--epochs", "2", "--samples", "192", "--hidden", "16",
                               "--batch-size", "64"]) == 0
    # gpunn's side trains with gpunn's loss and optimizer kernels: 3 batches x 2 epochs.
    assert launches["sgd_kernel"] == launches["cross_entropy_backward_kernel"] == 6
    out = capsys.readouterr().out
    assert "epoch 2/2" in out
    gap = float(re.search(r"largest per-epoch loss gap between gpunn and torch.nn: (\S+)", out).group(1))
    assert gap < 1e-4
    assert re.search(r"summary gpunn\s+test accuracy", out)
    assert re.search(r"summary torch.nn\s+test accuracy", out)


def test_help_lists_train(capsys):
    try:
        gpunn.cli.main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert "train" in capsys.readouterr().out
