"""gpunn.functional.masked_linear against the dense torch reference in float64:
act(F.linear(x, W.masked_fill(~mask, 0), b)), forward and every gradient, with NaN and Inf planted in
the masked-out weights."""
from __future__ import annotations

import pytest
import torch
from helpers import (ACTIVATIONS, TorchOpSpy, assert_close, case_seed, count_launches, dtypes_for,
                     leaf64, raises_exactly, reference_linear)

import gpunn
from gpunn.kernels.work import count_work
from gpunn import masks
from gpunn.kernels.runtime import block_counts

MASKED_KERNELS = ("masked_forward_kernel", "masked_grad_input_kernel", "masked_grad_weight_kernel")


def _empty_rows_and_columns(in_features: int, out_features: int) -> torch.Tensor:
    mask = masks.random(in_features, out_features, 0.4, generator=torch.Generator().manual_seed(5))
    mask[3:40] = False  # outputs with no connection: act(bias), and whole block rows of them
    mask[:, 50:] = False  # inputs no output reads: zero input gradient
    mask[:, 7] = False
    return mask


# (name, mask builder): every mask family of the issue, at odd sizes.
MASKS = {
    "local_1d": lambda: masks.local_1d(100, 130, 9),
    "local_1d_narrow": lambda: masks.local_1d(131, 17, 5),
    "local_2d_pad1": lambda: masks.local_2d((3, 7, 9), 3, padding=1, out_channels=2),
    "local_2d_stride2": lambda: masks.local_2d((2, 9, 8), 3, stride=2, out_channels=3),
    "local_2d_mixed": lambda: masks.local_2d((1, 6, 11), (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
    "random_0.05": lambda: masks.random(90, 70, 0.05, generator=torch.Generator().manual_seed(1)),
    "random_0.5": lambda: masks.random(77, 65, 0.5, generator=torch.Generator().manual_seed(2)),
    "random_0.97": lambda: masks.random(64, 96, 0.97, generator=torch.Generator().manual_seed(3)),
    "empty_rows_and_columns": lambda: _empty_rows_and_columns(70, 66),
    "full": lambda: torch.ones(45, 70, dtype=torch.bool),
    "none": lambda: torch.zeros(33, 20, dtype=torch.bool),
}


def _poison_masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """weight with NaN, +Inf and -Inf at its masked-out positions (the kernels must never read them)."""
    poison = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=weight.dtype)
    fill = poison[torch.arange(weight.numel()) % 3].view(weight.shape).to(weight.device)
    return torch.where(mask, weight, fill)


def run_masked_case(device, dtype, mask, activation=None, lead=(37,), slope=0.01, bias=True, layout_block=None,
                    x=None, grad_output=None):
    """Forward and backward through masked_linear and the float64 dense reference; compare everything.

    Returns (output, {name: gradient}).
    """
    n, k = mask.shape
    gen = torch.Generator().manual_seed(case_seed(n, k, lead, str(activation), str(dtype)))
    mask = mask.to(device)
    if x is None:
        x = torch.randn(*lead, k, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    fan_in = mask.sum(1, keepdim=True).clamp(min=1).double().cpu()
    weight = (torch.randn(n, k, generator=gen, dtype=torch.float64) / fan_in.sqrt()).to(device=device, dtype=dtype)
    weight = _poison_masked(weight, mask).requires_grad_()
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype).requires_grad_() if bias else None
    mask_or_layout = mask if layout_block is None else masks.block_layout(mask, dtype, layout_block)

    out = gpunn.functional.masked_linear(x, weight, mask_or_layout, b, activation, slope)
    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(b)
    ref = reference_linear(x64, w64.masked_fill(~mask, 0), b64, activation, slope)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "output")

    if grad_output is None:
        grad_output = torch.randn(ref.shape, generator=gen).to(device=device, dtype=dtype)
    names = [name for name, t in (("input", x), ("weight", weight), ("bias", b)) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, [t for t in (x, weight, b) if t is not None and t.requires_grad], grad_output)
    grads64 = torch.autograd.grad(ref, [t for t in (x64, w64, b64) if t is not None and t.requires_grad],
                                  grad_output.double())
    grads = dict(zip(names, grads))
    for name, g64 in zip(names, grads64):
        assert grads[name].dtype == dtype
        assert_close(grads[name], g64, dtype, f"grad {name}")
    if "weight" in grads:
        assert torch.equal(grads["weight"][~mask], torch.zeros_like(grads["weight"][~mask])), \
            "masked-out weights must get exactly zero gradient"
    return out, grads


