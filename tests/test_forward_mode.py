"""Forward-mode AD through every gpunn layer and the losses over class indices, against torch.nn in float64:
torch.func.jvp and jacfwd, torch.func.hessian (forward mode over the first-order backward; not through
gpunn.RNN), jvp of a gradient (Hessian-vector products), and torch.autograd.forward_ad in eager mode. What has
no forward mode (gpunn.RNN's backward under the transforms, class probabilities, class weights' tangents,
forward mode over forward mode, a gradient of a tangent) is refused; an open dual level that no dual reaches
changes nothing."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from helpers import ACTIVATIONS, TorchOpSpy, assert_close, case_seed, count_launches, reference_linear

import gpunn
from gpunn import reference as torch_reference
from gpunn.kernels import rnn_sequence

DT = torch.float64
SLOPE = -0.2  # leaky_relu's derivative then comes from the act'(z) its forward saves
LAYERS = ["dense", "masked"]


def _mask(n, k):
    """About half the connections, an output with no inputs and an input no output reads."""
    mask = torch.rand(n, k, generator=torch.Generator().manual_seed(n * k)) < 0.5
    mask[n // 2] = False
    mask[:, k // 2] = False
    return mask


def _layer(kind, activation, device):
    """(gpunn's function of (x, w, b), torch's), the masked pair closing over its mask."""
    if kind == "dense":
        return (lambda x, w, b: gpunn.functional.linear(x, w, b, activation, SLOPE),
                lambda x, w, b: reference_linear(x, w, b, activation, SLOPE))
    mask = _mask(5, 7).to(device)
    return (lambda x, w, b: gpunn.functional.masked_linear(x, w, mask, b, activation, SLOPE),
            lambda x, w, b: torch_reference.masked_linear(x, w, mask, b, activation, SLOPE))


def _tensors(device, *shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=DT).to(device) for shape in shapes)


SHAPES = ((2, 3, 7), (5, 7), (5,))  # x with two leading dims, W, b: odd sizes


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_jvp_matches_torch(device, kind, activation):
    ours, theirs = _layer(kind, activation, device)
    primals = _tensors(device, *SHAPES, seed=case_seed("primals", kind, activation))
    tangents = _tensors(device, *SHAPES, seed=case_seed("tangents", kind, activation))
    with TorchOpSpy() as spy, count_launches() as launches:
        output, tangent = torch.func.jvp(ours, primals, tangents)
    expected = torch.func.jvp(theirs, primals, tangents)
    assert_close(output, expected[0], DT, "output")
    assert_close(tangent, expected[1], DT, "tangent")
    assert spy.matmuls() == [], f"torch ran {spy.matmuls()}"
    forward = "dense_forward_kernel" if kind == "dense" else "masked_forward_kernel"
    assert launches[forward] == 2, launches  # the layer's GEMM, then z' over [x' | x] and [W | W']


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 2), (1, 2)])
def test_jvp_of_some_arguments_matches_torch(device, kind, which):
    """Tangents on some of (x, W, b): the others are constants, as in torch."""
    ours, theirs = _layer(kind, "gelu", device)
    primals = _tensors(device, *SHAPES, seed=case_seed("primals", kind, which))
    tangents = _tensors(device, *(SHAPES[i] for i in which), seed=case_seed("tangents", kind, which))

    def partial(function):
        def run(*chosen):
            args = list(primals)
            for i, value in zip(which, chosen):
                args[i] = value
            return function(*args)
        return run

    chosen = tuple(primals[i] for i in which)
    mine, expected = (torch.func.jvp(partial(f), chosen, tuple(tangents)) for f in (ours, theirs))
    assert_close(mine[1], expected[1], DT, "tangent")


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "silu"])
def test_hessian_matches_torch(device, kind, activation):
    """torch.func.hessian (jacfwd over jacrev: forward mode through the first-order backward) of a scalar of
    the layer, in the input and in the weight and bias."""
    ours, theirs = _layer(kind, activation, device)
    x, w, b = _tensors(device, (3, 7), (5, 7), (5,), seed=case_seed("hessian", kind, activation))

    def scalar(function, argnums):
        return torch.func.hessian(lambda *t: function(*t).sin().sum(), argnums=argnums)(x, w, b)

    for argnums in (0, (1, 2)):
        mine, expected = scalar(ours, argnums), scalar(theirs, argnums)
        for row_mine, row_expected in zip(torch.utils._pytree.tree_leaves(mine),
                                          torch.utils._pytree.tree_leaves(expected), strict=True):
            assert_close(row_mine, row_expected, DT, f"Hessian in {argnums}")


@pytest.mark.parametrize("kind", LAYERS)
def test_hessian_vector_product_of_an_mlp_matches_torch(device, kind):
    """jvp of grad over two layers and torch's cross-entropy: the Hessian-vector product in the parameters."""
    mask = _mask(5, 7).to(device)
    first = (gpunn.Linear(7, 5, activation="tanh") if kind == "dense"
             else gpunn.MaskedLinear(7, 5, mask, activation="tanh")).to(device=device, dtype=DT)
    ours = torch.nn.Sequential(first, gpunn.Linear(5, 3)).to(device=device, dtype=DT)
    theirs = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device, DT)
    params = {name: value.detach() for name, value in ours.named_parameters()}
    twin = {"0.weight": params["0.weight"] * (mask if kind == "masked" else 1), "0.bias": params["0.bias"],
            "2.weight": params["1.weight"], "2.bias": params["1.bias"]}
    x = _tensors(device, (4, 7), seed=case_seed("mlp", kind))[0]
    target = torch.tensor([0, 2, 1, 2], device=device)
    vector = {name: t for name, t in zip(params, _tensors(device, *(p.shape for p in params.values()), seed=1))}
    twin_vector = {"0.weight": vector["0.weight"] * (mask if kind == "masked" else 1), "0.bias": vector["0.bias"],
                   "2.weight": vector["1.weight"], "2.bias": vector["1.bias"]}

    def loss(model):
        return lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), target)

    _, mine = torch.func.jvp(torch.func.grad(loss(ours)), (params,), (vector,))
    _, expected = torch.func.jvp(torch.func.grad(loss(theirs)), (twin,), (twin_vector,))
    for name, twin_name in zip(params, twin):
        assert_close(mine[name], expected[twin_name] * (mask if name == "0.weight" and kind == "masked" else 1),
                     DT, name)
    if kind == "masked":  # a masked-out weight's gradient is constant zero: so is its tangent
        assert (mine["0.weight"][~mask] == 0).all()


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.enable_grad])
def test_eager_forward_ad_matches_torch(device, kind, grad_mode):
    """torch.autograd.forward_ad: duals on the input and the weight; under no_grad too (which forward mode
    ignores, in torch as here)."""
    ours, theirs = _layer(kind, "gelu", device)
    x, w, b, tx, tw = _tensors(device, *SHAPES, (2, 3, 7), (5, 7), seed=case_seed("eager", kind))
    results = []
    for function in (ours, theirs):
        with grad_mode(), forward_ad.dual_level():
            output = function(forward_ad.make_dual(x, tx), forward_ad.make_dual(w, tw), b)
            results.append(forward_ad.unpack_dual(output))
    assert_close(results[0].primal, results[1].primal, DT, "output")
    assert_close(results[0].tangent, results[1].tangent, DT, "tangent")


