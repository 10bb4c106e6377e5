"""GPU probe: how much of a host-bound training step CUDA graphs recover. For small and host-bound models,
one step (forward, cross-entropy, backward, SGD with momentum) run eagerly and replayed from a CUDA graph
(bench.harness.capture_cuda_graph), for gpunn and, where torch has the same model, for torch.

    python -m bench.probes.graph_step        (TRITON_INTERPRET=1 on the CPU: one eager step of each, untimed)

Each line: us a step, wall clock over STEPS steady-state steps between two synchronisations (not
do_bench: its L2 flush before every call would hide up to ~85 us of host time behind the GPU), bf16.
gpunn's eager cross-entropy syncs with the device once a call (its target check, as torch's CPU
loss raises; skipped inside a graph), which is part of what the graph saves.
"""
import copy
import os
import time

import torch

import gpunn
from gpunn import masks

from ..harness import capture_cuda_graph

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEPS = int(os.environ.get("STEPS", 200))


def models(dtype: torch.dtype) -> dict:
    """name -> (input batch, target classes, gpunn model, its torch twin or None). Sizes shrink on the CPU."""
    small = DEVICE.type == "cpu"
    width, side, batch = (64, 8, 4) if small else (4096, 32, 64)
    kw = dict(device=DEVICE, dtype=dtype)
    mlp = torch.nn.Sequential(torch.nn.Linear(width // 4, width // 4, **kw), torch.nn.ReLU(),
                              torch.nn.Linear(width // 4, width // 4, **kw), torch.nn.ReLU(),
                              torch.nn.Linear(width // 4, 10, **kw))
    dense = torch.nn.Sequential(torch.nn.Linear(width, width, **kw), torch.nn.ReLU(), torch.nn.Linear(width, 10, **kw))
    masked = torch.nn.Sequential(gpunn.MaskedLinear(width, width, masks.local_1d(width, width, 9), activation="relu",
                                                    **kw), gpunn.Linear(width, 10, **kw))
    local = torch.nn.Sequential(gpunn.LocallyConnected2d(4, 4, (side, side), 3, padding=1, **kw), torch.nn.Flatten(),
                                gpunn.Linear(4 * side * side, 10, **kw))
    return {
        f"mlp 3 layers of {width // 4}, batch 16": (torch.randn(16, width // 4, **kw), gpunn.convert(mlp), mlp),
        f"dense {width} -> {width} -> 10, batch 16": (torch.randn(16, width, **kw), gpunn.convert(dense), dense),
        f"masked band of 9 at {width}, batch {batch}": (torch.randn(batch, width, **kw), masked, None),
        f"locally connected 4 -> 4 channels {side}x{side} 3x3, batch {batch}":
            (torch.randn(batch, 4, side, side, **kw), local, None),
    }


def trainer(model: torch.nn.Module, x: torch.Tensor, gpunn_step: bool):
    model = copy.deepcopy(model)
    loss_fn = gpunn.CrossEntropyLoss() if gpunn_step else torch.nn.CrossEntropyLoss()
    optimizer = (gpunn.optim.SGD if gpunn_step else torch.optim.SGD)(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.randint(0, 10, (x.shape[0],), device=x.device)

    def step():
        optimizer.zero_grad(set_to_none=False)  # the graph replays into the same gradient tensors
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def us_per_step(step) -> float:
    if DEVICE.type == "cpu":
        step()
        return 0.0
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / STEPS * 1e6


def main() -> None:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    print(f"training steps on {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'cpu'}, {dtype}")
    for name, (x, ours, theirs) in models(dtype).items():
        for label, model, gpunn_step in (("gpunn", ours, True), ("torch", theirs, False)):
            if model is None:
                continue
            eager = us_per_step(trainer(model, x, gpunn_step))
            if DEVICE.type == "cuda":
                graph, _ = capture_cuda_graph(trainer(model, x, gpunn_step))
                replayed = us_per_step(graph.replay)
                print(f"{name}, {label}: eager {eager:8.1f} us/step, graph {replayed:8.1f} us/step "
                      f"({eager / replayed:.1f}x)")
            else:
                print(f"{name}, {label}: one eager step ran")


if __name__ == "__main__":
    main()
