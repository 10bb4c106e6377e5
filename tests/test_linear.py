"""gpunn.functional.linear against torch.nn.functional in float64: forward and every gradient."""
from __future__ import annotations

import pytest
import torch
from helpers import (ACTIVATIONS, TOLERANCE, TorchOpSpy, assert_close, case_seed, count_launches, dtypes_for, leaf64,
                     raises_exactly, reference_linear, rel_error)

import gpunn
from gpunn.kernels import dense, runtime, tiling
from gpunn.kernels.runtime import Rows

# (leading dims, in_features, out_features): odd sizes, sizes around and past the interpreter's 64-wide
# blocks, single rows and columns.
SHAPES = [((7,), 33, 130), ((130,), 7, 33), ((1,), 1, 1), ((65,), 129, 64), ((3, 5), 17, 9)]


def _run_case(device, dtype, lead, k, n, activation, slope=0.01, bias=True, x=None, weight=None,
              grad_output=None):
    """Forward and backward through gpunn and through the float64 reference; compare everything."""
    gen = torch.Generator(device="cpu").manual_seed(case_seed(lead, k, n, str(activation), str(dtype)))
    if x is None:
        x = torch.randn(*lead, k, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    if weight is None:
        weight = (torch.randn(n, k, generator=gen) / max(k, 1) ** 0.5).to(device=device, dtype=dtype)
        weight.requires_grad_()
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype).requires_grad_() if bias else None

    out = gpunn.functional.linear(x, weight, b, activation, slope)
    x64, w64, b64 = leaf64(x), leaf64(weight), leaf64(b)
    ref = reference_linear(x64, w64, b64, activation, slope)
    assert out.dtype == dtype and out.device.type == device.type
    assert_close(out, ref, dtype, "output")

    if grad_output is None:
        grad_output = torch.randn(ref.shape, generator=gen).to(device=device, dtype=dtype)
    inputs = [t for t in (x, weight, b) if t is not None and t.requires_grad]
    inputs64 = [t for t in (x64, w64, b64) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, inputs, grad_output)
    grads64 = torch.autograd.grad(ref, inputs64, grad_output.double())
    for name, g, g64 in zip(["input", "weight", "bias"], grads, grads64):
        assert g.dtype == dtype
        assert_close(g, g64, dtype, f"grad {name}")
    return out, grads


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_every_activation_and_dtype(device, dtype, activation):
    if dtype not in dtypes_for(device):
        pytest.skip("bfloat16 is checked on a GPU only (the interpreter cannot compute it natively)")
    for lead, k, n in SHAPES[:2]:
        _run_case(device, dtype, lead, k, n, activation)


@pytest.mark.parametrize("lead,k,n", SHAPES, ids=str)
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_odd_shapes(device, lead, k, n, activation):
    _run_case(device, torch.float32, lead, k, n, activation)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gelu_tails_in_float32(device, activation):
    # Every element, not the norm: for negative z, (1 + erf) and (1 + tanh) cancel in fp32 (torch's own fp32
    # GELU is 100% off by z = -9). The references are exact forms in float64: 0.5 z erfc(-z / sqrt 2), and
    # z sigmoid(2 v) for the tanh form.
    import math
    z = torch.cat([torch.linspace(-9, -0.5, 801), torch.linspace(0.5, 4, 201)]).reshape(-1, 1)
    x = z.to(device).requires_grad_()
    y = gpunn.functional.linear(x, torch.ones(1, 1, device=device), torch.zeros(1, device=device), activation)
    (g,) = torch.autograd.grad(y.sum(), x)
    x64 = x.detach().double().requires_grad_()
    if activation == "gelu":
        y64 = 0.5 * x64 * torch.special.erfc(-x64 / math.sqrt(2))
    else:
        y64 = x64 * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3))
    (g64,) = torch.autograd.grad(y64.sum(), x64)
    assert ((y.double() - y64).abs() / y64.abs()).max() < 1e-5
    steep = g64.abs() > 1e-2  # away from the derivative's zero crossing (there: fp32 absolute error)
    assert ((g.double() - g64).abs() / g64.abs())[steep].max() < 1e-5


