"""gpunn.LocallyConnected2d / 1d and their functional forms against F.unfold + einsum in float64: forward and
every gradient, geometry (stride, padding, dilation, rectangular kernels), channels past a tile, unbatched
inputs, conversion to and from MaskedLinear, errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TorchOpSpy, assert_close, case_seed, count_launches, dtypes_for, leaf64, rel_error

import gpunn
from gpunn.kernels.work import count_work

LOCAL_KERNELS = ("local_forward_kernel", "local_grad_input_kernel", "local_grad_weight_kernel")


def reference_local2d(x, weight, bias, stride, padding, dilation):
    """The usual workaround, in float64: the unfolded patches (N, C*KH*KW, L) times each position's weights."""
    o, oh, ow, c, kh, kw = weight.shape
    patches = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    y = torch.einsum("nrl,olr->nol", patches, weight.reshape(o, oh * ow, c * kh * kw))
    if bias is not None:
        y = y + bias.reshape(o, oh * ow)
    return y.reshape(x.shape[0], o, oh, ow)


def run_local2d_case(device, dtype, n, c, o, size, kernel, stride=1, padding=0, dilation=1, bias=True,
                     unbatched=False, x=None):
    """Module forward and backward against the float64 reference; returns (layer, output, gradients)."""
    gen = torch.Generator().manual_seed(case_seed(n, c, o, size, kernel, stride, padding, dilation))
    layer = gpunn.LocallyConnected2d(c, o, size, kernel, stride, padding, dilation, bias=bias, device=device,
                                     dtype=dtype)
    if x is None:
        shape = (c, *size) if unbatched else (n, c, *size)
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    out = layer(x)
    x64, w64, b64 = leaf64(x), leaf64(layer.weight), leaf64(layer.bias)
    ref = reference_local2d(x64 if not unbatched else x64.unsqueeze(0), w64, b64, layer.stride, layer.padding_pair,
                            layer.dilation)
    ref = ref.squeeze(0) if unbatched else ref
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "output")
    # dy with real strides, as a permute upstream would hand it back.
    grad_output = torch.randn(tuple(reversed(ref.shape)), generator=gen).to(device=device, dtype=dtype)
    grad_output = grad_output.permute(*reversed(range(ref.dim())))
    params = [t for t in (x, layer.weight, layer.bias) if t is not None and t.requires_grad]
    params64 = [t for t in (x64, w64, b64) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, params, grad_output)
    for name, g, g64 in zip(("input", "weight", "bias"), grads, torch.autograd.grad(ref, params64,
                                                                                     grad_output.double())):
        assert_close(g, g64, dtype, f"grad {name}")
    return layer, out, grads


