"""The main job, `python -m gpunn train`: three networks built from gpunn layers, trained with gpunn's
loss and SGD kernels, each beside the same network in plain torch (same initial weights, same batches,
torch's loss and SGD), on handwritten digits.

Networks (C classes, images S x S, F = S * S features):
- mlp:   Linear(F, 64, relu) -> Linear(64, 64, gelu) -> Linear(64, C)            (torch: nn.Linear + activations)
- local: LocallyConnected2d(1 -> 8 channels, 3x3, stride 2) -> ReLU -> MaskedLinear(the 3x3 neighbourhoods of
         those 8 maps -> 8 maps, relu) -> Linear(8 (S/2)^2, C)     (torch: unfold + einsum, F.linear on W * mask)
- rnn:   RNN(S, 32) over the S rows of the image -> Linear(32, C) on the last state      (torch: nn.RNN, nn.Linear)
"""
from __future__ import annotations

import math
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import masks, reference
from .convert import convert
from .kernels.runtime import INTERPRET
from .losses import CrossEntropyLoss
from .modules import Linear, LocallyConnected2d, MaskedLinear
from .optim import SGD


def load_data(path: str | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(X (N, F) float32, each feature standardised, y (N,) int64 labels 0..C-1, a description). Default: the 8x8
    handwritten digits scikit-learn ships inside its package (no download); path: an .npz with X and y.
    Data it cannot train on ends the program with an error naming the problem (SystemExit)."""
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y, name = digits.data, digits.target, "scikit-learn's handwritten digits (8x8)"
    else:
        x, y, name = (*_read_npz(path), path)
    x, y = _checked(path, x, y)
    x = torch.as_tensor(x).reshape(len(x), -1)
    x = (x - x.mean(dim=0)) / x.std(dim=0).clamp_min(1e-3)  # standardised features: SGD converges in few steps
    _, y = np.unique(np.asarray(y), return_inverse=True)  # labels 0..C-1 whatever they were
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order], torch.as_tensor(y, dtype=torch.int64)[order], name


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """X and y of an .npz file (no pickled objects)."""
    not_npz = f"error: {path} is not an .npz archive of arrays X and y (np.savez writes one)"
    try:
        with open(path, "rb") as file:
            # An archive is a zip file; np.load would take anything else for a pickle (or an empty file for an
            # error of its own) and say so.
            if file.read(4) != b"PK\x03\x04":
                raise SystemExit(not_npz)
        data = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise SystemExit(f"error: cannot read {path}: {error}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise SystemExit(not_npz)
    with data:
        if "X" not in data or "y" not in data:
            raise SystemExit(f"error: {path} must hold arrays X (N, features) and y (N,)")
        try:
            return data["X"], data["y"]
        except ValueError as error:  # object arrays: numpy refuses to unpickle them
            raise SystemExit(f"error: {path}: {error}") from None


def _checked(path: str | None, x, y) -> tuple[np.ndarray, np.ndarray]:
    """X as float32 and y as a flat array, refused with a clear error where training on them cannot work."""
    where = path or "the data"
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: {where}: X must be numbers: {error}") from None
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise SystemExit(f"error: {where}: y must hold one class label per example, (N,) or (N, 1); got shape "
                         f"{y.shape} (one-hot labels: take their argmax)")
    if x.ndim == 0 or len(x) != len(y):
        raise SystemExit(f"error: {where}: X has {len(x) if x.ndim else 0} examples and y {len(y)} labels")
    if len(x) < 2 or x[0].size == 0:
        raise SystemExit(f"error: {where}: training needs at least 2 examples of at least 1 feature; X has shape "
                         f"{x.shape}")
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        raise SystemExit(f"error: {where}: X holds NaN or infinite values in {len(rows)} of its examples (the "
                         f"first: {', '.join(map(str, rows[:5]))})")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise SystemExit(f"error: {where}: y holds NaN or infinite labels")
    return x, y


class TorchMaskedLinear(torch.nn.Module):
    """The plain-torch twin of gpunn.MaskedLinear: F.linear on the masked weight, then the activation."""

    def __init__(self, layer: MaskedLinear):
        super().__init__()
        self.weight = torch.nn.Parameter(layer.weight.detach().clone())
        self.bias = torch.nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("mask", layer.mask.clone())
        self.activation = layer.activation

    def forward(self, x):
        return reference.masked_linear(x, self.weight, self.mask, self.bias, self.activation)


class TorchLocallyConnected2d(torch.nn.Module):
    """The plain-torch twin of gpunn.LocallyConnected2d: F.unfold, then one einsum with every position's
    own weights."""

    def __init__(self, layer: LocallyConnected2d):
        super().__init__()
        self.weight = torch.nn.Parameter(layer.weight.detach().clone())
        self.bias = torch.nn.Parameter(layer.bias.detach().clone())
        self.stride, self.padding = layer.stride, layer.padding

    def forward(self, x):
        return reference.locally_connected2d(x, self.weight, self.bias, self.stride, self.padding)


class Reshape(torch.nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(len(x), *self.shape)


class LastState(torch.nn.Module):
    """An RNN over the rows of (N, S, S) images, returning its last layer's final state (N, H)."""

    def __init__(self, rnn: torch.nn.RNN):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[1][-1]


def networks(features: int, classes: int, side: int | None, device) -> dict[str, tuple[torch.nn.Module, ...]]:
    """name -> (gpunn network, torch network) from the same initial weights."""
    pairs = {}
    mlp = torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                              torch.nn.GELU(), torch.nn.Linear(64, classes)).to(device)
    pairs["mlp"] = (convert(mlp), mlp)
    if side is not None:
        # The image needs no gradient: the locally connected layer reads it first.
        local = LocallyConnected2d(1, 8, (side, side), 3, stride=2, padding=1, device=device)
        maps = (8, *local.weight.shape[1:3])
        mask = masks.local_2d(maps, 3, padding=1, out_channels=8)
        masked = MaskedLinear(math.prod(maps), mask.shape[0], mask, activation="relu", device=device)
        head = Linear(mask.shape[0], classes, device=device)
        ours = torch.nn.Sequential(Reshape(1, side, side), local, torch.nn.ReLU(), Reshape(-1), masked, head)
        theirs = torch.nn.Sequential(Reshape(1, side, side), TorchLocallyConnected2d(local), torch.nn.ReLU(),
                                     Reshape(-1), TorchMaskedLinear(masked),
                                     torch.nn.Linear(mask.shape[0], classes, device=device))
        theirs[-1].load_state_dict(head.state_dict())
        pairs["local"] = (ours, theirs.to(device))
        rnn = torch.nn.Sequential(Reshape(side, side), LastState(torch.nn.RNN(side, 32, batch_first=True)),
                                  torch.nn.Linear(32, classes)).to(device)
        pairs["rnn"] = (convert(rnn), rnn)
    return pairs


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of rows of x (N, features) whose largest logit is their label in y (N,)."""
    return (model(x).argmax(dim=1) == y).float().mean().item()


class Progress:
    """A one-line progress bar on a terminal; on a pipe, nothing until the epoch's line."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.live = total, label, sys.stdout.isatty()

    def update(self, done: int) -> None:
        if self.live:
            filled = 30 * done // self.total
            print(f"\r  {self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}", end="", flush=True)

    def close(self) -> None:
        if self.live:
            print("\r" + " " * 80 + "\r", end="", flush=True)