@pytest.mark.parametrize("slope", [0.2, 0.0, -0.5])
def test_leaky_relu_slopes(device, slope):
    # A negative slope makes the output's sign ambiguous: backward then reads the saved derivative.
    _run_case(device, torch.float64, (19,), 23, 21, "leaky_relu", slope=slope)


def test_leaky_relu_slope_of_negative_zero_is_zero_whatever_ran_first(device):
    # -0.0 and 0.0 are one key of the constants' cache and of Triton's compiled kernels: both run as 0.0, so
    # the zeros of negative inputs are -0.0 (z * 0.0) in either order, not the sign of whichever came first.
    x = -torch.rand(5, 7, device=device, dtype=torch.float64) - 0.5
    weight = torch.eye(7, device=device, dtype=torch.float64)
    for slope in (-0.0, 0.0, -0.0):
        y = gpunn.functional.linear(x, weight, None, activation="leaky_relu", negative_slope=slope)
        assert torch.equal(y, torch.zeros_like(y)) and y.signbit().all()


@pytest.mark.parametrize("activation", [None, "tanh"])
def test_without_bias(device, activation):
    _run_case(device, torch.float32, (9,), 10, 11, activation, bias=False)


@pytest.mark.parametrize("lead", [(), (2, 3, 4)], ids=["1d", "4d"])
def test_leading_dims(device, lead):
    _run_case(device, torch.float64, lead, 13, 6, "silu")


def test_zero_sized_batch(device):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    layer = gpunn.Linear(5, 3, device=device, activation="gelu")
    out = layer(x)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad.shape == (0, 5)
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))


def test_empty_gradient_with_unmergeable_leading_dims(device):
    # An empty tensor counts as contiguous whatever its strides; its rows are read with standard ones.
    x = torch.randn(2, 3, 5, 4, device=device, requires_grad=True)
    w = torch.randn(0, 4, device=device, requires_grad=True)
    out = gpunn.functional.linear(x, w, None, "relu")
    out.backward(torch.randn(3, 2, 5, 0, device=device).transpose(0, 1))
    assert torch.equal(x.grad, torch.zeros_like(x)) and w.grad.shape == (0, 4)


@pytest.mark.parametrize("shape", [(2, 0, 0, 5), (0, 0, 0, 5), (2, 3, 0, 0, 5), (2, 0, 3, 0, 5)])
@pytest.mark.parametrize("mask", [False, True], ids=["dense", "masked"])
def test_inputs_with_several_empty_dims(device, shape, mask):
    # Leading dims of size 0 whose strides never merge: torch returns an empty output and gradients.
    x = torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)
    layer = (gpunn.MaskedLinear(5, 3, torch.rand(3, 5) < 0.5, device=device, dtype=torch.float64) if mask else
             gpunn.Linear(5, 3, device=device, dtype=torch.float64, activation="gelu"))
    out = layer(x)
    assert out.shape == (*shape[:-1], 3)
    out.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


def test_zero_in_features(device):
    # nn.Linear(0, n) returns act(bias): an empty reduction.
    _run_case(device, torch.float64, (4,), 0, 3, "sigmoid")


def _strided_inputs(device):
    """Non-contiguous views of a larger tensor, each a layout the kernels read through strides."""
    base = torch.randn(6, 8, 2 * 17, device=device, dtype=torch.float64)
    yield "every other feature", base[..., ::2]
    yield "transposed batch dims", base[..., :17].transpose(0, 1)
    yield "row slice", base[1:5, ::3, :17]
    yield "broadcast rows", torch.randn(1, 1, 17, device=device, dtype=torch.float64).expand(6, 8, 17)


@pytest.mark.parametrize("case", range(4))
def test_non_contiguous_input_is_not_copied(device, case):
    name, view = list(_strided_inputs(device))[case]
    assert Rows.of(view).tensor.data_ptr() == view.data_ptr(), f"{name}: the kernel should read the view in place"
    _run_case(device, torch.float64, tuple(view.shape[:-1]), 17, 5, "gelu", x=view.detach().requires_grad_())


def test_three_unmergeable_leading_dims(device):
    x = torch.randn(3, 4, 5, 6, device=device, dtype=torch.float64).permute(1, 0, 2, 3)
    assert Rows.of(x).tensor.is_contiguous()  # copied once: more leading layouts than a kernel addresses
    _run_case(device, torch.float64, tuple(x.shape[:-1]), 6, 7, "relu", x=x.detach().requires_grad_())