# (N, C, O, (H, W), kernel, stride, padding, dilation): each geometry the issue names, at odd sizes.
GEOMETRIES = {
    "3x3_pad1": (3, 2, 5, (5, 6), 3, 1, 1, 1),
    "stride2": (2, 3, 4, (7, 6), 3, 2, 0, 1),
    "rectangular_mixed": (2, 2, 3, (6, 7), (2, 3), (1, 2), (1, 0), (2, 1)),
    "dilation2_pad2": (2, 1, 2, (6, 5), 3, 1, 2, 2),
    "1x1": (3, 4, 3, (3, 4), 1, 1, 0, 1),
    "stride2_pad1": (2, 2, 3, (7, 6), 3, 2, 1, 1),
    "uncovered_pixels": (2, 2, 2, (7, 8), 2, 3, 0, 1),  # stride 3 over a 2-wide window: dx is zero there
    "kernel_is_image": (2, 2, 3, (3, 4), (3, 4), 1, 0, 1),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometries(device, name):
    n, c, o, size, kernel, stride, padding, dilation = GEOMETRIES[name]
    run_local2d_case(device, torch.float64, n, c, o, size, kernel, stride, padding, dilation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_dtypes(device, dtype):
    if dtype not in dtypes_for(device):
        pytest.skip("bfloat16 is checked on a GPU only (the interpreter cannot compute it natively)")
    run_local2d_case(device, dtype, 3, 2, 5, (5, 6), 3, 1, 1, 1)


def test_tf32_is_followed(device):
    torch.set_float32_matmul_precision("high")  # the autouse fixture restores "highest"
    layer = gpunn.LocallyConnected2d(8, 8, (4, 4), 3, padding=1, device=device)
    x = torch.randn(16, 8, 4, 4, device=device)
    ref = reference_local2d(x.double(), layer.weight.double(), layer.bias.double(), 1, 1, 1)
    assert rel_error(layer(x), ref) < 1e-3
    if device.type == "cuda":
        assert rel_error(layer(x), ref) > 1e-6, "TF32 was allowed but the result is IEEE-exact"


def test_channels_past_one_tile(device):
    # 33 channels in and out: the interpreter's 32-wide channel tiles and 64-wide tap chunks both split.
    run_local2d_case(device, torch.float64, 33, 33, 33, (3, 3), 3, 1, 1, 1)


def test_unbatched_and_without_bias(device):
    run_local2d_case(device, torch.float64, 1, 2, 3, (4, 5), 3, 1, 1, 1, unbatched=True)
    layer, _, grads = run_local2d_case(device, torch.float64, 2, 2, 3, (4, 5), 3, 1, 1, 1, bias=False)
    assert layer.bias is None and len(grads) == 2


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_strided_input(device, layout):
    base = torch.randn(3, 2, 12, 7, device=device, dtype=torch.float64)
    x = base.contiguous(memory_format=torch.channels_last)[:, :, :6] if layout == "channels_last" else base[:, :, ::2]
    assert not x.is_contiguous()
    run_local2d_case(device, torch.float64, 3, 2, 3, (6, 7), 3, 1, 1, 1, x=x.detach().requires_grad_())


def test_padding_weights_are_never_read(device):
    # Weights of taps in the padding multiply zeros: NaN there must change nothing, and get zero gradient.
    layer = gpunn.LocallyConnected2d(2, 3, (4, 4), 3, padding=1, device=device, dtype=torch.float64)
    inside = gpunn.convert._positions(layer)[2]
    with torch.no_grad():
        clean = layer.weight.masked_fill(~inside, 0)
        layer.weight[~inside] = float("nan")
    x = torch.randn(2, 2, 4, 4, device=device, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grads = torch.autograd.grad(out, (x, layer.weight, layer.bias), torch.ones_like(out))
    x64, w64, b64 = leaf64(x), clean.requires_grad_(), leaf64(layer.bias)
    ref = reference_local2d(x64, w64, b64, 1, 1, 1)
    assert_close(out, ref, torch.float64, "output")
    for g, g64, name in zip(grads, torch.autograd.grad(ref, (x64, w64, b64), torch.ones_like(ref)), "xwb"):
        assert_close(g, g64, torch.float64, f"grad {name}")
    assert torch.equal(grads[1][~inside], torch.zeros_like(grads[1][~inside]))


@pytest.mark.parametrize("requires", ["input only", "weight only", "bias only"])
def test_only_the_gradients_asked_for(device, requires):
    layer = gpunn.LocallyConnected2d(2, 3, (4, 5), 3, padding=1, device=device, dtype=torch.float64)
    x = torch.randn(2, 2, 4, 5, device=device, dtype=torch.float64, requires_grad=requires == "input only")
    layer.weight.requires_grad_(requires == "weight only")
    layer.bias.requires_grad_(requires == "bias only")
    with count_launches() as launches:
        layer(x).sum().backward()
    expected = {"input only": "local_grad_input_kernel"}.get(requires, "local_grad_weight_kernel")
    assert launches == {"local_forward_kernel": 1, expected: 1}
    x64 = x.detach().requires_grad_(requires == "input only")
    w64 = layer.weight.detach().requires_grad_(requires == "weight only")
    b64 = layer.bias.detach().requires_grad_(requires == "bias only")
    pairs = {"input only": (x, x64), "weight only": (layer.weight, w64), "bias only": (layer.bias, b64)}
    leaf, leaf64_ = pairs[requires]
    (expected_grad,) = torch.autograd.grad(reference_local2d(x64, w64, b64, 1, 1, 1).sum(), [leaf64_])
    assert_close(leaf.grad, expected_grad, torch.float64, requires)


def test_bias_gradient_alone_does_no_dot_work(device):
    if device.type != "cpu":
        pytest.skip("counts the multiply-adds Triton's interpreter executes")
    layer = gpunn.LocallyConnected2d(2, 3, (4, 5), 3, padding=1)
    layer.weight.requires_grad_(False)
    out = layer(torch.randn(2, 2, 4, 5))
    with count_work() as work:
        out.sum().backward()
    assert work.dot_flops == 0 and work.launches > 0 and layer.bias.grad is not None


def test_dtype_conversion_copy_and_autocast(device):
    layer = gpunn.LocallyConnected2d(2, 3, (4, 5), 3, padding=1, device=device)
    x = torch.randn(2, 2, 4, 5, device=device)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), layer(x))
    half = copy.deepcopy(layer).to(torch.float64)
    assert half.weight.dtype == torch.float64 and rel_error(half(x.double()), layer(x)) < 1e-5
    autocast_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    with torch.autocast(device.type, dtype=autocast_dtype):
        assert layer(x).dtype == torch.nn.functional.conv2d(x, torch.randn(3, 2, 3, 3, device=device)).dtype


def test_zero_batch(device):
    layer = gpunn.LocallyConnected2d(2, 3, (4, 5), 3, padding=1, device=device)
    x = torch.randn(0, 2, 4, 5, device=device, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 3, 4, 5)
    out.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))