@pytest.mark.parametrize("kind", LAYERS)
def test_eager_forward_over_reverse_matches_torch(device, kind):
    """A dual input through forward, then a gradient with create_graph=True: the gradient's tangent."""
    ours, theirs = _layer(kind, "tanh", device)
    x, w, b, tx = _tensors(device, *SHAPES, (2, 3, 7), seed=case_seed("forward over reverse", kind))
    results = []
    for function in (ours, theirs):
        weight = w.clone().requires_grad_()
        with forward_ad.dual_level():
            output = function(forward_ad.make_dual(x, tx), weight, b)
            grad, = torch.autograd.grad(output.pow(2).sum(), weight, create_graph=True)
            results.append(forward_ad.unpack_dual(grad).tangent)
    assert results[1] is not None and results[0] is not None
    assert_close(results[0], results[1], DT, "the gradient's tangent")


@pytest.mark.parametrize("shape", [(7,), (1, 7), (3, 7)])
def test_a_bias_tangent_alone_gives_a_tangent_of_its_own(device, shape):
    """Without an activation y' = b' broadcast: a new tensor, not a view of b' (over one row the expanded b'
    reads as contiguous), so that an in-place change of either leaves the other alone, as in torch."""
    x, w, b, t_b = _tensors(device, shape, (5, 7), (5,), (5,), seed=case_seed("bias alone", shape))
    kept = t_b.clone()
    _, tangent = torch.func.jvp(lambda bias: gpunn.functional.linear(x, w, bias), (b,), (t_b,))
    tangent.zero_()
    assert torch.equal(t_b, kept)
    with forward_ad.dual_level():
        output = gpunn.functional.linear(x, w, forward_ad.make_dual(b, t_b))
        forward_ad.unpack_dual(output).tangent.mul_(3)
    assert torch.equal(t_b, kept)