def test_non_contiguous_weight_and_grad_output(device):
    weight = torch.randn(9, 12, device=device, dtype=torch.float64).t().requires_grad_()  # (12, 9), strided
    grad_output = torch.randn(12, 5, device=device, dtype=torch.float64).t()  # (5, 12), strided
    _run_case(device, torch.float64, (5,), 9, 12, "tanh", weight=weight, grad_output=grad_output)


def test_broadcast_grad_output(device):
    # y.sum() gives backward a stride-0 gradient: read in place, not materialised.
    _run_case(device, torch.float64, (4, 6), 7, 8, "gelu_tanh",
              grad_output=torch.ones((), device=device, dtype=torch.float64).expand(4, 6, 8))


def test_frozen_weight_skips_weight_gradient(device):
    x = torch.randn(10, 6, device=device, requires_grad=True)
    weight = torch.randn(4, 6, device=device)
    bias = torch.randn(4, device=device, requires_grad=True)
    out = gpunn.functional.linear(x, weight, bias, "relu")
    with count_launches() as launches:
        out.sum().backward()
    assert weight.grad is None
    assert launches == {"dense_grad_preactivation_kernel": 1, "dense_grad_input_kernel": 1}  # no dW GEMM
    _run_case(device, torch.float64, (10,), 6, 4, "relu",
              weight=torch.randn(4, 6, device=device, dtype=torch.float64))


@pytest.mark.parametrize("activation,bias,passes", [
    ("gelu", True, 2),  # dz and each row chunk's column sums, then the chunks' sums added
    ("tanh", False, 1),  # dz alone: no sums to add
    (None, True, 2),  # the column sums of dy, no dz written
    (None, False, 0),  # dz is dy: the GEMMs read it in place
])
def test_backward_passes(device, activation, bias, passes):
    # The fewest rows of these that this device's policy splits into chunks (a GPU keeps 16 row tiles whole).
    k, n = 7, 130
    m = next(m for m in (261, 8195) if dense.row_chunks(m, n, True)[1] > 1)
    x = torch.randn(m, k, device=device, requires_grad=True)
    layer = gpunn.Linear(k, n, bias=bias, device=device, activation=activation)
    out = layer(x)
    with count_launches() as launches:
        out.backward(torch.randn_like(out))
    passes += dense.weight_grad_splits(m, n, k)[1] > 1  # the weight gradient's partial sums, added by the pass
    assert launches == {"dense_grad_input_kernel": 1, "dense_grad_weight_kernel": 1,
                        **({"dense_grad_preactivation_kernel": passes} if passes else {})}
    _run_case(device, torch.float64, (m,), k, n, activation, bias=bias)


def _split_batch(n: int, k: int) -> int:
    """The fewest rows of a few candidates that this device's policy splits for an (n, k) weight gradient,
    with a short last split."""
    return next(m for m in (261, 4100) if dense.weight_grad_splits(m, n, k)[1] > 1)


@pytest.mark.parametrize("k,n", [(7, 130), (65, 3), (33, 64), (48, 64)], ids=str)  # the last: 16-byte rows
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_weight_gradient_splits_a_long_batch(device, dtype, k, n):
    if dtype not in dtypes_for(device):
        pytest.skip("bfloat16 is checked on a GPU only (the interpreter cannot compute it natively)")
    m = _split_batch(n, k)
    split_rows, splits = dense.weight_grad_splits(m, n, k)
    assert split_rows % tiling.LARGEST_REDUCTION_BLOCK == 0 and split_rows >= tiling.WEIGHT_GRAD_SPLIT_ROWS
    assert 8 * n * k <= split_rows * 2 * (n + k)  # the partials move no more than the rows a split reads
    assert (splits - 1) * split_rows < m <= splits * split_rows
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(n, k, device=device, dtype=dtype, requires_grad=True)
    out = gpunn.functional.linear(x, weight, None, "gelu")
    with count_launches() as launches:
        out.backward(torch.randn_like(out))
    # dz, the split GEMM, then the pass adding the splits' partial sums
    assert launches == {"dense_grad_preactivation_kernel": 2, "dense_grad_input_kernel": 1,
                        "dense_grad_weight_kernel": 1}
    _run_case(device, dtype, (m,), k, n, "gelu", x=x.detach().requires_grad_(), weight=weight.detach().requires_grad_())