def plot(curves: dict[str, dict[str, list[float]]], path: Path) -> str:
    """Loss per epoch of every network, gpunn solid and torch dashed; the PNG's path, or why none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed: no plot"
    figure, axes = plt.subplots(figsize=(7, 4))
    for index, (network, sides) in enumerate(curves.items()):
        color = f"C{index}"
        for side, style in (("gpunn", "-"), ("torch", "--")):
            axes.plot(range(1, len(sides[side]) + 1), sides[side], style, color=color, label=f"{network} ({side})")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("training loss")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    path = path if path.suffix else path.with_name(path.name + ".png")  # where matplotlib writes a bare name
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)


def train(epochs: int, batch_size: int, lr: float, momentum: float, data: str | None, only: list[str] | None,
          plot_path: str, seed: int, device: str | torch.device | None) -> int:
    """The main job (`python -m gpunn train`, whose --help gives the arguments): trains each network with
    gpunn and its torch twin side by side, prints and plots their losses; the exit status (0, or 1 where a
    loss was not finite)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = ("compiled on " + torch.cuda.get_device_name(device) if device.type == "cuda" else
             "on the CPU through Triton's interpreter" if INTERPRET else "on the CPU in plain torch (no interpreter)")
    x, y, name = load_data(data, seed)
    features, classes = x.shape[1], int(y.max()) + 1
    side = math.isqrt(features) if math.isqrt(features) ** 2 == features else None
    split = len(x) * 4 // 5
    x, y = x.to(device), y.to(device)
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    torch.manual_seed(seed)
    pairs = networks(features, classes, side, device)
    if only:
        missing = [network for network in only if network not in pairs]
        if missing:
            raise SystemExit(f"error: --networks {','.join(missing)}: need square images, and X's {features} "
                             f"features are not one")
        pairs = {k: v for k, v in pairs.items() if k in only}
    print(f"gpunn train: {name}: {split} training and {len(x) - split} test examples, {features} features, "
          f"{classes} classes; networks {', '.join(pairs)}; {epochs} epoch{'s' * (epochs != 1)}, batch {batch_size}, "
          f"SGD lr {lr} momentum {momentum}; gpunn kernels run {where}")
    if side is None:
        print("  (features are not a square image: the local and rnn networks are skipped)")

    loss_fns = {"gpunn": CrossEntropyLoss(), "torch": torch.nn.CrossEntropyLoss()}
    optimizers = {(network, "gpunn"): SGD(ours.parameters(), lr=lr, momentum=momentum)
                  for network, (ours, _) in pairs.items()}
    optimizers.update({(network, "torch"): torch.optim.SGD(theirs.parameters(), lr=lr, momentum=momentum)
                       for network, (_, theirs) in pairs.items()})
    curves = {network: {"gpunn": [], "torch": []} for network in pairs}
    largest_gap = {network: 0.0 for network in pairs}
    order = torch.Generator().manual_seed(seed + 1)
    batches = math.ceil(split / batch_size)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        permutation = torch.randperm(split, generator=order).to(device)
        totals = {(network, side_): 0.0 for network in pairs for side_ in ("gpunn", "torch")}
        correct = dict.fromkeys(totals, 0)
        progress = Progress(batches, f"epoch {epoch}/{epochs}")
        for step, first in enumerate(range(0, split, batch_size), 1):
            batch = permutation[first:first + batch_size]
            for network, models in pairs.items():
                for side_, model in zip(("gpunn", "torch"), models):
                    optimizer = optimizers[network, side_]
                    optimizer.zero_grad()
                    logits = model(x_train[batch])
                    loss = loss_fns[side_](logits, y_train[batch])
                    loss.backward()
                    optimizer.step()
                    totals[network, side_] += loss.item() * len(batch)
                    correct[network, side_] += (logits.argmax(dim=1) == y_train[batch]).sum().item()
            progress.update(step)
        progress.close()
        parts = []
        for network in pairs:
            losses = {side_: totals[network, side_] / split for side_ in ("gpunn", "torch")}
            for side_ in losses:
                curves[network][side_].append(losses[side_])
            gap = abs(losses["gpunn"] - losses["torch"])
            if not gap <= largest_gap[network]:  # a NaN loss on either side makes the gap NaN, and keeps it so
                largest_gap[network] = gap
            parts.append(f"{network}: loss {losses['gpunn']:.4f} / {losses['torch']:.4f} acc "
                         f"{correct[network, 'gpunn'] / split:.1%} / {correct[network, 'torch'] / split:.1%}")
        print(f"epoch {epoch}/{epochs} (gpunn / torch; accuracy over the epoch's batches)  " + "  ".join(parts),
              flush=True)

    elapsed = time.perf_counter() - start
    for network, (ours, theirs) in pairs.items():
        print(f"summary {network:5s} gpunn test accuracy {accuracy(ours, x_test, y_test):6.1%}  torch test accuracy "
              f"{accuracy(theirs, x_test, y_test):6.1%}  largest loss gap {largest_gap[network]:.2e}")
    print(f"trained in {elapsed:.1f} s")
    print(f"plot: {plot(curves, Path(plot_path))}")
    failed = [network for network, gap in largest_gap.items() if not math.isfinite(gap)]
    if failed:
        print(f"error: a NaN or infinite loss in {', '.join(failed)} (gpunn's, torch's or both: see the epoch "
              f"lines)", file=sys.stderr)
        return 1
    return 0


__all__ = ["load_data", "networks", "train"]