@pytest.mark.parametrize("kind", LAYERS + ["rnn_cell"])
def test_a_plain_backward_inside_a_dual_level_matches_torch(device, kind):
    """A loss whose graph holds a dual (a jvp-based term in the same forward), then a gradient without
    create_graph inside the dual level: the gradient, and its tangent, as torch's (the backward runs as the
    differentiable op, whose jvp rule carries the tangent)."""
    x, t_x, h = _tensors(device, (4, 7), (4, 7), (4, 5), seed=case_seed("plain backward", kind))
    if kind == "rnn_cell":
        ours = gpunn.RNNCell(7, 5).to(device, DT)
        theirs = torch.nn.RNNCell(7, 5).to(device, DT)
        theirs.load_state_dict(ours.state_dict())
        layers = [(lambda t, m=m: m(t, h), m.weight_ih) for m in (ours, theirs)]
    else:
        w, b = (t.clone().requires_grad_() for t in _tensors(device, (5, 7), (5,), seed=1))
        layers = [(lambda t, f=f: f(t, w, b), w) for f in _layer(kind, "gelu", device)]
    results = []
    for call, weight in layers:
        with forward_ad.dual_level():
            grad, = torch.autograd.grad(call(forward_ad.make_dual(x, t_x)).pow(2).sum(), weight)
            results.append(forward_ad.unpack_dual(grad))
    assert_close(results[0][0], results[1][0], DT, "gradient")
    assert results[0][1] is not None and results[1][1] is not None
    assert_close(results[0][1], results[1][1], DT, "the gradient's tangent")


def test_an_open_dual_level_without_duals_changes_nothing(device):
    """Inside forward_ad.dual_level() with no dual tensor: the same launches as outside (first-order backward,
    the RNN's fused kernels, per-sample folds, no act'(z) written for gelu under no_grad), and first order's
    tolerance of an in-place change of the input after the forward (a frozen weight)."""
    layer = gpunn.Linear(7, 5, activation="tanh").to(device, DT).requires_grad_(False)
    rnn, gelu = gpunn.RNN(3, 4).to(device, DT), gpunn.Linear(7, 5, activation="gelu").to(device, DT)
    x, xs, seq = _tensors(device, (3, 7), (6, 2, 7), (6, 2, 3), seed=case_seed("open level"))
    params = {key: value.detach() for key, value in gelu.named_parameters()}
    per_sample = torch.func.vmap(torch.func.grad(lambda p, t: torch.func.functional_call(gelu, p, (t,)).sum()),
                                 in_dims=(None, 0))

    def calls():
        leaf = x.clone().requires_grad_()
        inputs = leaf * 1
        layer(inputs).sum().backward()  # then changed in place: first order does not read it
        inputs.add_(1)
        rnn(seq)[0].sum().backward()
        per_sample(params, xs)
        with torch.no_grad():
            gelu(x)

    launches = []
    for level in (contextlib.nullcontext, forward_ad.dual_level):
        with level(), count_launches() as counted:
            calls()
        launches.append(counted)
    assert launches[0] == launches[1]