def test_weight_gradient_split_is_deterministic_over_strided_rows(device):
    # Splits cut across the outer of two unmergeable row dims, and x is column-major.
    n, k = 9, 5
    m = _split_batch(n, k)
    outer = next(d for d in range(2, m) if m % d == 0)
    dz = torch.randn(m // outer, outer, n, device=device, dtype=torch.float64).transpose(0, 1)
    assert Rows.of(dz).two_row_dims
    x = torch.randn(k, m, device=device, dtype=torch.float64).t()
    first, second = (dense.grad_weight(Rows.of(dz), Rows.of(x), (n, k)) for _ in range(2))
    assert torch.equal(first, second)
    assert_close(first, dz.reshape(m, n).t() @ x, torch.float64, "grad weight")


@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_weight_gradient_without_input_gradient(device, activation):
    x = torch.randn(37, 19, device=device, dtype=torch.float64)
    _run_case(device, torch.float64, (37,), 19, 23, activation, x=x)


def test_input_without_grad_skips_input_gradient(device):
    x = torch.randn(10, 6, device=device)
    layer = gpunn.Linear(6, 4, device=device, bias=False)
    with count_launches() as launches:
        layer(x).sum().backward()
    assert launches == {"dense_forward_kernel": 1, "dense_grad_weight_kernel": 1}


def test_no_grad_forward_saves_nothing(device):
    layer = gpunn.Linear(6, 4, device=device, activation="gelu")
    with torch.no_grad():
        out = layer(torch.randn(3, 6, device=device))
    assert out.grad_fn is None


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(device, activation):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: gpunn.functional.linear(x, w, b, activation), (x, w, b))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_bitwise_deterministic(device, activation):
    x = torch.randn(70, 40, device=device, requires_grad=True)
    layer = gpunn.Linear(40, 66, device=device, activation=activation)
    results = []
    for _ in range(2):
        out = layer(x)
        grads = torch.autograd.grad(out, [x, layer.weight, layer.bias], torch.ones_like(out))
        results.append([out, *grads])
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_tf32_setting_is_followed(device):
    # torch's float32 matmul precision decides: "highest" is IEEE fp32, "high" allows TF32 on a GPU.
    x = torch.randn(33, 130, device=device)
    w = torch.randn(20, 130, device=device)
    ref = torch.nn.functional.linear(x.double(), w.double())
    exact = gpunn.functional.linear(x, w)
    torch.set_float32_matmul_precision("high")
    fast = gpunn.functional.linear(x, w)
    assert rel_error(exact, ref) < TOLERANCE[torch.float32]
    assert rel_error(fast, ref) < 1e-3
    if device.type == "cuda":
        assert rel_error(fast, ref) > 1e-6, "TF32 was allowed but the result is IEEE-exact"


def test_triton_path_runs_and_no_torch_matmul(device):
    layer = gpunn.Linear(24, 16, device=device, activation="gelu")
    x = torch.randn(5, 24, device=device, requires_grad=True)
    with count_launches() as launches, TorchOpSpy() as spy:
        layer(x).sum().backward()
    assert launches == {"dense_forward_kernel": 1, "dense_grad_preactivation_kernel": 1, "dense_grad_input_kernel": 1,
                        "dense_grad_weight_kernel": 1}
    assert not spy.matmuls(), spy.matmuls()


# (input shape, weight shape, bias shape or None): the 1-D weights, and the biases of one value per output
# feature in other shapes, that torch.nn.functional.linear accepts.
BROADCAST_CASES = [((6, 5), (5,), None), ((2, 3, 5), (5,), None), ((5,), (5,), None), ((5,), (5,), ()),
                   ((6, 5), (7, 5), ()), ((6, 5), (7, 5), (1,)), ((6, 5), (7, 5), (1, 7)),
                   ((2, 6, 5), (7, 5), (1, 7)), ((2, 6, 5), (7, 5), (1, 1)), ((5,), (7, 5), (1, 7)),
                   ((2, 6, 5), (5,), ()), ((2, 6, 5), (5,), (1, 1))]


