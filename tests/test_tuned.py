"""Autotuned kernels launched past Triton's autotuner once their signature is tuned (gpunn.kernels.tuned):
the pick and the heuristic values a later launch reuses must be those its own arguments would get."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import gpunn.functional as F
from gpunn.kernels import dense
from gpunn.kernels.tuned import tuned

from helpers import assert_close, leaf64, reference_linear


@pytest.fixture
def forward_tuner_calls(monkeypatch):
    """Forgets the dense forward's tuned signatures and counts the launches that go through its autotuner."""
    kernel = dense.dense_forward_kernel
    kernel.clear()
    calls = []
    run = kernel.autotuner.run

    def counted(*args, **kwargs):
        calls.append(args)
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel.autotuner, "run", counted)
    yield calls
    kernel.clear()


def _check_linear(m: int, k: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    x, w, b = (torch.randn(*shape, device=device, dtype=dtype) for shape in ((m, k), (n, k), (n,)))
    out = F.linear(x, w, b, "gelu")
    assert_close(out, reference_linear(leaf64(x), leaf64(w), leaf64(b), "gelu"), dtype, f"{m}x{k}->{n} {dtype}")
    return out


def test_a_tuned_signature_launches_past_the_autotuner(device, forward_tuner_calls):
    x, w, b = torch.randn(13, 40, device=device), torch.randn(24, 40, device=device), torch.randn(24, device=device)
    first = F.linear(x, w, b, "relu")
    second = F.linear(x, w, b, "relu")
    assert len(forward_tuner_calls) == 1
    assert torch.equal(first, second)
    # Another batch size in the same bucket keeps the pick (the grid still follows the rows).
    _check_linear(9, 40, 24, torch.float32, device)
    _check_linear(16, 40, 24, torch.float32, device)
    assert len(forward_tuner_calls) == 2  # gelu is another signature than relu, once


@pytest.mark.parametrize("order", [(64, 65), (65, 64)])
def test_a_heuristic_input_separates_signatures(device, forward_tuner_calls, order):
    # K = 64 and 65 differ only in EVEN_K (whether the reduction needs a mask): each gets its own value.
    for k in order + order:
        _check_linear(7, k, 33, torch.float64, device)
    assert len(forward_tuner_calls) == 2


def test_dtypes_separate_signatures(device, forward_tuner_calls):
    for dtype in (torch.float64, torch.float32, torch.float64, torch.float32):
        _check_linear(5, 48, 17, dtype, device)
    assert len(forward_tuner_calls) == 2


def test_a_tensor_argument_must_be_named_as_a_pointer(device):
    @tuned
    @triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=["n"])
    @triton.jit
    def copy_kernel(src, dst_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(dst_ptr + offsets, tl.load(src + offsets, mask=offsets < n), mask=offsets < n)

    src, dst = torch.randn(16, device=device), torch.empty(16, device=device)
    with pytest.raises(TypeError, match=r"\[.src.\] are not named \*_ptr"):
        copy_kernel[(1,)](src, dst, 16)