@pytest.mark.parametrize("name", ["samples_gelu", "members", "mse", "cross_entropy"])
def test_eager_duals_carried_into_vmap_match_torch(device, name):
    """A dual made outside torch.func.vmap and batched by it (over samples, or beside weights vmap stacks as
    an ensemble's members): forward mode reaches the calls beneath vmap's wrapper (act'(z) saved, sums not
    split into groups), as torch's own layers give (it had been refused)."""
    x, t_x, w, b = _tensors(device, (2, 5, 4), (2, 5, 4), (3, 4), (3,), seed=case_seed("dual into vmap", name))
    target = torch.tensor([0, 1, 2, 3, 0], device=device)
    ours, theirs = {
        "samples_gelu": (lambda a: gpunn.functional.linear(a, w, b, "gelu"), lambda a: F.gelu(F.linear(a, w, b))),
        "members": (None, None),
        "mse": (lambda a: gpunn.functional.mse_loss(a, torch.zeros_like(a)),
                lambda a: F.mse_loss(a, torch.zeros_like(a))),
        "cross_entropy": (lambda a: gpunn.functional.cross_entropy(a, target), lambda a: F.cross_entropy(a, target)),
    }[name]
    results = []
    for function in ("ours", "theirs"):
        with forward_ad.dual_level(), count_launches() as launches:
            if name == "members":  # one dual input, vmap over two members' weights
                dual = forward_ad.make_dual(x[0], t_x[0])
                layer = gpunn.functional.linear if function == "ours" else F.linear
                out = torch.func.vmap(lambda weight: layer(dual, weight, b))(torch.stack([w, 2 * w]))
            else:
                out = torch.func.vmap(ours if function == "ours" else theirs)(forward_ad.make_dual(x, t_x))
            results.append(forward_ad.unpack_dual(out))
        assert bool(launches) == (function == "ours"), launches
    assert_close(results[0].primal, results[1].primal, DT, "output")
    assert_close(results[0].tangent, results[1].tangent, DT, "tangent")


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name", ["dense_tanh", "rnn_cell", "cross_entropy"])
def test_hessian_and_jacfwd_under_no_grad_and_inference_mode_match_torch(device, mode, name):
    """torch.func computes under no_grad and inference_mode (its transforms keep their own autograd): the
    checks for dual tensors must not ask vmap's batched tensors or inference tensors (torch's internal errors)."""
    x, w, hx = _tensors(device, (5, 4), (3, 4), (5, 3), seed=case_seed("no grad hessian", name))
    target = torch.tensor([0, 1, 2, 1, 0], device=device)
    cell = torch.nn.RNNCell(4, 3, bias=False).to(device, DT)
    functions = {
        "dense_tanh": (lambda v: gpunn.functional.linear(x, v, None, "tanh").pow(2).sum(),
                       lambda v: torch.tanh(F.linear(x, v)).pow(2).sum(), w),
        "rnn_cell": (lambda v: gpunn.functional.rnn_cell(x, hx, v, cell.weight_hh).pow(2).sum(),
                     lambda v: torch.func.functional_call(cell, {"weight_ih": v, "weight_hh": cell.weight_hh},
                                                          (x, hx)).pow(2).sum(), w),
        "cross_entropy": (lambda v: gpunn.functional.cross_entropy(v, target),
                          lambda v: F.cross_entropy(v, target), x),
    }
    ours, theirs, at = functions[name]
    with mode():
        for transform in (torch.func.hessian, lambda f: torch.func.jacfwd(torch.func.grad(f))):
            with count_launches() as launches:
                hessian = transform(ours)(at)
            assert launches
            assert_close(hessian, transform(theirs)(at), DT, "hessian")


def test_a_dual_made_of_an_inference_tensor_carries_its_tangent(device):
    """Data made under inference_mode, made a dual outside it: its tangent reaches the output as torch's does
    (inference tensors are skipped by the dual check only where unpack_dual cannot look at them)."""
    with torch.inference_mode():
        x = _tensors(device, (4, 3), seed=case_seed("inference dual"))[0]
    t, w, b = _tensors(device, (4, 3), (2, 3), (2,), seed=case_seed("inference dual") + 1)
    tangents = []
    for layer in (lambda a: gpunn.functional.linear(a, w, b, "gelu"), lambda a: F.gelu(F.linear(a, w, b))):
        with forward_ad.dual_level():
            tangents.append(forward_ad.unpack_dual(layer(forward_ad.make_dual(x, t))).tangent)
    assert tangents[0] is not None
    assert_close(tangents[0], tangents[1], DT, "tangent")


def test_forward_mode_under_tracing_and_vectorized_is_refused(device):
    """torch.func.linearize (forward mode traced by make_fx, which would record the kernels' outputs as bare
    allocations) and torch's legacy-vmap forward-mode Jacobians: NotImplementedError, not a wrong tangent or
    torch's internal error."""
    x, w, b = _tensors(device, (3, 7), (5, 7), (5,), seed=case_seed("linearize"))
    layer = lambda t: gpunn.functional.linear(t, w, b, "gelu")  # noqa: E731
    with pytest.raises(NotImplementedError, match="under a tracing mode"):
        torch.func.linearize(layer, x)
    with pytest.raises(NotImplementedError, match="vectorized forward-mode Jacobians"):
        torch.autograd.functional.jacobian(layer, x, vectorize=True, strategy="forward-mode")


def test_jacfwd_of_a_vector_function_and_a_1d_weight_match_torch(device):
    """jacfwd (vmap over jvp: the tangents fold into rows) of a 1-D input with a broadcast bias, and of a 1-D
    weight (one output, its dim dropped)."""
    x, w, w1, b = _tensors(device, (7,), (5, 7), (7,), (1,), seed=case_seed("jacfwd"))
    cases = [(lambda t: gpunn.functional.linear(t, w, b, "silu"), lambda t: F.silu(F.linear(t, w, b))),
             (lambda t: gpunn.functional.linear(t, w1, None, "tanh"), lambda t: torch.tanh(F.linear(t, w1)))]
    for ours, theirs in cases:
        assert_close(torch.func.jacfwd(ours)(x), torch.func.jacfwd(theirs)(x), DT, "Jacobian")