@pytest.mark.parametrize("x_shape,w_shape,b_shape", BROADCAST_CASES, ids=str)
def test_vector_weight_and_broadcast_bias_match_torch(device, x_shape, w_shape, b_shape):
    gen = torch.Generator().manual_seed(len(x_shape) * 100 + len(w_shape) * 10 + len(b_shape or ()))
    x, weight = (torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
                 for shape in (x_shape, w_shape))
    bias = None if b_shape is None else torch.randn(b_shape, generator=gen, dtype=torch.float64).to(device)
    bias = bias.requires_grad_() if bias is not None else None
    with count_launches() as launches:
        out = gpunn.functional.linear(x, weight, bias, "tanh")
    assert launches == {"dense_forward_kernel": 1}
    leaves = [t for t in (x, weight, bias) if t is not None]
    ref_leaves = [leaf64(t) for t in leaves]
    ref = reference_linear(*ref_leaves, *([None] if bias is None else []), "tanh")
    assert_close(out, ref, torch.float64, "output")
    grad_output = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(device)
    grads = torch.autograd.grad(out, leaves, grad_output)
    grads64 = torch.autograd.grad(ref, ref_leaves, grad_output)
    for name, g, g64 in zip(["input", "weight", "bias"], grads, grads64):
        assert_close(g, g64, torch.float64, f"grad {name}")


@pytest.mark.parametrize("x_shape,w_shape,b_shape,error", [
    ((6, 5), (5,), (1,), RuntimeError), ((5,), (5,), (1,), RuntimeError),  # torch: "mat2 must be a matrix"
    ((6, 5), (7, 5), (2, 7), RuntimeError), ((6, 5), (1, 5), (6,), RuntimeError),  # do not broadcast
    ((6, 5), (7, 5), (1, 1, 7), RuntimeError), ((5,), (7, 5), (1, 1, 7), RuntimeError),  # add dims
    # A bias that varies along the batch dims (torch adds it after its product):
    ((6, 5), (7, 5), (6, 7), NotImplementedError), ((2, 6, 5), (7, 5), (2, 1, 7), NotImplementedError),
    ((2, 6, 5), (5,), (2, 6), NotImplementedError),
], ids=str)
def test_unsupported_bias_raises_before_any_launch(device, x_shape, w_shape, b_shape, error):
    args = [torch.randn(shape, device=device) for shape in (x_shape, w_shape, b_shape)]
    with count_launches() as launches, raises_exactly(error):
        gpunn.functional.linear(*args)
    assert launches == {}
    if error is RuntimeError:
        with pytest.raises(RuntimeError):
            torch.nn.functional.linear(*args)


@pytest.mark.parametrize("make_args,match", [
    (lambda d: (torch.randn(2, 5, device=d), torch.randn(3, 4, device=d)), "shapes cannot be multiplied"),
    (lambda d: (torch.randn(2, 4, device=d, dtype=torch.float64), torch.randn(3, 4, device=d)), "same dtype"),
    (lambda d: (torch.tensor(1.0, device=d), torch.randn(3, 4, device=d)), "at least 1D"),
    # Integer matmul: torch runs it on CPU only; gpunn's kernels are floating point (RuntimeError, as on CUDA).
    (lambda d: (torch.ones(2, 4, device=d, dtype=torch.int64), torch.ones(3, 4, device=d, dtype=torch.int64)),
     "supports float16"),
    (lambda d: (torch.randn(2, 4, device=d), torch.randn(3, 4, device=d), torch.randn(5, device=d)), "bias"),
    (lambda d: (torch.randn(2, 4, device=d), torch.randn(3, 4, 2, device=d)), "2-D weight"),
])
def test_bad_inputs_raise_before_any_launch(device, make_args, match):
    args = make_args(device)
    with count_launches() as launches, pytest.raises(RuntimeError, match=match):
        gpunn.functional.linear(*args)
    assert launches == {}
    if args[0].is_floating_point():
        # torch.nn.functional.linear rejects the same inputs with the same exception type.
        with pytest.raises(RuntimeError):
            torch.nn.functional.linear(*args)