def test_triton_path_runs_without_unfold_or_matmul(device):
    layer = gpunn.LocallyConnected2d(2, 3, (4, 5), 3, padding=1, device=device)
    x = torch.randn(2, 2, 4, 5, device=device, requires_grad=True)
    with count_launches() as launches, TorchOpSpy() as spy:
        layer(x).sum().backward()
    assert launches == dict.fromkeys(LOCAL_KERNELS, 1)
    assert not spy.matmuls(), spy.matmuls()
    assert not {"aten.im2col", "aten.col2im", "aten.unfold", "aten.einsum"} & set(spy.ops)


def test_bitwise_deterministic(device):
    layer = gpunn.LocallyConnected2d(3, 4, (5, 5), 3, stride=2, padding=1, device=device)
    x = torch.randn(5, 3, 5, 5, device=device, requires_grad=True)
    runs = []
    for _ in range(2):
        out = layer(x)
        runs.append((out, *torch.autograd.grad(out, (x, layer.weight, layer.bias), torch.ones_like(out))))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# 1-D: (N, C, O, L, kernel, stride, padding, dilation).
@pytest.mark.parametrize("case", [(3, 2, 4, 11, 3, 1, 1, 1, True), (2, 3, 2, 12, 4, 3, 2, 2, True),
                                  (2, 1, 1, 5, 5, 1, 0, 1, False)],
                         ids=["k3_pad1", "stride3_dilation2", "kernel_is_input_no_bias"])