def test_jvp_of_per_sample_gradients_and_of_an_ensemble_match_torch(device):
    """Forward mode over vmap's folds (per-sample weight gradients, an ensemble's members): each sample then
    runs apart, as the tangent rules take one sum over all rows and one weight."""
    layer = gpunn.Linear(7, 5, activation="gelu").to(device=device, dtype=DT)
    xs, w, b, tw, ws, tws = _tensors(device, (4, 3, 7), (5, 7), (5,), (5, 7), (3, 5, 7), (3, 5, 7),
                                     seed=case_seed("folds"))

    def per_sample(function):
        loss = lambda weight, x: function(x, weight, b).pow(2).sum()  # noqa: E731
        return lambda weight: torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(weight, xs)

    def ensemble(function):
        return lambda weights: torch.func.vmap(lambda weight: function(xs[0], weight, b))(weights)

    ours = lambda x, weight, bias: torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))  # noqa
    theirs = lambda x, weight, bias: F.gelu(F.linear(x, weight, bias))  # noqa: E731
    for make, primal, tangent in ((per_sample, w, tw), (ensemble, ws, tws)):
        mine, expected = (torch.func.jvp(make(f), (primal,), (tangent,))[1] for f in (ours, theirs))
        assert_close(mine, expected, DT, make.__name__)


# The locally connected layers and the RNN cell: (gpunn's module, torch's function of (params, x, *rest), x's
# shape, the rest). Odd sizes, few parameters (jacfwd over them runs the gradient ops' tangents once a basis
# vector).
def _other_layers(device):
    hx = torch.randn(3, 6, dtype=DT, device=device)
    return {
        "local2d": (gpunn.LocallyConnected2d(1, 2, (4, 3), 2, stride=2, padding=1),
                    lambda p, x: torch_reference.locally_connected2d(x, p["weight"], p["bias"], 2, 1), (2, 1, 4, 3),
                    ()),
        "local1d_no_bias": (gpunn.LocallyConnected1d(1, 2, 5, 3, padding=1, bias=False),
                            lambda p, x: torch_reference.locally_connected1d(x, p["weight"], None, 1, 1), (2, 1, 5),
                            ()),
        "rnn_cell_tanh": (gpunn.RNNCell(4, 6), torch.nn.RNNCell(4, 6), (3, 4), (hx,)),
        "rnn_cell_relu_no_bias": (gpunn.RNNCell(4, 6, bias=False, nonlinearity="relu"),
                                  torch.nn.RNNCell(4, 6, bias=False, nonlinearity="relu"), (3, 4), (hx,)),
    }


@pytest.mark.parametrize("name", ["local2d", "local1d_no_bias", "rnn_cell_tanh", "rnn_cell_relu_no_bias"])
def test_other_layers_forward_mode_matches_torch(device, name):
    """jvp in the input, the parameters and the cell's hx; hessian in the input and the parameters; eager
    dual tensors. (The local layers' ops are bilinear; the cell's tangent is the dense layer's over its
    operands side by side.)"""
    module, theirs, shape, rest = _other_layers(device)[name]
    module = module.to(device=device, dtype=DT)
    if isinstance(theirs, torch.nn.Module):
        twin = theirs.to(device=device, dtype=DT)
        theirs = lambda p, *inputs: torch.func.functional_call(twin, p, inputs)  # noqa: E731
    ours = lambda p, *inputs: torch.func.functional_call(module, p, inputs)  # noqa: E731
    seed = case_seed("other layers", name)
    params = {key: t for key, t in zip(dict(module.named_parameters()),
                                       _tensors(device, *(p.shape for p in module.parameters()), seed=seed))}
    t_params = {key: t for key, t in zip(params, _tensors(device, *(p.shape for p in params.values()), seed=seed + 1))}
    x, t_x = _tensors(device, shape, shape, seed=seed + 2)
    t_rest = tuple(torch.randn_like(r) for r in rest)
    for what, function in (("jvp", lambda f: torch.func.jvp(lambda p, x, *r: f(p, x, *r), (params, x, *rest),
                                                            (t_params, t_x, *t_rest))[1]),
                           ("hessian in x", lambda f: torch.func.hessian(lambda x: f(params, x, *rest).sin().sum())(x)),
                           ("hessian in params", lambda f: torch.utils._pytree.tree_leaves(
                               torch.func.hessian(lambda p: f(p, x, *rest).sin().sum())(params))),
                           ("eager dual", lambda f: _eager_tangent(f, params, x, t_x, rest))):
        mine, expected = function(ours), function(theirs)
        for one, other in zip(torch.utils._pytree.tree_leaves(mine), torch.utils._pytree.tree_leaves(expected),
                              strict=True):
            assert_close(one, other, DT, what)


