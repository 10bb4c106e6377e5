"""Test setup: run gpunn's Triton kernels on CPU through Triton's interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence here, before gpunn is imported.
With a CUDA device the same tests run the compiled kernels on it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gpunn.kernels import runtime  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if not runtime.triton_runs_on(DEVICE):
    raise RuntimeError("gpunn's tests need the Triton path: a CUDA device, or TRITON_INTERPRET=1 on CPU")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output starts NaN-filled: an element a kernel fails to write fails the test."""
    with runtime.poison_outputs():
        yield


@pytest.fixture(autouse=True)
def ieee_fp32():
    """float32 matmuls are IEEE unless a test opts into TF32 itself."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)