def test_locally_connected1d(device, case):
    n, c, o, length, kernel, stride, padding, dilation, bias = case
    layer = gpunn.LocallyConnected1d(c, o, length, kernel, stride, padding, dilation, bias=bias, device=device,
                                     dtype=torch.float64)
    assert layer.weight.shape == (o, layer.output_length, c, kernel)
    assert (layer.bias is None) if not bias else layer.bias.shape == (o, layer.output_length)
    x = torch.randn(n, c, length, device=device, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    params = [t for t in (x, layer.weight, layer.bias) if t is not None]
    params64 = [leaf64(t) for t in params]
    b64 = params64[2].unsqueeze(1) if bias else None
    ref = reference_local2d(params64[0].unsqueeze(2), params64[1].unsqueeze(1).unsqueeze(-2), b64, (1, stride),
                            (0, padding), (1, dilation)).squeeze(2)
    assert_close(out, ref, torch.float64, "output")
    dy = torch.randn(out.shape[::-1], device=device, dtype=torch.float64).permute(2, 1, 0)
    for g, g64, name in zip(torch.autograd.grad(out, params, dy), torch.autograd.grad(ref, params64, dy), "xwb"):
        assert_close(g, g64, torch.float64, f"grad {name}")
    unbatched = layer(x[0])
    assert unbatched.shape == out.shape[1:]
    assert_close(unbatched, out[0], torch.float64, "unbatched")


def test_module_init_state_dict_and_repr(device):
    torch.manual_seed(0)
    layer = gpunn.LocallyConnected2d(16, 4, (6, 6), 3, padding=1, device=device)
    assert layer.weight.shape == (4, 6, 6, 16, 3, 3) and layer.bias.shape == (4, 6, 6)
    assert list(layer.state_dict()) == ["weight", "bias"]
    bound = 1 / (16 * 9) ** 0.5  # nn.Conv2d's fan-in rule
    for p in (layer.weight, layer.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert repr(layer) == ("LocallyConnected2d(16, 4, input_size=(6, 6), kernel_size=(3, 3), stride=(1, 1), "
                           "padding=(1, 1))")
    assert repr(gpunn.LocallyConnected1d(2, 3, 10, 3, bias=False)) == \
        "LocallyConnected1d(2, 3, input_length=10, kernel_size=3, stride=1, bias=False)"
    fresh = gpunn.LocallyConnected2d(16, 4, (6, 6), 3, padding=1, device=device)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 16, 6, 6, device=device)
    assert torch.equal(fresh(x), layer(x))
    # bias=False registers bias as None, as nn.Conv1d/2d do; sizes may be numpy integers, as theirs may.
    for unbiased in (gpunn.LocallyConnected2d(2, 3, (5, 6), 3, bias=False), gpunn.LocallyConnected1d(2, 3, 9, 3,
                                                                                                    bias=False)):
        assert "bias" in unbiased._parameters and unbiased.bias is None
    numpy_sized = gpunn.LocallyConnected1d(np.int64(2), np.int32(3), np.int64(9), np.int64(3), stride=(np.int64(2),))
    assert (numpy_sized.in_channels, numpy_sized.input_length, numpy_sized.kernel_size) == (2, 9, 3)
    assert type(numpy_sized.in_channels) is int and numpy_sized.weight.shape == (3, 4, 2, 3)


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=(2, 3), stride=(2, 1),
                                                                            padding=(1, 0), dilation=(1, 2))],
                         ids=["3x3_pad1", "mixed"])
def test_conversion_to_and_from_masked_linear(device, geometry):
    layer = gpunn.LocallyConnected2d(2, 3, (5, 6), device=device, dtype=torch.float64, **geometry)
    masked = gpunn.convert.masked_from_local(layer)
    assert isinstance(masked, gpunn.MaskedLinear) and masked.in_features == 2 * 5 * 6
    assert torch.equal(masked.mask.cpu(), gpunn.masks.local_2d((2, 5, 6), out_channels=3, **geometry))
    x = torch.randn(4, 2, 5, 6, device=device, dtype=torch.float64)
    assert_close(masked(x.flatten(1)), layer(x).flatten(1), torch.float64, "masked form")
    back = gpunn.convert.local_from_masked(masked, 2, (5, 6), **geometry)
    assert_close(back(x), layer(x), torch.float64, "back to the compact form")
    inside = gpunn.convert._positions(layer)[2]
    assert torch.equal(back.weight[inside], layer.weight[inside])
    assert torch.equal(back.weight[~inside], torch.zeros_like(back.weight[~inside]))