def _eager_tangent(function, params, x, t_x, rest):
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(function(params, forward_ad.make_dual(x, t_x), *rest)).tangent


# The losses: (gpunn's function of (x, *rest), torch's, x's shape, the rest). Odd sizes.
def _losses(device):
    gen = torch.Generator().manual_seed(5)
    target = torch.tensor([1, 0, 4], device=device)
    weight = (torch.rand(5, generator=gen, dtype=DT) + 0.5).to(device)
    y = torch.randn(3, 5, generator=gen, dtype=DT).to(device)
    return {
        "cross_entropy_mean_smoothed": (lambda x: gpunn.functional.cross_entropy(x, target, label_smoothing=0.1),
                                        lambda x: F.cross_entropy(x, target, label_smoothing=0.1), (3, 5)),
        "cross_entropy_weighted_ignore_none": (
            lambda x: gpunn.functional.cross_entropy(x, target, weight, ignore_index=0, reduction="none"),
            lambda x: F.cross_entropy(x, target, weight, ignore_index=0, reduction="none"), (3, 5)),
        "cross_entropy_2d_sum": (lambda x: gpunn.functional.cross_entropy(x, target[:2].view(1, 2), reduction="sum"),
                                 lambda x: F.cross_entropy(x, target[:2].view(1, 2), reduction="sum"), (1, 5, 2)),
        "mse_mean": (lambda x: gpunn.functional.mse_loss(x, y), lambda x: F.mse_loss(x, y), (3, 5)),
        "mse_none_target_too": (lambda x: gpunn.functional.mse_loss(x, x.flip(0) * y, reduction="none"),
                                lambda x: F.mse_loss(x, x.flip(0) * y, reduction="none"), (3, 5)),
    }


@pytest.mark.parametrize("name", list(_losses("cpu")))
def test_losses_forward_mode_matches_torch(device, name):
    """jvp, jacfwd, hessian (forward mode over the losses' backward), eager dual tensors; one loss's target
    varies with the input (the target's tangent)."""
    ours, theirs, shape = _losses(device)[name]
    x, t_x = _tensors(device, shape, shape, seed=case_seed("losses", name))
    for what, function in (("jvp", lambda f: torch.func.jvp(f, (x,), (t_x,))[1]),
                           ("jacfwd", lambda f: torch.func.jacfwd(f)(x)),
                           ("hessian", lambda f: torch.func.hessian(lambda t: f(t).sin().sum())(x)),
                           ("eager dual", lambda f: _eager_tangent(lambda p, t: f(t), None, x, t_x, ()))):
        assert_close(function(ours), function(theirs), DT, what)


def test_hessian_of_an_mlp_loss_through_gpunn_only_matches_torch(device):
    """torch.func.hessian of gpunn's cross-entropy over two gpunn layers, in the input."""
    ours = torch.nn.Sequential(gpunn.Linear(7, 5, activation="gelu"), gpunn.Linear(5, 3)).to(device, DT)
    theirs = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 3)).to(device, DT)
    theirs[0].load_state_dict(ours[0].state_dict())
    theirs[2].load_state_dict(ours[1].state_dict())
    x = _tensors(device, (4, 7), seed=case_seed("mlp loss"))[0]
    target = torch.tensor([0, 2, 1, 2], device=device)
    hessians = [torch.func.hessian(lambda t: loss(model(t), target))(x)
                for model, loss in ((ours, gpunn.functional.cross_entropy), (theirs, F.cross_entropy))]
    assert_close(*hessians, DT, "Hessian")


