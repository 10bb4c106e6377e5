"""Autotuned kernels launched past Triton's autotuner once their signature is tuned (gpunn.kernels.tuned):
the pick and the heuristic values a later launch reuses must be those its own arguments would get."""
from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.autotuner import Autotuner

import gpunn.functional as F
from gpunn.kernels import dense, layout, local, masked, rnn, tiling
from gpunn.kernels.runtime import Rows
from gpunn.kernels.tuned import Tuned, tuned

from helpers import assert_close, case_seed, leaf64, reference_linear


@pytest.fixture
def forward_tuner_calls(monkeypatch):
    """Forgets the dense forward's tuned signatures and counts the launches that tune one (through Triton's
    autotuner, or with the lone config the pruner keeps)."""
    kernel = dense.dense_forward_kernel
    kernel.clear()
    calls = []
    first_launch = kernel._first_launch

    def counted(signature, *args, **kwargs):
        calls.append(signature)
        return first_launch(signature, *args, **kwargs)

    monkeypatch.setattr(kernel, "_first_launch", counted)
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


def test_a_lone_config_after_pruning_is_launched_untimed(device, monkeypatch):
    # Triton 3.6's autotuner times a config even when the pruner keeps only it; a tuned kernel does not.
    @tuned
    @triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"],
                     prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
                         c for c in configs if c.kwargs["BLOCK"] >= nargs["n"]][:1]})
    @triton.jit
    def double_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n) * 2, mask=offsets < n)

    def untimed(*args, **kwargs):
        raise AssertionError("a lone config was timed")

    monkeypatch.setattr(double_kernel.autotuner, "_bench", untimed)
    monkeypatch.setattr(double_kernel.autotuner, "run", untimed)  # Triton 3.9's would not time it either
    for n in (12, 20, 20):
        src, dst = torch.randn(n, device=device), torch.full((n,), float("nan"), device=device)
        double_kernel[(1,)](src, dst, n)
        assert torch.equal(dst, src * 2)
    assert double_kernel.autotuner.best_config.kwargs == {"BLOCK": 32}
    assert len(double_kernel._plans) == 2


def test_a_nan_constexpr_is_never_stored(device, forward_tuner_calls):
    # NaN never equals itself: a stored plan would never be found again, and the plans would pile up.
    x, w = torch.randn(5, 8, device=device, dtype=torch.float64), torch.randn(3, 8, device=device, dtype=torch.float64)
    for _ in range(3):
        out = F.linear(x, w, None, "leaky_relu", float("nan"))
        expected = torch.nn.functional.leaky_relu(torch.nn.functional.linear(x, w), float("nan"))
        torch.testing.assert_close(out, expected, equal_nan=True)
    assert len(forward_tuner_calls) == 3 and not dense.dense_forward_kernel._plans


def _launch_every_tuned_kernel(rnd: random.Random, dtype: torch.dtype) -> None:
    """One call of each launcher of a tuned kernel family, at shapes and options drawn from rnd."""
    m, n, k = rnd.choice([1, 3, 17, 100, 300, 5000]), rnd.choice([8, 24, 65, 128]), rnd.choice([8, 40, 64, 65])
    activation, flag = rnd.choice([None, "relu", "gelu", "leaky_relu"]), rnd.random() < 0.5
    torch.backends.cuda.matmul.fp32_precision = rnd.choice(["tf32", "ieee"])
    empty = lambda *shape: torch.empty(*shape, dtype=dtype)  # noqa: E731
    x = empty(k, m).t() if rnd.random() < 0.5 else empty(m, k)  # row strides that change ROW_ALIGN
    w, b, dy = empty(n, k), empty(n) if flag else None, empty(m, n)
    dense.forward(Rows.of(x), w, b, activation, 0.01, flag)
    dense.grad_input(Rows.of(dy), w)
    dense.grad_weight(Rows.of(dy), Rows.of(x), (n, k))
    blocks = layout.layout_for(torch.rand(n, k, generator=torch.Generator().manual_seed(m)) < 0.5, (32, 32))
    masked.forward(Rows.of(x), w, b, activation, 0.01, flag, layout=blocks)
    masked.grad_input(Rows.of(dy), empty(m, n), w, activation, layout=blocks)
    masked.grad_weight(Rows.of(dy), empty(m, n), Rows.of(x), (n, k), activation, flag, layout=blocks)
    geometry = local.Geometry((3, 3), (1, 1) if flag else (2, 2), (1, 1), (1, 1))
    batch, channels, out_channels = m % 40 + 1, 3, n % 16 + 1
    (oh, ow), images = geometry.output_size(8, 8), empty(m % 40 + 1, 3, 8, 8)
    taps = empty(out_channels, oh * ow, channels * 9)
    local.forward(images, taps, empty(out_channels, oh * ow) if flag else None, geometry)
    local.grad_input(empty(batch, out_channels, oh, ow), taps, tuple(images.shape), geometry)
    local.grad_weight(images if rnd.random() < 0.5 else None, empty(batch, out_channels, oh, ow), tuple(images.shape),
                      tuple(taps.shape), geometry, flag)
    cell = "tanh" if flag else "relu"
    w_ih, w_hh, b_cell = empty(n, k), empty(n, n), empty(n) if flag else None
    out = rnn.forward(empty(m, k), empty(m, n), w_ih, w_hh, b_cell, b_cell, cell)
    rnn.grad_input(dy, out, w_ih, w_hh if flag else None, cell)
    rnn.grad_weight(dy, out, empty(m, k), empty(m, n) if flag else None, k, cell, flag)