def test_conversion_takes_the_2d_layer_only(device):
    with pytest.raises(TypeError, match="takes a gpunn.LocallyConnected2d"):
        gpunn.convert.masked_from_local(gpunn.LocallyConnected1d(2, 3, 9, 3, device=device))
    with pytest.raises(TypeError, match="takes a gpunn.MaskedLinear"):
        gpunn.convert.local_from_masked(torch.nn.Linear(50, 75, device=device), 2, (5, 5), 3, padding=1)


@pytest.mark.parametrize("geometry", [dict(kernel_size=0), dict(kernel_size=3, stride=0),
                                      dict(kernel_size=3, padding=-1), dict(kernel_size=3, stride=2, padding="same")])
def test_conversion_refuses_a_geometry_as_the_layer_does(device, geometry):
    masked = gpunn.convert.masked_from_local(gpunn.LocallyConnected2d(2, 3, (5, 5), 3, padding=1, device=device))
    with pytest.raises(ValueError):
        gpunn.LocallyConnected2d(2, 3, (5, 5), **geometry)
    with pytest.raises(ValueError):
        gpunn.convert.local_from_masked(masked, 2, (5, 5), **geometry)


def test_conversion_refuses_a_fused_activation(device):
    mask = gpunn.masks.local_2d((1, 3, 3), 3, padding=1)
    masked = gpunn.MaskedLinear(9, 9, mask, activation="relu", device=device)
    with pytest.raises(ValueError, match="activation 'relu'"):
        gpunn.convert.local_from_masked(masked, 1, (3, 3), 3, padding=1)


def test_conversion_rejects_another_geometry(device):
    masked = gpunn.convert.masked_from_local(gpunn.LocallyConnected2d(2, 3, (5, 6), 3, padding=1, device=device))
    with pytest.raises(ValueError, match="not masks.local_2d"):
        gpunn.convert.local_from_masked(masked, 2, (5, 6), 3, padding=0 + 1, stride=2)
    with pytest.raises(ValueError, match="does not read"):
        gpunn.convert.local_from_masked(masked, 3, (5, 6), 3, padding=1)


@pytest.mark.parametrize("make_input,match", [
    (lambda d: torch.randn(2, 3, 5, 6, device=d), "channels"),
    (lambda d: torch.randn(2, 2, 6, 6, device=d), "built for inputs of 5x6"),
    (lambda d: torch.randn(2, 2, 5, 7, device=d), "built for inputs of 5x6"),
    (lambda d: torch.randn(2, 2, 5, 6, device=d, dtype=torch.float64), "same dtype"),
    (lambda d: torch.randn(2, 2, 2, 5, 6, device=d), "4-D"),
    (lambda d: torch.ones(2, 2, 5, 6, device=d, dtype=torch.int64), "same dtype"),
])
def test_bad_inputs_raise_before_any_launch(device, make_input, match):
    layer = gpunn.LocallyConnected2d(2, 3, (5, 6), 3, padding=1, device=device)
    with count_launches() as launches, pytest.raises(RuntimeError, match=match):
        layer(make_input(device))
    assert launches == {}


