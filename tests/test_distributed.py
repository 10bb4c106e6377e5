"""gpunn modules under torch.nn.parallel.DistributedDataParallel: two processes on the gloo backend (CPU,
Triton's interpreter) train a network of gpunn layers with gpunn's loss and SGD, and the torch.nn twin
of the same network under DDP; after a few steps on different data per rank, both ranks hold the same
weights, equal to the torch twin's."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gpunn
from gpunn.train import TorchMaskedLinear


def _models(seed: int):
    torch.manual_seed(seed)
    reference = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 3)).double()
    mask = gpunn.masks.local_1d(12, 12, 5)
    ours = torch.nn.Sequential(gpunn.MaskedLinear(12, 12, mask, activation="relu", dtype=torch.float64),
                               gpunn.convert(reference))
    theirs = torch.nn.Sequential(TorchMaskedLinear(ours[0]), reference)  # F.linear on W * mask, then relu
    return ours, theirs


def _worker(rank: int, world: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ours, theirs = _models(seed=0)
        ours = torch.nn.parallel.DistributedDataParallel(ours)
        theirs = torch.nn.parallel.DistributedDataParallel(theirs)
        optimizers = (gpunn.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9),
                      torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9))
        losses = (gpunn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss())
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        for _ in range(3):
            x = torch.randn(8, 12, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 3, (8,), generator=gen)
            for model, optimizer, loss_fn in zip((ours, theirs), optimizers, losses):
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
        weights = [p.detach().clone() for p in ours.module.parameters()]
        gathered = [None] * world
        dist.all_gather_object(gathered, weights)
        if rank == 0:
            torch.save({"ranks": gathered, "torch": [p.detach().clone() for p in theirs.module.parameters()]},
                       result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_ddp_two_processes_match_torch(device, tmp_path):
    if device.type != "cpu":
        pytest.skip("the two-process gloo test runs on CPU through the interpreter")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "result.pt"
    mp.spawn(_worker, args=(2, port, str(result)), nprocs=2, join=True)
    saved = torch.load(result)
    first, second = saved["ranks"]
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # DDP kept the replicas identical
    for a, b in zip(first, saved["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