@pytest.mark.parametrize("name", list(MASKS))
def test_mask_families(device, name):
    run_masked_case(device, torch.float64, MASKS[name](), "gelu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["local_1d", "local_2d_pad1", "random_0.5"])
def test_every_dtype(device, dtype, name):
    if dtype not in dtypes_for(device):
        pytest.skip("bfloat16 is checked on a GPU only (the interpreter cannot compute it natively)")
    run_masked_case(device, dtype, MASKS[name](), "silu")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(device, activation):
    run_masked_case(device, torch.float64, MASKS["local_2d_stride2"](), activation)


@pytest.mark.parametrize("slope", [0.2, -0.5])
def test_leaky_relu_slopes(device, slope):
    run_masked_case(device, torch.float64, MASKS["random_0.5"](), "leaky_relu", slope=slope)


@pytest.mark.parametrize("block", [(16, 16), (32, 128), (128, 16)], ids=str)
def test_block_sizes(device, block):
    # The weight block is the layout's: blocks smaller and larger than the matrix, and lopsided ones.
    for name in ("local_1d", "empty_rows_and_columns"):
        run_masked_case(device, torch.float64, MASKS[name](), "tanh", layout_block=block)


@pytest.mark.parametrize("lead", [(), (2, 3, 5), (1,)], ids=["1d", "3d", "one_row"])
def test_leading_dims(device, lead):
    run_masked_case(device, torch.float64, MASKS["local_2d_pad1"](), "relu", lead=lead)


def test_strided_input_and_grad_output(device):
    mask = MASKS["local_1d"]()
    base = torch.randn(6, 40, 2 * 100, device=device, dtype=torch.float64)
    x = base[:, ::3, ::2].transpose(0, 1).detach().requires_grad_()  # (14, 6, 100), strided every way
    grad_output = torch.randn(130, 6, 14, device=device, dtype=torch.float64).permute(2, 1, 0)
    run_masked_case(device, torch.float64, mask, "sigmoid", lead=x.shape[:-1], x=x, grad_output=grad_output)


def test_non_contiguous_weight(device):
    mask = MASKS["local_2d_stride2"]().to(device)
    n, k = mask.shape
    x = torch.randn(11, k, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, n, device=device, dtype=torch.float64).t().requires_grad_()  # column-major
    bias = torch.randn(n, device=device, dtype=torch.float64, requires_grad=True)
    out = gpunn.functional.masked_linear(x, weight, mask, bias, "relu")
    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(bias)
    ref = reference_linear(x64, w64.masked_fill(~mask, 0), b64, "relu")
    assert_close(out, ref, torch.float64, "output")
    for g, g64, name in zip(torch.autograd.grad(out, (x, weight, bias), torch.ones_like(out)),
                            torch.autograd.grad(ref, (x64, w64, b64), torch.ones_like(ref)), "xwb"):
        assert_close(g, g64, torch.float64, f"grad {name}")


def test_mask_built_under_inference_mode(device):
    with torch.inference_mode():
        mask = MASKS["local_1d"]().to(device)
        layer = gpunn.MaskedLinear(100, 130, mask, device=device, dtype=torch.float64)
        x = torch.randn(3, 100, device=device, dtype=torch.float64)
        out = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight.masked_fill(~mask, 0), layer.bias)
    assert_close(out, expected, torch.float64, "output")


def test_without_bias(device):
    run_masked_case(device, torch.float32, MASKS["random_0.05"](), None, bias=False)


def test_weight_gradient_only_and_input_gradient_only(device):
    mask = MASKS["local_2d_mixed"]().to(device)
    x = torch.randn(9, mask.shape[1], device=device, dtype=torch.float64)
    run_masked_case(device, torch.float64, mask, "gelu", x=x)  # weight and bias only
    layer = gpunn.MaskedLinear(mask.shape[1], mask.shape[0], mask, device=device, dtype=torch.float64)
    layer.requires_grad_(False)
    x.requires_grad_()
    with count_launches() as launches:
        layer(x).sum().backward()
    assert launches == {"masked_forward_kernel": 1, "masked_grad_input_kernel": 1}