def test_unknown_activation(device):
    with pytest.raises(ValueError, match="Unknown activation"):
        gpunn.functional.linear(torch.randn(2, 4, device=device), torch.randn(3, 4, device=device), None, "swish")


def test_autocast_matches_nn_linear_dtype(device):
    # Under autocast, nn.Linear computes in the autocast dtype; gpunn.Linear does the same.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    layer = gpunn.Linear(8, 5, device=device)
    ref_layer = torch.nn.Linear(8, 5, device=device)
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(6, 8, device=device)
    with torch.autocast(device.type, dtype=dtype):
        out = layer(x)
        ref = ref_layer(x)
    assert out.dtype == ref.dtype == dtype
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert_close(out, reference_linear(x.double(), layer.weight.double().to(dtype).double(),
                                       layer.bias.double(), None), dtype, "autocast output")
    # The weights' 16-bit cast is reused while a graph holds it and the weights are unchanged: new values
    # given without a version bump but in new storage (vector_to_parameters sets .data) are cast again.
    with torch.autocast(device.type, dtype=dtype):
        kept = layer(x)
    torch.nn.utils.vector_to_parameters(3 * torch.nn.utils.parameters_to_vector(layer.parameters()),
                                        layer.parameters())
    with torch.autocast(device.type, dtype=dtype):
        again = layer(x)
    assert kept.grad_fn is not None
    assert_close(again, reference_linear(x.double(), layer.weight.double().to(dtype).double(),
                                         layer.bias.double(), None), dtype, "output after new weights")