def test_functional_errors(device):
    x, weight = torch.randn(1, 2, 5, 6, device=device), torch.randn(3, 5, 6, 2, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="6-D weight"):
        gpunn.functional.locally_connected2d(x, weight[0])
    with pytest.raises(RuntimeError, match="gives 5x6 output positions, but the weight has 3x4"):
        gpunn.functional.locally_connected2d(x, torch.randn(3, 3, 4, 2, 3, 3, device=device), padding=1)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        gpunn.functional.locally_connected2d(x, weight, torch.randn(3, 5, device=device), padding=1)
    with pytest.raises(RuntimeError, match="negative padding"):
        gpunn.functional.locally_connected2d(x, weight, padding=-1)
    with pytest.raises(RuntimeError, match="non-positive"):
        gpunn.functional.locally_connected2d(x, weight, stride=0)
    with pytest.raises(TypeError, match="pair"):
        gpunn.functional.locally_connected2d(x, weight, stride=1.5)
    x1, w1 = torch.randn(1, 2, 9, device=device), torch.randn(3, 9, 2, 3, device=device)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        gpunn.functional.locally_connected1d(x1, w1, torch.randn(3, 8, device=device), padding=1)
    with pytest.raises(RuntimeError, match="gives 7 output positions, but the weight has 9"):
        gpunn.functional.locally_connected1d(x1, w1)
    with pytest.raises(RuntimeError, match="expected input with 2 channels"):
        gpunn.functional.locally_connected1d(torch.randn(1, 3, 9, device=device), w1, padding=1)
    with pytest.raises(RuntimeError, match="negative padding"):
        gpunn.functional.locally_connected1d(x1, w1, padding=-1)
    with pytest.raises(TypeError, match="1-tuple"):
        gpunn.functional.locally_connected1d(x1, w1, padding=(1, 1))
    # An empty image, which padding alone would give output positions (their bias): refused, as F.conv2d does.
    with count_launches() as launches, pytest.raises(RuntimeError, match="Only zero batch or zero channel"):
        gpunn.functional.locally_connected2d(torch.randn(1, 2, 0, 5, device=device),
                                             torch.randn(3, 2, 5, 2, 1, 3, device=device), padding=1)
    with pytest.raises(RuntimeError, match="Only zero batch or zero channel"):
        gpunn.functional.locally_connected1d(torch.randn(1, 2, 0, device=device),
                                             torch.randn(3, 2, 2, 1, device=device), padding=1)
    assert launches == {}


def _shared_filters(layer, conv):
    """Give the locally connected layer conv's filter and bias at every position: then it computes conv."""
    with torch.no_grad():
        positions = [1] * (layer.weight.dim() - conv.weight.dim())  # (OH, OW) or (OL,) after O
        layer.weight.copy_(conv.weight.view(conv.weight.shape[0], *positions, *conv.weight.shape[1:])
                           .expand_as(layer.weight))
        layer.bias.copy_(conv.bias.view(-1, *[1] * (layer.bias.dim() - 1)).expand_as(layer.bias))


@pytest.mark.parametrize("kernel,dilation", [(3, 1), ((3, 5), (2, 1)), (1, 1), (2, 1), ((2, 4), (1, 2)),
                                             ((3, 2), (2, 3))], ids=str)
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_padding_strings_as_conv2d(device, padding, kernel, dilation):
    """With one filter shared by every position the layer is nn.Conv2d: forward, dx and the summed dW match
    it, "same" included where torch pads the far side one more (an even dilation x (kernel - 1))."""
    gen = torch.Generator().manual_seed(case_seed(padding, str(kernel), str(dilation)))
    conv = torch.nn.Conv2d(2, 3, kernel, padding=padding, dilation=dilation, dtype=torch.float64).to(device)
    layer = gpunn.LocallyConnected2d(2, 3, (6, 7), kernel, padding=padding, dilation=dilation, device=device,
                                     dtype=torch.float64)
    _shared_filters(layer, conv)
    x = torch.randn(3, 2, 6, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    expected = conv(x)
    assert layer.output_size == expected.shape[2:]
    assert layer.padding == conv.padding == padding and f"padding={padding}" in repr(layer)
    out = layer(x)
    assert_close(out, expected, torch.float64, "output")
    grad_output = torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(device)
    (dx, dw), (conv_dx, conv_dw) = (torch.autograd.grad(y, (x, w), grad_output)
                                    for y, w in ((out, layer.weight), (expected, conv.weight)))
    assert_close(dx, conv_dx, torch.float64, "grad input")
    assert_close(dw.sum((1, 2)), conv_dw, torch.float64, "grad weight, summed over positions")
    masked = gpunn.convert.masked_from_local(layer)
    assert_close(masked(x.flatten(1)), out.flatten(1), torch.float64, "masked form")
    back = gpunn.convert.local_from_masked(masked, 2, (6, 7), kernel, padding=padding, dilation=dilation)
    assert back.padding == padding and torch.equal(back(x), out)
    length = kernel if isinstance(kernel, int) else kernel[1]
    conv1d = torch.nn.Conv1d(2, 3, length, padding=padding, dtype=torch.float64).to(device)
    line = gpunn.LocallyConnected1d(2, 3, 9, length, padding=padding, device=device, dtype=torch.float64)
    _shared_filters(line, conv1d)
    x1 = torch.randn(2, 2, 9, generator=gen, dtype=torch.float64).to(device)
    assert_close(line(x1), conv1d(x1), torch.float64, "1-D output")
    assert torch.equal(line(x1), gpunn.functional.locally_connected1d(x1, line.weight, line.bias, padding=padding))
    assert_close(gpunn.reference.locally_connected1d(x1, line.weight, line.bias, padding=padding), conv1d(x1),
                 torch.float64, "1-D reference")  # the reference takes the strings the functional form takes


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding="same", stride=2), dict(kernel_size=3, padding="full")],
                         ids=str)
