"""The main job until the full training CLI lands: an MLP of gpunn.Linear layers, trained with
gpunn.CrossEntropyLoss and gpunn.optim.SGD, beside the same torch.nn model trained with torch's loss and
SGD, from the same initial weights, on the same batches."""
from __future__ import annotations

import copy
import time

import torch

from .kernels.runtime import INTERPRET
from .losses import CrossEntropyLoss
from .modules import Linear
from .optim import SGD


def spirals(samples: int, classes: int = 3, noise: float = 0.15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` points (samples, 2) on `classes` interleaved spiral arms, and their labels (samples,)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (samples,), generator=gen)
    radius = torch.rand(samples, generator=gen)
    angle = labels * (2 * torch.pi / classes) + radius * 3.0 + noise * torch.randn(samples, generator=gen)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return points, labels


def mlp(hidden: int, classes: int, device) -> torch.nn.Sequential:
    """2 -> hidden -> hidden -> classes, gelu and relu fused into the gpunn.Linear layers."""
    return torch.nn.Sequential(
        Linear(2, hidden, device=device, activation="gelu"),
        Linear(hidden, hidden, device=device, activation="relu"),
        Linear(hidden, classes, device=device),
    )


def torch_twin(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """The same network in plain torch.nn, holding copies of the same weights."""
    layers = []
    for layer in model:
        twin = torch.nn.Linear(layer.in_features, layer.out_features, device=layer.weight.device)
        twin.load_state_dict(copy.deepcopy(layer.state_dict()))
        layers.append(twin)
        if layer.activation == "gelu":
            layers.append(torch.nn.GELU())
        elif layer.activation == "relu":
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train(epochs: int, batch_size: int, lr: float, hidden: int, samples: int, seed: int,
          device: str | None) -> int:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = "compiled on " + torch.cuda.get_device_name(device) if device.type == "cuda" else \
        ("the CPU through Triton's interpreter" if INTERPRET else "the CPU in plain torch (TRITON_INTERPRET unset)")
    print(f"gpunn train: MLP 2-{hidden}-{hidden}-3 on {samples} spiral points, {epochs} epochs, "
          f"batch {batch_size}, SGD lr {lr} (gpunn: its loss and SGD kernels; torch.nn: torch's); gpunn kernels "
          f"run {where}")

    x, y = spirals(samples + samples // 3, seed=seed)
    x, y = x.to(device), y.to(device)
    x_train, y_train, x_test, y_test = x[:samples], y[:samples], x[samples:], y[samples:]
    torch.manual_seed(seed)
    models = {"gpunn": mlp(hidden, 3, device)}
    models["torch.nn"] = torch_twin(models["gpunn"])
    optimizers = {"gpunn": SGD(models["gpunn"].parameters(), lr=lr),
                  "torch.nn": torch.optim.SGD(models["torch.nn"].parameters(), lr=lr)}
    loss_functions = {"gpunn": CrossEntropyLoss(), "torch.nn": torch.nn.CrossEntropyLoss()}

    largest_gap = 0.0
    order = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        totals = dict.fromkeys(models, 0.0)
        permutation = torch.randperm(samples, generator=order).to(device)
        for first in range(0, samples, batch_size):
            batch = permutation[first:first + batch_size]
            for name, model in models.items():
                optimizers[name].zero_grad()
                loss = loss_functions[name](model(x_train[batch]), y_train[batch])
                loss.backward()
                optimizers[name].step()
                totals[name] += loss.item() * len(batch)
        losses = {name: total / samples for name, total in totals.items()}
        largest_gap = max(largest_gap, abs(losses["gpunn"] - losses["torch.nn"]))
        line = "  ".join(f"{name} loss {losses[name]:.4f} acc {accuracy(model, x_train, y_train):6.1%}"
                         for name, model in models.items())
        print(f"epoch {epoch}/{epochs}  {line}  |loss gap| {abs(losses['gpunn'] - losses['torch.nn']):.2e}",
              flush=True)

    elapsed = time.perf_counter() - start
    print(f"largest per-epoch loss gap between gpunn and torch.nn: {largest_gap:.2e}")
    for name, model in models.items():
        print(f"summary {name:8s} test accuracy {accuracy(model, x_test, y_test):6.1%}  "
              f"final train loss {losses[name]:.4f}")
    print(f"trained in {elapsed:.1f} s")
    return 0