def test_zero_batch(device):
    mask = MASKS["local_1d"]().to(device)
    layer = gpunn.MaskedLinear(100, 130, mask, device=device, activation="gelu")
    x = torch.randn(0, 100, device=device, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == (0, 100)
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))


def test_triton_path_runs_and_no_torch_matmul(device):
    mask = MASKS["local_2d_pad1"]().to(device)
    layer = gpunn.MaskedLinear(mask.shape[1], mask.shape[0], mask, device=device, activation="gelu")
    x = torch.randn(5, mask.shape[1], device=device, requires_grad=True)
    layer(x)  # builds and caches the layout (torch ops on the mask, once)
    with count_launches() as launches, TorchOpSpy() as spy:
        layer(x).sum().backward()
    assert launches == dict.fromkeys(MASKED_KERNELS, 1)
    assert not spy.matmuls(), spy.matmuls()


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_bitwise_deterministic(device, activation):
    mask = MASKS["random_0.5"]().to(device)
    x = torch.randn(70, mask.shape[1], device=device, requires_grad=True)
    layer = gpunn.MaskedLinear(mask.shape[1], mask.shape[0], mask, device=device, activation=activation)
    results = []
    for _ in range(2):
        out = layer(x)
        grads = torch.autograd.grad(out, (x, layer.weight, layer.bias), torch.ones_like(out))
        results.append((out, *grads))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_gradcheck(device):
    mask = masks.local_1d(11, 7, 3).to(device)
    x = torch.randn(4, 11, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 11, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: gpunn.functional.masked_linear(t[0], t[1], mask, t[2], "tanh"),
                                    (x, w, b))