RNN_CONFIGS = {"tanh": dict(), "two_layers_bidirectional": dict(num_layers=2, bidirectional=True),
               "relu_no_bias": dict(nonlinearity="relu", bias=False),
               "batch_first_bidirectional": dict(batch_first=True, bidirectional=True)}


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("config", list(RNN_CONFIGS))
def test_rnn_forward_mode_matches_torch(device, monkeypatch, config, split):
    """gpunn.RNN: jvp in the input, h0 and every parameter (output and h_n), jacfwd, eager duals; split:
    past the resident limit (forced), the split recurrence kernels."""
    if split:
        monkeypatch.setattr(rnn_sequence, "RESIDENT_BYTES", 0)
    kwargs = RNN_CONFIGS[config]
    hidden = 20 if split else 4  # the resident kernels take hidden sizes up to 16 whatever the limit
    ours = gpunn.RNN(3, hidden, **kwargs).to(device, DT)
    theirs = torch.nn.RNN(3, hidden, **kwargs).to(device, DT)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    seed = case_seed("rnn", config)
    params = dict(zip(dict(ours.named_parameters()), _tensors(device, *(p.shape for p in ours.parameters()),
                                                                seed=seed)))
    t_params = dict(zip(params, _tensors(device, *(p.shape for p in params.values()), seed=seed + 1)))
    shape = (2, 5, 3) if kwargs.get("batch_first") else (5, 2, 3)
    x, t_x, h0, t_h0 = _tensors(device, shape, shape, (layers, 2, hidden), (layers, 2, hidden), seed=seed + 2)

    def call(module):
        return lambda p, x, h: torch.func.functional_call(module, p, (x, h))

    with count_launches() as launches:
        mine = torch.func.jvp(call(ours), (params, x, h0), (t_params, t_x, t_h0))
    expected = torch.func.jvp(call(theirs), (params, x, h0), (t_params, t_x, t_h0))
    assert bool(launches.get("rnn_split_backward_kernel")) == split, launches  # the recurrence's kernel
    for what, one, other in zip(("output", "h_n", "output's tangent", "h_n's tangent"), (*mine[0], *mine[1]),
                                (*expected[0], *expected[1])):
        assert_close(one, other, DT, what)
    assert_close(*(torch.func.jacfwd(lambda t: call(m)(params, t, h0)[0])(x) for m in (ours, theirs)), DT, "jacfwd")
    assert_close(*(_eager_tangent(lambda p, t: call(m)(p, t, h0)[1], params, x, t_x, ()) for m in (ours, theirs)),
                 DT, "eager dual")


def test_rnn_forward_mode_of_a_strided_bias_and_over_reverse_matches_torch(device):
    """gpunn.RNN: a tangent of one bias alone that is a strided view (u is then that bias, expanded, at its own
    column stride); eager forward over reverse, a weight's tangent through the input's gradient (the
    differentiable backward keeps the tangents of what it does not differentiate); a plain gradient inside the
    dual level."""
    ours, theirs = gpunn.RNN(3, 4).to(device, DT), torch.nn.RNN(3, 4).to(device, DT)
    theirs.load_state_dict(ours.state_dict())
    x, pair, t_pair, t_w = _tensors(device, (5, 2, 3), (4, 2), (4, 2), (4, 4), seed=case_seed("rnn strided"))
    tangents = [torch.func.jvp(lambda b: torch.func.functional_call(m, {"bias_ih_l0": b}, (x,))[0], (pair[:, 0],),
                               (t_pair[:, 0],))[1] for m in (ours, theirs)]
    assert_close(*tangents, DT, "strided bias tangent")
    results = []
    for module in (ours, theirs):
        leaf, weight = x.clone().requires_grad_(), module.weight_hh_l0.detach()
        with forward_ad.dual_level():
            params = {"weight_hh_l0": forward_ad.make_dual(weight, t_w)}
            output = torch.func.functional_call(module, params, (leaf,))[0]
            grad, = torch.autograd.grad(output.pow(2).sum(), leaf, create_graph=True)
            plain, = torch.autograd.grad(torch.func.functional_call(module, params, (leaf,))[0].pow(2).sum(), leaf)
            results.append((forward_ad.unpack_dual(grad).tangent, forward_ad.unpack_dual(plain).tangent))
    for what, mine, expected in zip(("create_graph", "plain"), *results):
        assert mine is not None and expected is not None, what
        assert_close(mine, expected, DT, f"the input gradient's tangent ({what})")


def test_rnn_forward_mode_over_packed_sequences_matches_torch(device):
    """Packed sequences (rows that start and stop at different steps, both directions): jvp in the packed data,
    h0 and the parameters, against torch's (reverse mode's double-vjp jvp: torch's RNN takes no forward mode over
    packed data)."""
    ours = gpunn.RNN(3, 4, bidirectional=True).to(device, DT)
    theirs = torch.nn.RNN(3, 4, bidirectional=True).to(device, DT)
    seed = case_seed("packed")
    names = list(dict(ours.named_parameters()))
    params = _tensors(device, *(p.shape for p in ours.parameters()), seed=seed)
    t_params = _tensors(device, *(p.shape for p in params), seed=seed + 1)
    x, h0, t_h0 = _tensors(device, (5, 3, 3), (2, 3, 4), (2, 3, 4), seed=seed + 2)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3, 2]))
    t_data = _tensors(device, tuple(packed.data.shape), seed=seed + 3)[0]

    def call(module):
        def run(*tensors):
            *weights, data, h = tensors
            out, h_n = torch.func.functional_call(module, dict(zip(names, weights)),
                                                  (torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes), h))
            return out.data, h_n
        return run

    primals, tangents = (*params, packed.data, h0), (*t_params, t_data, t_h0)
    mine = torch.func.jvp(call(ours), primals, tangents)[1]
    expected = torch.autograd.functional.jvp(call(theirs), primals, tangents)[1]
    for what, one, other in zip(("output's tangent", "h_n's tangent"), mine, expected):
        assert_close(one, other, DT, what)