@pytest.mark.parametrize("activation", [None, "leaky_relu", "gelu"])
def test_output_can_be_modified_in_place(device, activation):
    # As with nn.Linear and an activation module after it (torch's leaky_relu and gelu save their input):
    # an in-place residual add and ReLU on the output, then backward.
    layer = gpunn.Linear(6, 6, device=device, dtype=torch.float64, activation=activation, negative_slope=0.2)
    x = torch.randn(3, 2, 6, device=device, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out += x
    torch.relu_(out)
    out.sum().backward()
    ref_x = leaf64(x)
    ref_x.requires_grad_()
    ref_out = reference_linear(ref_x, layer.weight, layer.bias, activation, 0.2)
    torch.relu(ref_out + ref_x).sum().backward()
    assert_close(x.grad, ref_x.grad, torch.float64, "grad input")


def test_zero_out_features_with_activation(device):
    _run_case(device, torch.float64, (4,), 5, 0, "gelu")


def test_inference_writes_no_derivative(device, monkeypatch):
    calls = []
    original = dense.forward
    monkeypatch.setattr(dense, "forward", lambda *a, **k: calls.append(a[5]) or original(*a, **k))
    layer = gpunn.Linear(6, 4, device=device, activation="gelu")
    x = torch.randn(3, 6, device=device)
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer(x)
    layer(x)
    assert calls == [False, False, True]  # save_derivative: only when autograd records the call


def test_tf32_through_torch_new_precision_api(device):
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has no fp32_precision setting")
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        x, w = torch.randn(9, 40, device=device), torch.randn(7, 40, device=device)
        assert rel_error(gpunn.functional.linear(x, w), torch.nn.functional.linear(x.double(), w.double())) < 1e-3
        matmul.fp32_precision = "ieee"
        assert rel_error(gpunn.functional.linear(x, w),
                         torch.nn.functional.linear(x.double(), w.double())) < TOLERANCE[torch.float32]
    finally:
        matmul.fp32_precision = previous


def test_fp32_dot_precision_follows_every_torch_setting():
    matmul, backends = torch.backends.cuda.matmul, torch.backends
    previous = (matmul.fp32_precision, backends.fp32_precision)
    try:
        for setting, expected in (("tf32", "tf32"), ("ieee", "ieee")):
            matmul.fp32_precision = setting
            assert runtime.dot_precision(torch.float32) == expected
        matmul.fp32_precision = "none"
        for setting, expected in (("tf32", "tf32"), ("ieee", "ieee")):
            backends.fp32_precision = setting
            assert runtime.dot_precision(torch.float32) == expected
        backends.fp32_precision = "none"
        for setting, expected in (("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")):
            torch.set_float32_matmul_precision(setting)
            assert runtime.dot_precision(torch.float32) == expected
        for flag, expected in ((True, "tf32"), (False, "ieee")):
            matmul.allow_tf32 = flag
            assert runtime.dot_precision(torch.float32) == expected
        assert runtime.dot_precision(torch.float64) == runtime.dot_precision(torch.bfloat16) == "ieee"
    finally:
        matmul.fp32_precision, backends.fp32_precision = previous


def test_relu_gradient_passes_nan_like_torch(device):
    x = torch.tensor([[float("nan"), 1.0]], device=device, dtype=torch.float64, requires_grad=True)
    w = torch.eye(2, device=device, dtype=torch.float64)
    gpunn.functional.linear(x, w, None, "relu").sum().backward()
    ref = x.detach().clone().requires_grad_()
    torch.relu(torch.nn.functional.linear(ref, w)).sum().backward()
    assert torch.equal(x.grad, ref.grad)


@pytest.mark.parametrize("activation", ["tanh", "gelu_tanh"])
@pytest.mark.parametrize("scale", [1e-4, 1e-2, 0.2, 3.0])
def test_tanh_keeps_relative_accuracy_near_zero(device, activation, scale):
    # Pre-activations of about `scale`: tanh(u) ~ u must keep fp32's relative accuracy however small u is.
    x = torch.randn(40, 30, device=device) * scale
    w = torch.eye(30, device=device)
    out = gpunn.functional.linear(x, w, None, activation)
    assert_close(out, reference_linear(x.double(), w.double(), None, activation), torch.float32, activation)


def test_wide_row_variants_compute_what_the_int32_ones_do(device, monkeypatch):
    """Past 2**31 rows the dz pass, the double-backward pass and the weight gradient's splits start their
    blocks of rows in int64 (WIDE_ROWS); lowering the threshold runs those variants on a small batch, and
    they must give the int32 variants' results bit for bit."""
    from gpunn.kernels import dense_double_backward

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    layer = gpunn.Linear(8, 5, activation="gelu", device=device, dtype=torch.float64)

    def gradients():
        y = layer(x)
        first = torch.autograd.grad(y, [x, layer.weight, layer.bias], torch.ones_like(y), create_graph=True)
        return first + torch.autograd.grad(first[0].square().sum(), [x, layer.weight, layer.bias])

    expected = gradients()
    monkeypatch.setattr(runtime, "INT32_ROWS", 0)
    asked = []  # what each launcher passed as WIDE_ROWS

    def wide_rows(m, rows):
        asked.append(runtime.wide_rows(m, rows))
        return asked[-1]

    for module in (dense, dense_double_backward):
        monkeypatch.setattr(module, "wide_rows", wide_rows)
    with count_launches() as launches:
        wide = gradients()
    assert launches["dense_grad_preactivation_kernel"] and launches["dense_double_backward_kernel"]
    assert asked and all(asked)
    for ours, theirs in zip(wide, expected):
        assert torch.equal(ours, theirs)


def test_tile_counts_and_block_starts_do_not_wrap_near_two_to_the_31(device):
    """The kernels' tile counts (loop bounds, program grids) of an int32 size: right within a block of 2**31
    too, where tl.cdiv's size + BLOCK - 1 wraps (a dense layer of 2**31 - 1 input features had run no step of
    its reduction and returned act(bias)). Sizes of 2**31 and more reach kernels as int64, and the masked
    kernels' block starts (an int32 block index from a layout's table, times the block) follow them there (a
    block past 2**31 had started at a negative column)."""
    import triton
    import triton.language as tl

    @triton.jit
    def counts(out_ptr, index_ptr, size):
        tl.store(out_ptr, tiling.tile_count(size, 64))
        tl.store(out_ptr + 1, tiling.as_wide_as(tl.load(index_ptr), size) * 64)

    for size in (0, 1, 63, 64, 65, 2**31 - 64, 2**31 - 63, 2**31 - 1, 2**31 + 64):
        out = torch.full((2,), -1, dtype=torch.int64, device=device)
        last_block = torch.tensor([(size - 1) // 64 if size else 0], dtype=torch.int32, device=device)
        counts[(1,)](out, last_block, size)
        assert out.tolist() == [-(-size // 64), last_block.item() * 64], size