@pytest.mark.skipif(torch.cuda.is_available(), reason="stubs the interpreter's launch to record it")
def test_tuned_launches_match_the_autotuners_with_the_gpu_tiles(monkeypatch):
    # Every tuned kernel with the GPU's tile tables (many configs, so the autotuner keys and picks), timings
    # faked from (config, key): launches through the tuned wrappers and through the bare autotuners must
    # reach the JIT function with the same arguments, launch options and grids.
    kernels = [(module, name) for module in (dense, masked, local, rnn) for name, value in vars(module).items()
               if isinstance(value, Tuned)]
    assert len(kernels) == 12
    for module, name in kernels:
        autotuner = getattr(module, name).autotuner
        names = list(autotuner.configs[0].kwargs)
        gpu = ([triton.Config(dict(zip(names, tile[:3])), num_stages=tile[3], num_warps=tile[4])
                for tile in tiling.GPU_TILES] if len(names) == 3 else
               [triton.Config({names[0]: rows}, num_stages=stages, num_warps=warps)
                for rows, stages, warps in tiling.GPU_BATCH_TILES])
        monkeypatch.setattr(autotuner, "configs", gpu)

    def timing(self, *args, config, **meta):  # a function of what the autotuner's cache key holds
        named = {**self.nargs, **meta}
        key = [str(named.get(name)) for name in self.keys]
        key += [str(value.dtype) for value in named.values() if isinstance(value, torch.Tensor)]
        return [float(case_seed(str(config), *key) % 997)] * 3

    monkeypatch.setattr(Autotuner, "_bench", timing)
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        launches.append((self.fn.__name__, [arg.dtype if isinstance(arg, torch.Tensor) else arg for arg in args],
                         list(kwargs.items()), tuple(grid(named) if callable(grid) else grid)))

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", record)

    tuned_kernels = [(module, name, getattr(module, name)) for module, name in kernels]

    def play(through_tuned: bool) -> list:
        for module, name, kernel in tuned_kernels:
            kernel.clear()
            monkeypatch.setattr(module, name, kernel if through_tuned else kernel.autotuner)
        launches.clear()
        for seed, dtype in order:
            _launch_every_tuned_kernel(random.Random(seed), dtype)
        return list(launches)

    # Each draw in every dtype (bf16 and fp32 launches differ only in their pointers' dtypes under the
    # interpreter, which widens bf16 operands), and each three times: the later two find their signature.
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    order = [(seed, dtype) for seed in range(6) for dtype in dtypes] * 3
    random.Random(0).shuffle(order)

    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision  # each call draws TF32 or IEEE
    try:
        through_tuned = play(True)
        plans = sum(len(kernel._plans) for _, _, kernel in tuned_kernels)
        through_autotuners = play(False)
    finally:
        matmul.fp32_precision = previous
    assert len(through_tuned) == len(through_autotuners) > 0
    for tuned_launch, autotuned_launch in zip(through_tuned, through_autotuners):
        assert tuned_launch == autotuned_launch
    assert plans <= len(through_tuned) // 3  # the repeats took the tuned path