def _without_forward_mode(device):
    """Calls of one tensor argument through what has no forward mode: gpunn.RNN, the cross-entropy over class
    probabilities, the class weights' tangent of the cross-entropy."""
    x = torch.randn(2, 3, 5, 4, dtype=DT, device=device)
    rnn = gpunn.RNN(4, 3).to(device, DT)
    target = torch.tensor([0, 2], device=device)
    logits = torch.randn(2, 5, dtype=DT, device=device)
    return {"rnn_hessian": (lambda t: torch.func.grad(lambda u: rnn(u)[0].sum())(t), x[0]),
            "cross_entropy_probabilities": (lambda t: gpunn.functional.cross_entropy(t, t.detach().softmax(1)),
                                            x[0, 0]),
            "cross_entropy_class_weights": (lambda w: gpunn.functional.cross_entropy(logits, target, w),
                                            x[0, 0, 0, :1].expand(5) + 2)}


@pytest.mark.parametrize("name", ["rnn_hessian", "cross_entropy_probabilities", "cross_entropy_class_weights"])
def test_forward_mode_without_a_rule_is_refused(device, name):
    """Refused before any launch where a dual reaches an op without a rule directly (class probabilities);
    where forward mode meets the refusal later (a class weight's tangent in the loss's rule, gpunn.RNN's
    first-order backward under hessian), after the launches before it."""
    call, x = _without_forward_mode(device)[name]
    runs = [lambda: torch.func.jvp(call, (x,), (torch.ones_like(x),))]
    runs += [lambda: _eager_jvp(call, x)] if name != "rnn_hessian" else []  # grad under eager duals: a transform
    for run in runs:
        with count_launches() as launches, pytest.raises(NotImplementedError, match="forward-mode AD"):
            run()
        if name == "cross_entropy_probabilities":
            assert launches == {}, "refused after a launch"


def _eager_jvp(call, x):
    with forward_ad.dual_level():
        return call(forward_ad.make_dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("name", ["dense", "local2d", "rnn_cell", "rnn", "mse", "cross_entropy"])
def test_forward_mode_over_forward_mode_is_refused(device, name):
    """jvp of jvp and jacfwd(jacfwd(f)): torch runs a jvp rule with forward grad off, so the torch ops a rule
    combines its terms with would drop the outer tangent (a zero second derivative, silently): refused."""
    module, _, shape, rest = _other_layers(device)["local2d" if name == "local2d" else "rnn_cell_tanh"]
    module, rnn = module.to(device, DT), gpunn.RNN(4, 3).to(device, DT)
    calls = {"dense": (gpunn.Linear(7, 5, activation="tanh").to(device, DT), (3, 7)),
             "local2d": (module, shape),
             "rnn_cell": (lambda t: module(t, *rest), shape),
             "rnn": (lambda t: rnn(t)[0], (5, 2, 4)),
             "mse": (lambda t: gpunn.functional.mse_loss(t, torch.ones_like(t), reduction="sum"), (3, 5)),
             "cross_entropy": (lambda t: gpunn.functional.cross_entropy(t, torch.tensor([1, 0, 4], device=device)),
                               (3, 5))}
    call, shape = calls[name]
    x = _tensors(device, shape, seed=case_seed("fwd over fwd", name))[0]
    with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
        torch.func.jvp(lambda t: torch.func.jvp(call, (t,), (torch.ones_like(t),))[1], (x,), (x,))
    with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
        torch.func.jacfwd(torch.func.jacfwd(lambda t: call(t).sum()))(x)


def test_a_further_order_over_tangents_is_refused(device):
    """The dense tangent ops have no rules of their own: a gradient of a tangent is refused, not given without
    its terms."""
    layer = gpunn.Linear(3, 4, activation="tanh").to(device=device, dtype=DT)
    x = torch.randn(2, 3, dtype=DT, device=device)
    with pytest.raises(NotImplementedError, match="a second order"):
        torch.func.grad(lambda t: torch.func.jvp(layer, (t,), (torch.ones_like(t),))[1].sum())(x)
    leaf = x.clone().requires_grad_()
    with forward_ad.dual_level():  # eagerly: the tangent op says what it refuses
        tangent = forward_ad.unpack_dual(layer(forward_ad.make_dual(leaf, torch.ones_like(x)))).tangent
        with pytest.raises(NotImplementedError, match="linear_tangent: differentiating a forward-mode tangent"):
            tangent.sum().backward()