def test_band_mask_does_a_small_fraction_of_the_dense_work(device):
    """local_1d window 9 at 1024 features: the dot work the interpreter actually executes, forward and
    backward, against the dense layer's at the same shape."""
    if device.type != "cpu":
        pytest.skip("counts the multiply-adds Triton's interpreter executes")
    mask = masks.local_1d(1024, 1024, 9)
    x = torch.randn(64, 1024, requires_grad=True)
    masked = gpunn.MaskedLinear(1024, 1024, mask)
    dense = gpunn.Linear(1024, 1024)
    work = {}
    for name, layer in (("masked", masked), ("dense", dense)):
        with count_work() as forward:
            out = layer(x)
        with count_work() as backward:
            out.backward(torch.ones_like(out))
        work[name] = (forward.dot_flops // 2, backward.dot_flops // 2)
    dense_macs = 64 * 1024 * 1024
    assert work["dense"] == (dense_macs, 2 * dense_macs)  # the counter sees every dense multiply-add
    layout = masks.block_layout(mask, torch.float32)
    assert layout.visited_blocks / layout.dense_blocks < 0.15, layout
    # Exactly the listed blocks' work: each listed block once per row of x, forward; twice backward
    # (input and weight gradients).
    listed_macs = 64 * layout.visited_blocks * layout.block[0] * layout.block[1]
    assert work["masked"] == (listed_macs, 2 * listed_macs)


def test_block_counters(device):
    mask = MASKS["local_1d"]().to(device)
    layout = masks.block_layout(mask, torch.float32)
    before = block_counts()
    run_masked_case(device, torch.float32, mask)
    after = block_counts()
    for kernel in MASKED_KERNELS:
        visited, dense = (a - b for a, b in zip(after[kernel], before.get(kernel, (0, 0))))
        assert (visited, dense) == (layout.visited_blocks, layout.dense_blocks), kernel
    assert 0 < layout.visited_blocks < layout.dense_blocks


def _bad_masks(device):
    """(what is wrong, the mask for a (6, 5) weight, the error masked_linear raises, its message)."""
    yield "shape", torch.ones(5, 6, dtype=torch.bool, device=device), RuntimeError, "does not match"
    yield "dtype", torch.ones(6, 5, device=device), RuntimeError, "bool mask"
    yield "int dtype", torch.ones(6, 5, dtype=torch.int64, device=device), RuntimeError, "bool mask"
    yield "not a tensor", [[True] * 5] * 6, TypeError, "bool tensor or a BlockLayout"
    other = masks.block_layout(torch.ones(6, 4, dtype=torch.bool, device=device))
    yield "layout shape", other, RuntimeError, "does not match"
    too_large = masks.block_layout(torch.ones(6, 5, dtype=torch.bool, device=device), torch.float16, (128, 128))
    yield "layout block too large for float32", too_large, ValueError, "exceeds"


@pytest.mark.parametrize("case", range(6))
def test_bad_masks_raise_before_any_launch(device, case):
    name, mask, error, match = list(_bad_masks(device))[case]
    x, weight = torch.randn(3, 5, device=device), torch.randn(6, 5, device=device)
    with count_launches() as launches, raises_exactly(error, match=match):
        gpunn.functional.masked_linear(x, weight, mask)
    assert launches == {}, name
    if isinstance(mask, torch.Tensor) and error is RuntimeError:
        # The reference formulation rejects the same mask with the same exception type.
        with pytest.raises(RuntimeError):
            weight.masked_fill(~mask if mask.dtype == torch.bool else mask, 0)


def test_linear_errors_still_apply(device):
    mask = torch.ones(6, 5, dtype=torch.bool, device=device)
    with count_launches() as launches, pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        gpunn.functional.masked_linear(torch.randn(3, 4, device=device), torch.randn(6, 5, device=device), mask)
    with pytest.raises(ValueError, match="Unknown activation"):
        gpunn.functional.masked_linear(torch.randn(3, 5, device=device), torch.randn(6, 5, device=device), mask,
                                       activation="swish")
    assert launches == {}


def test_autocast_casts_like_linear(device):
    mask = MASKS["local_1d"]().to(device)
    x = torch.randn(4, 100, device=device)
    w = torch.randn(130, 100, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16):
        out = gpunn.functional.masked_linear(x, w, mask)
        expected = torch.nn.functional.linear(x, w.masked_fill(~mask, 0))
    assert out.dtype == expected.dtype



def test_an_inference_mask_changed_before_backward_keeps_the_forwards_connections(device):
    # A mask made under inference_mode has no version counter to refuse a change by: changed (inside
    # inference_mode) between forward and backward, backward still uses the mask the forward used, as torch's
    # masked_fill, whose ~mask is taken at forward; it had rebuilt the layout from the new mask (weights masked
    # out in the forward got gradients).
    gen = torch.Generator().manual_seed(case_seed("inference mask changed"))
    with torch.inference_mode():
        mask = (torch.rand(20, 30, generator=gen) < 0.3).to(device)
    at_forward = mask.clone()
    x = torch.randn(4, 30, generator=gen, dtype=torch.float64).to(device)
    weight = torch.randn(20, 30, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    out = gpunn.functional.masked_linear(x, weight, mask, None, "tanh")
    with torch.inference_mode():
        mask[:, :15] = ~mask[:, :15]
    (grad,) = torch.autograd.grad(out.sum(), weight)
    reference = weight.detach().requires_grad_()
    (expected,) = torch.autograd.grad(torch.tanh(x @ (reference * at_forward).t()).sum(), reference)
    assert_close(grad, expected, torch.float64, "weight grad")
    assert torch.equal(grad[~at_forward], torch.zeros_like(grad[~at_forward]))


def test_layouts_and_masks_made_under_inference_mode_still_train(device):
    """An evaluation pass under torch.inference_mode caches the layout (its tensors are then inference
    tensors, which autograd refuses to save); training afterwards, with the mask or that layout, works."""
    layer = gpunn.MaskedLinear(40, 30, masks.local_1d(40, 30, 5), device=device)
    x = torch.randn(6, 40, device=device)
    with torch.inference_mode():
        layer(x)
        inference_mask = masks.local_1d(40, 30, 7).to(device)
    for mask in (layer.mask, masks.block_layout(layer.mask), inference_mask):
        weight = layer.weight.detach().double().requires_grad_()
        out = gpunn.functional.masked_linear(x.double(), weight, mask, None)
        (grad,) = torch.autograd.grad(out.sum(), weight)
        dense_mask = mask.mask.bool() if isinstance(mask, masks.BlockLayout) else mask
        assert_close(grad, torch.ones(6, 30, dtype=torch.float64, device=device).t() @ x.double() * dense_mask,
                     torch.float64, "weight grad")