def test_padding_string_errors(device, kwargs):
    # The module's types are nn.Conv2d's (ValueError); the functional form raises RuntimeError there, as
    # F.conv2d does.
    args = dict(in_channels=2, out_channels=3, input_size=(5, 6))
    with pytest.raises(ValueError):
        torch.nn.Conv2d(2, 3, **kwargs)
    with pytest.raises(ValueError):
        gpunn.LocallyConnected2d(**args, **kwargs)
    weight = torch.randn(3, 5, 6, 2, kwargs["kernel_size"], kwargs["kernel_size"], device=device)
    with count_launches() as launches, pytest.raises(RuntimeError):
        gpunn.functional.locally_connected2d(torch.randn(1, 2, 5, 6, device=device), weight, None,
                                             kwargs.get("stride", 1), kwargs["padding"])
    assert launches == {}


def test_one_dimensional_window_errors_quote_one_dimension(device):
    with pytest.raises(ValueError, match=r"kernel_size=\(0,\), stride=\(1,\), dilation=\(1,\)"):
        gpunn.LocallyConnected1d(2, 3, 8, 0)
    with pytest.raises(ValueError, match=r"negative padding is not supported: \(-1,\)"):
        gpunn.LocallyConnected1d(2, 3, 8, 3, padding=-1)
    x, weight = torch.randn(2, 2, 8, device=device), torch.randn(3, 8, 2, 4, device=device)
    with pytest.raises(RuntimeError, match=r"kernel_size=\(4,\), stride=\(0,\)"):
        gpunn.functional.locally_connected1d(x, weight, None, stride=0)
    with pytest.raises(ValueError, match="kernel 7 .dilation 1. does not fit the padded input of length 5"):
        gpunn.LocallyConnected1d(2, 3, 5, 7)
    with pytest.raises(RuntimeError, match="kernel 9 .dilation 1. does not fit the padded input of length 8"):
        gpunn.functional.locally_connected1d(x, torch.randn(3, 1, 2, 9, device=device))
    with pytest.raises(ValueError, match="input_length must be a positive int, got 0"):
        gpunn.LocallyConnected1d(2, 3, 0, 3)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kernel_size=7), ValueError, "does not fit"),
    (dict(kernel_size=3, stride=0), ValueError, "non-positive"),
    (dict(kernel_size=3, padding=-1), ValueError, "negative padding"),
    (dict(kernel_size=2.5), TypeError, "pair"),
    (dict(kernel_size=3, in_channels=0), ValueError, "in_channels"),
])
def test_constructor_errors(kwargs, error, match):
    args = dict(in_channels=2, out_channels=3, input_size=(5, 6))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        gpunn.LocallyConnected2d(**args)
