"""gpunn modules under DistributedDataParallel and FSDP2 (fully_shard): two processes on the gloo backend
(CPU, Triton's interpreter) train a network of gpunn layers with gpunn's loss and SGD beside the torch.nn
twin of the same network, wrapped the same way; after a few steps on different data per rank, both ranks
hold the same weights, equal to the torch twin's."""
from __future__ import annotations

import os
import sys
from datetime import timedelta

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


def _wrap(model: torch.nn.Module, how: str) -> torch.nn.Module:
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):  # gpunn.Linear and gpunn.MaskedLinear are nn.Linear too
            fully_shard(layer)
    return fully_shard(model)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _written_by(optimizer) -> list[torch.Tensor]:
    """The tensors a step writes: the parameters (FSDP2's DTensors, whose version counters are not their
    local shards') and the momentum buffers made by earlier steps."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return params + [optimizer.state[p]["momentum_buffer"] for p in params if p in optimizer.state]


def _worker(rank: int, world: int, port: int, how: str, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        ours, theirs = (_wrap(model, how) for model in _models(seed=0))
        optimizers = (gpunn.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9),
                      torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9))
        losses = (gpunn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss())
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        bumped = []
        for _ in range(3):
            x = torch.randn(8, 12, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 3, (8,), generator=gen)
            for model, optimizer, loss_fn in zip((ours, theirs), optimizers, losses):
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                written = _written_by(optimizer) if optimizer is optimizers[0] else []
                versions = [tensor._version for tensor in written]
                optimizer.step()
                bumped += [tensor._version > version for tensor, version in zip(written, versions)]
        weights = [_full(p.detach()).clone() for p in ours.parameters()]
        reference = [_full(p.detach()).clone() for p in theirs.parameters()]
        gathered = [None] * world
        dist.all_gather_object(gathered, weights)
        if rank == 0:
            torch.save({"ranks": gathered, "torch": reference, "bumped": bumped}, result_path)
    finally:
        # Rank 0 hosts the rendezvous store: a rank that tears down after rank 0 has exited waits on it
        # (a hang CI met once), so every rank passes this barrier before any leaves.
        dist.barrier()
        dist.destroy_process_group()
    # A clean run leaves without the interpreter's finalization, where gloo's threads can still hold work and
    # abort the process (pytorch/pytorch#179291). A run of the FSDP2 case under load once ended with
    # "terminate called without an active exception" (SIGABRT) in rank 0, where exactly is not known: this
    # rules out the teardown. The result is saved; an error above still propagates and fails the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_two_processes_match_torch(device, tmp_path, how):
    if device.type != "cpu":
        pytest.skip("the two-process gloo test runs on CPU through the interpreter")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "result.pt"
    mp.spawn(_worker, args=(2, port, how, str(result)), nprocs=2, join=True)
    saved = torch.load(result)
    first, second = saved["ranks"]
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # DDP kept the replicas identical
    for a, b in zip(first, saved["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Every write moved its tensor's version counter (a graph that saved it then refuses a stale backward):
    # 6 parameters in each of 3 steps, and their buffers in the last 2.
    assert len(saved["bumped"]) == 6 * 3 + 6 * 2 and all(saved["bumped"])
