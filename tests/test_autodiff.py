"""Autodiff past first-order reverse mode. Double backward (create_graph=True) through the dense and
masked layers and the losses, and every order through the locally connected layers, against torch.nn in
float64: gradient penalties, Hessian-vector products, gradients of input gradients. What the kernels do not
implement (forward mode through class probabilities and over gpunn.RNN's backward: tests/test_forward_mode.py;
a third order through the dense and masked layers) is refused rather than its tangents or terms dropped."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from helpers import (ACTIVATIONS, TorchOpSpy, assert_close, assert_same_values, count_launches, leaf64,
                     reference_linear)

import gpunn
from gpunn import reference as torch_reference
from gpunn.kernels import layout as block_layout

SLOPES = {"leaky_relu": -0.2}  # a negative slope: leaky_relu's derivative then comes from the saved act'(z)
LAYERS = ["dense", "masked"]


def _mask(n, k, seed):
    """About half the connections, and a row and a column of none (all-empty blocks and rows)."""
    mask = torch.rand(n, k, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[n // 2] = False
    mask[:, k // 2] = False
    return mask


def _layer(kind, activation, slope, mask=None):
    """(gpunn's layer function of (x, w, b), torch's), the masked pair closing over the mask."""
    if kind == "dense":
        return (lambda *t: gpunn.functional.linear(*t, activation, slope),
                lambda *t: reference_linear(*t, activation, slope))
    return (lambda x, w, b: gpunn.functional.masked_linear(x, w, mask, b, activation, slope),
            lambda x, w, b: torch_reference.masked_linear(x, w, mask.to(x.device), b, activation, slope))


def _leaves(device, lead, k, n, bias=True, frozen=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"x": (*lead, k), "w": (n, k), "b": (n,)}
    leaves = {name: torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_(name not in frozen)
              for name, shape in shapes.items() if name != "b" or bias}
    return leaves, gen


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", LAYERS)
def test_gradgradcheck_every_activation(device, kind, activation):
    """Every second derivative (of the gradients' every input) by finite differences of gpunn's own backward."""
    leaves, _ = _leaves(device, (2,), 3, 2)
    layer, _ = _layer(kind, activation, SLOPES.get(activation, 0.01), _mask(2, 3, 1).to(device))
    assert torch.autograd.gradgradcheck(layer, (leaves["x"], leaves["w"], leaves["b"]))


@pytest.mark.parametrize("activation", ["gelu", "tanh", "relu", None])
@pytest.mark.parametrize("lead,k,n,bias,frozen", [((9,), 7, 5, True, ()), ((2, 5), 3, 8, False, ()),
                                                   ((70,), 66, 3, True, ("w",)), ((6,), 4, 65, True, ("x",)),
                                                   ((1,), 1, 1, True, ("b",))], ids=str)
@pytest.mark.parametrize("kind", LAYERS)
def test_gradient_penalty_matches_torch(device, kind, activation, lead, k, n, bias, frozen):
    """A WGAN-GP style penalty: ||d out / d x||^2 and a loss of the gradients of every parameter, then
    backward into every leaf; against torch.nn.functional on float64 copies. The masked layer's masked-out
    weights hold NaN, which must reach nothing."""
    leaves, gen = _leaves(device, lead, k, n, bias, frozen, seed=k * 100 + n)
    x, w, b = leaves["x"], leaves["w"], leaves.get("b")
    mask = _mask(n, k, seed=k + n).to(device)
    if kind == "masked":
        with torch.no_grad():
            w.masked_fill_(~mask, float("nan"))
    layer, torch_layer = _layer(kind, activation, SLOPES.get(activation, 0.01), mask)
    grad_output = torch.randn(*lead, n, generator=gen, dtype=torch.float64).to(device)
    # The penalty weighs each gradient's elements differently, so that every element's path is checked, and
    # shifts them, so that its gradient is not zero where theirs is (the masked layer's dW off the mask).
    scales = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device) if t is not None else None
              for t in (x, w, b)]

    def second_order(linear, tensors):
        out = linear(*tensors)
        wanting = [(t, scale) for t, scale in zip(tensors, scales) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out, [t for t, _ in wanting], grad_output, create_graph=True)
        penalty = sum(((g + 1) * scale).pow(2).sum() for g, (_, scale) in zip(grads, wanting))
        wanting = [t for t, _ in wanting]
        # Without an activation the bias does not reach the gradients (nor, with a frozen weight, anything):
        # unused, for torch as for gpunn.
        if not penalty.requires_grad:
            return out, grads, (None,) * len(wanting)
        return out, grads, torch.autograd.grad(penalty, wanting, allow_unused=True)

    ours = second_order(layer, (x, w, b))
    theirs = second_order(torch_layer, tuple(leaf64(t) for t in (x, w, b)))
    for what, mine, ref in zip(("output", "first-order", "second-order"), ours, theirs):
        for i, (a, r) in enumerate(zip(mine if isinstance(mine, tuple) else [mine],
                                       ref if isinstance(ref, tuple) else [ref])):
            assert (a is None) == (r is None), f"{what} {i}: {a} where torch has {r}"
            if r is not None:
                assert_close(a, r, torch.float64, f"{what} {i}")


@pytest.mark.parametrize("kind", LAYERS)
def test_relu_double_backward_selects_as_torch(device, kind):
    """relu's derivative in double backward is torch's threshold_backward, a select: an infinite gradient where
    z < 0 gives 0 (a product with act' = 0 had made it NaN), and a NaN z passes the gradient (act'(NaN) had been
    0). Second-order gradients equal torch's, NaN and infinities in the same places."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(device) for shape in ((5, 7), (6, 7), (6,)))
    b[1] = float("nan")  # z[:, 1] is NaN
    mask = _mask(6, 7, 3).to(device)
    ours, theirs = _layer(kind, "relu", 0.01, mask)
    z = torch.nn.functional.linear(x, w * mask if kind == "masked" else w, b)
    dy = torch.randn(5, 6, generator=gen, dtype=torch.float64).to(device).masked_fill(z < 0, float("inf"))
    v = [torch.randn(*shape, generator=gen, dtype=torch.float64).to(device) for shape in ((5, 7), (6, 7))]
    results = []
    for layer in (ours, theirs):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        dx, dw = torch.autograd.grad(layer(*leaves), leaves[:2], dy, create_graph=True)
        results.append((dx.detach(), dw.detach(), *torch.autograd.grad((dx * v[0]).sum() + (dw * v[1]).sum(), leaves)))
    for mine, reference, what in zip(*results, ("dx", "dW", "second order: x", "second order: W", "second order: b")):
        assert_same_values(mine, reference, what)


@pytest.mark.parametrize("k,n", [(0, 3), (3, 0)], ids=["no_inputs", "no_outputs"])
@pytest.mark.parametrize("activation", [None, "tanh"])
def test_double_backward_of_empty_features(device, k, n, activation):
    x, w, b = (torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)
               for shape in ((4, k), (n, k), (n,)))
    results = []
    for linear in (lambda *t: gpunn.functional.linear(*t, activation),
                   lambda *t: reference_linear(*t, activation)):
        grads = torch.autograd.grad(linear(x, w, b).pow(2).sum(), (x, w, b), create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        unused = (None,) * 3  # nothing reaches the penalty (torch's graph may leave it constant)
        results.append(torch.autograd.grad(penalty, (x, w, b), allow_unused=True) if penalty.requires_grad else unused)
    for ours, theirs in zip(*results):
        if theirs is None:
            assert ours is None or not ours.any()
        else:
            assert_close(ours, theirs, torch.float64, "second order")


def test_first_order_allows_in_place_changes_torch_allows(device):
    """What first order does not save may change in place after the forward, as with torch.nn.Linear; double
    backward, which recomputes z from it, refuses a changed one as torch refuses a changed saved tensor."""
    layer = gpunn.Linear(3, 2, activation="gelu", device=device).requires_grad_(False)
    x = torch.randn(4, 3, device=device, requires_grad=True)
    h = x * 2
    y = layer(h)
    h.add_(1)  # the frozen layer's input: first order needs only the weight and act'(z)
    y.sum().backward()
    layer = gpunn.Linear(3, 2, activation="tanh", device=device)
    y = layer(x)
    with torch.no_grad():
        layer.bias.add_(1)
    (grad_x,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    assert grad_x.shape == x.shape
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("changed", ["bias", "weight"])
def test_without_activation_double_backward_allows_in_place_changes_torch_allows(device, kind, changed):
    """Without an activation no order reads the bias, nor the weight when the input takes no gradient (torch's
    linear saves neither): changed in place after the forward, gradients under create_graph and their own
    gradients are torch's, from the saved input and the output gradient."""
    gen = torch.Generator().manual_seed(8)
    x, w, b = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(device) for shape in ((4, 6), (5, 6), (5,)))
    results = []
    for layer in _layer(kind, None, 0.01, _mask(5, 6, 8).to(device)):
        leaves = [t.clone().requires_grad_(i != 0 or changed == "bias") for i, t in enumerate((x, w, b))]
        y = layer(*leaves)
        with torch.no_grad():
            leaves[2 if changed == "bias" else 1].add_(1.0)
        wrt = leaves[0] if changed == "bias" else leaves[1]
        (grad,) = torch.autograd.grad(y.pow(2).sum(), wrt, create_graph=True)
        results.append((grad.detach(), *torch.autograd.grad(grad.pow(2).sum(), wrt)))
    for ours, theirs, what in zip(*results, ("gradient", "its gradient")):
        assert_close(ours, theirs, torch.float64, what)


def test_double_backward_runs_triton_kernels_only(device):
    """A Hessian-vector product through two layers: every product is a gpunn kernel, no torch matmul."""
    model = torch.nn.Sequential(gpunn.Linear(6, 9, activation="silu"), gpunn.Linear(9, 3, activation="tanh"))
    model = model.to(device=device, dtype=torch.float64)
    reference = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.SiLU(), torch.nn.Linear(9, 3), torch.nn.Tanh())
    reference = reference.to(device=device, dtype=torch.float64)
    reference.load_state_dict({key.replace("1.", "2."): value for key, value in model.state_dict().items()})
    x = torch.randn(11, 6, device=device, dtype=torch.float64)
    params = list(model.parameters())
    vector = [torch.randn_like(p) for p in params]
    with TorchOpSpy() as spy, count_launches() as launches:
        grads = torch.autograd.grad(model(x).pow(2).sum(), params, create_graph=True)
        hvp = torch.autograd.grad(grads, params, vector)
    assert not spy.matmuls(), spy.matmuls()
    assert launches["dense_double_backward_kernel"] == 2
    ref_params = list(reference.parameters())
    ref_grads = torch.autograd.grad(reference(x).pow(2).sum(), ref_params, create_graph=True)
    for ours, theirs in zip(hvp, torch.autograd.grad(ref_grads, ref_params, vector)):
        assert_close(ours, theirs, torch.float64, "Hessian-vector product")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_double_backward_in_low_precision(device, dtype):
    """The pass keeps its products in fp32 and rounds once: within the dtype's tolerance of float64."""
    leaves, gen = _leaves(device, (33,), 20, 17)
    x, w, b = (t.detach().to(dtype).requires_grad_() for t in leaves.values())
    out = gpunn.functional.linear(x, w, b, "gelu")
    (grad_x,) = torch.autograd.grad(out.float().pow(2).sum(), x, create_graph=True)
    grads = torch.autograd.grad(grad_x.float().pow(2).sum(), [x, w, b])
    x64, w64, b64 = (leaf64(t) for t in (x, w, b))
    (ref_grad_x,) = torch.autograd.grad(reference_linear(x64, w64, b64, "gelu").pow(2).sum(), x64, create_graph=True)
    for ours, theirs in zip(grads, torch.autograd.grad(ref_grad_x.pow(2).sum(), [x64, w64, b64])):
        assert ours.dtype == dtype
        assert_close(ours, theirs, dtype, "second-order gradient")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_gradgradcheck(device, reduction):
    x, y = (torch.randn(3, 5, device=device, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradgradcheck(lambda x, y: gpunn.functional.mse_loss(x, y, reduction=reduction), (x, y))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_of_empty_losses_gives_empty_gradients(device, reduction):
    # Gradients of no elements still arrive at double backward: the inputs count as used, their second-order
    # gradients come back empty (torch's), where autograd had reported them unused.
    for loss, shapes in ((gpunn.functional.mse_loss, ((0, 3), (0, 3))),
                         (gpunn.functional.cross_entropy, ((0, 4),))):
        inputs = [torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True) for shape in shapes]
        target = () if len(inputs) == 2 else (torch.zeros(0, device=device, dtype=torch.long),)
        first = torch.autograd.grad(loss(*inputs, *target, reduction=reduction).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), inputs)
        assert [tuple(g.shape) for g in second] == [shape for shape in shapes]


def test_maml_meta_gradient_matches_torch(device):
    """One MAML inner step (a regression net of gpunn layers, gpunn's MSE, create_graph=True), then the
    query loss's gradient with respect to the initial weights: second order through both."""
    gen = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(gpunn.Linear(1, 16, activation="tanh"), gpunn.Linear(16, 16, activation="silu"),
                              gpunn.Linear(16, 1)).to(device=device, dtype=torch.float64)
    reference = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.SiLU(),
                                    torch.nn.Linear(16, 1)).to(device=device, dtype=torch.float64)
    # gpunn's layer i is the reference's module 2 i (each followed by its activation module there).
    reference.load_state_dict({f"{2 * int(key.split('.')[0])}.{key.split('.')[1]}": value
                               for key, value in net.state_dict().items()})
    support, query = (torch.rand(2, 9, 1, generator=gen, dtype=torch.float64).to(device) * 6 - 3 for _ in range(2))

    def meta_gradient(model, mse):
        params = dict(model.named_parameters())
        inner = mse(torch.func.functional_call(model, params, support[0]), torch.sin(support[0]))
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        adapted = {name: p - 0.1 * g for (name, p), g in zip(params.items(), grads)}
        outer = mse(torch.func.functional_call(model, adapted, query[0]), torch.sin(query[0]))
        return torch.autograd.grad(outer, list(params.values()))

    with count_launches() as launches:
        ours = meta_gradient(net, gpunn.functional.mse_loss)
    assert launches["dense_double_backward_kernel"] == 3 and launches["mse_backward_kernel"] >= 3
    for mine, theirs in zip(ours, meta_gradient(reference, torch.nn.functional.mse_loss)):
        assert_close(mine, theirs, torch.float64, "meta-gradient")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["indices", "probabilities"])
def test_cross_entropy_gradgradcheck(device, reduction, target_kind):
    """Class weights, label smoothing and (indices) an ignored row; with probabilities the target requires
    grad too, so its gradient's own derivatives are checked."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.rand(4, generator=gen, dtype=torch.float64).to(device)
    if target_kind == "indices":
        target = torch.tensor([1, -100, 3], device=device)
        inputs = (x,)
    else:
        target = torch.softmax(torch.randn(3, 4, generator=gen, dtype=torch.float64), 1).to(device).requires_grad_()
        inputs = (x, target)
    loss = lambda x, t=target: gpunn.functional.cross_entropy(x, t, weight, reduction=reduction,  # noqa: E731
                                                              label_smoothing=0.2)
    assert torch.autograd.gradgradcheck(loss, inputs)


def test_classifier_hessian_vector_product_matches_torch(device):
    """The Hessian-vector product of a classifier's training loss (influence functions, curvature
    estimates): gpunn layers and cross-entropy, against torch's."""
    gen = torch.Generator().manual_seed(8)
    net = torch.nn.Sequential(gpunn.Linear(7, 12, activation="gelu"), gpunn.Linear(12, 5))
    net = net.to(device=device, dtype=torch.float64)
    reference = torch.nn.Sequential(torch.nn.Linear(7, 12), torch.nn.GELU(), torch.nn.Linear(12, 5))
    reference = reference.to(device=device, dtype=torch.float64)
    reference.load_state_dict({key.replace("1.", "2."): value for key, value in net.state_dict().items()})
    x = torch.randn(10, 7, generator=gen, dtype=torch.float64).to(device)
    y = torch.randint(0, 5, (10,), generator=gen).to(device)
    vector = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device) for p in net.parameters()]

    def hvp(model, cross_entropy):
        params = list(model.parameters())
        grads = torch.autograd.grad(cross_entropy(model(x), y, label_smoothing=0.1), params, create_graph=True)
        return torch.autograd.grad(grads, params, vector)

    with count_launches() as launches:
        ours = hvp(net, gpunn.functional.cross_entropy)
    assert launches["cross_entropy_double_backward_kernel"] == 1
    for mine, theirs in zip(ours, hvp(reference, torch.nn.functional.cross_entropy)):
        assert_close(mine, theirs, torch.float64, "Hessian-vector product")


def test_masked_double_backward_runs_masked_kernels_only(device, monkeypatch):
    """A Hessian-vector product through a masked layer: every product a masked kernel under the layer's mask
    (no dense GEMM, no torch matmul); the layouts of the mask repeated, for operands side by side, are
    built once per mask, not per call."""
    mask = _mask(40, 37, seed=4).to(device)
    layer = gpunn.MaskedLinear(37, 40, mask, activation="gelu", device=device, dtype=torch.float64)
    x = torch.randn(9, 37, device=device, dtype=torch.float64, requires_grad=True)
    builds = []
    build = block_layout.build
    monkeypatch.setattr(block_layout, "build", lambda *args: builds.append(args) or build(*args))
    params = [x, *layer.parameters()]
    vector = [torch.randn_like(p) for p in params]

    def hvp(function):
        grads = torch.autograd.grad(function(x, layer.weight, layer.bias).pow(2).sum(), params, create_graph=True)
        return torch.autograd.grad(grads, params, vector)

    with TorchOpSpy() as spy, count_launches() as launches:
        ours = hvp(lambda *t: gpunn.functional.masked_linear(t[0], t[1], mask, t[2], "gelu"))
    assert not spy.matmuls(), spy.matmuls()
    assert not any(name.startswith("dense_") and name != "dense_double_backward_kernel" for name in launches), launches
    assert launches["dense_double_backward_kernel"] == 1
    built = len(builds)
    hvp(lambda *t: gpunn.functional.masked_linear(t[0], t[1], mask, t[2], "gelu"))
    assert len(builds) == built, "a second double backward rebuilt a layout"
    theirs = hvp(lambda *t: torch_reference.masked_linear(t[0], t[1], mask, t[2], "gelu"))
    for mine, ref in zip(ours, theirs):
        assert_close(mine, ref, torch.float64, "Hessian-vector product")


def test_a_third_order_is_refused(device):
    """The dense-layer family (dense, masked, the recurrent layers on its backward op) takes two orders."""
    x = torch.randn(5, 4, device=device, requires_grad=True)
    mask = torch.rand(3, 4, device=device) < 0.7
    layers = [gpunn.Linear(4, 3, device=device, activation="tanh"),
              gpunn.MaskedLinear(4, 3, mask, device=device, activation="tanh"), gpunn.RNNCell(4, 3, device=device),
              lambda t: gpunn.RNN(4, 3, device=device)(t.unsqueeze(1))[0]]
    for layer in layers:
        (grad_x,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="triple backward"):
            torch.autograd.grad(grad_x.sum(), x, create_graph=True)
        assert torch.autograd.grad(grad_x.sum(), x)[0].shape == x.shape  # the second order itself still runs


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_cell_gradgradcheck(device, nonlinearity):
    gen = torch.Generator().manual_seed(6)
    shapes = [(2, 3), (2, 2), (2, 3), (2, 2), (2,), (2,)]
    tensors = [torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_() for shape in shapes]
    assert torch.autograd.gradgradcheck(lambda *t: gpunn.functional.rnn_cell(*t, nonlinearity), tensors)


def test_recurrent_first_order_allows_in_place_changes_torch_allows(device):
    """A frozen cell's input may change in place after the forward (first order needs only the weights and
    h'), as with torch.nn.RNNCell; double backward, which recomputes z from it, refuses a changed one."""
    cell = gpunn.RNNCell(3, 4, device=device).requires_grad_(False)
    x = torch.randn(2, 3, device=device, requires_grad=True)
    h = torch.randn(2, 4, device=device, requires_grad=True)
    inputs = x * 1
    out = cell(inputs, h)
    inputs.add_(1)
    torch.autograd.grad(out.sum(), (x, h), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), (x, h), create_graph=True)


@pytest.mark.parametrize("changed", ["bias_ih_l0_reverse", "bias_hh_l0", "weight_ih_l0"])
def test_rnn_first_order_allows_in_place_changes_torch_allows(device, changed):
    """First order reads neither the biases nor, where the input takes no gradient, W_ih: changed in place
    after the forward, the gradients are those of the forward's values, as torch's CPU RNN gives (its
    reference runs on the CPU: cuDNN saves every weight); double backward, which recomputes the layer from
    them, refuses the change."""
    x = torch.randn(5, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for rnn in (gpunn.RNN(4, 3, bidirectional=True, device=device, dtype=torch.float64),
                torch.nn.RNN(4, 3, bidirectional=True, dtype=torch.float64)):
        rnn.load_state_dict({name: torch.linspace(-0.5, 0.5, value.numel(), dtype=torch.float64).view(value.shape)
                             for name, value in rnn.state_dict().items()})
        leaf = x.to(rnn.weight_hh_l0.device).requires_grad_(changed != "weight_ih_l0")
        out, h_n = rnn(leaf)
        with torch.no_grad():
            getattr(rnn, changed).add_(1.0)
        loss = out.pow(2).sum() + h_n.sum()
        if isinstance(rnn, gpunn.RNN):
            with pytest.raises(RuntimeError, match=f"gpunn RNN's {changed.replace('_l0', '')} is at version"):
                torch.autograd.grad(loss, rnn.weight_hh_l0, retain_graph=True, create_graph=True)
        loss.backward()
        results.append([p.grad.cpu() for p in rnn.parameters()] + ([leaf.grad.cpu()] if leaf.requires_grad else []))
    for ours, theirs in zip(*results, strict=True):
        assert_close(ours, theirs, torch.float64, "gradient")


@pytest.mark.parametrize("layer", ["linear_tanh", "rnn_cell", "rnn"])
@pytest.mark.parametrize("changed", ["input", "parameters"])
def test_double_backward_under_allow_mutation_on_saved_tensors_matches_torch(device, layer, changed):
    """Under allow_mutation_on_saved_tensors a tensor changed in place after the forward is used as it was:
    what double backward reads (the input, the parameters) too, as torch's layers read theirs."""
    torch.manual_seed(5)
    ours = {"linear_tanh": lambda: gpunn.Linear(5, 4, activation="tanh"), "rnn_cell": lambda: gpunn.RNNCell(5, 4),
            "rnn": lambda: gpunn.RNN(5, 4)}[layer]().to(device=device, dtype=torch.float64)
    theirs = {"linear_tanh": lambda: torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh()),
              "rnn_cell": lambda: torch.nn.RNNCell(5, 4), "rnn": lambda: torch.nn.RNN(5, 4)}[layer]()
    theirs = theirs.to(device=device, dtype=torch.float64)
    theirs.load_state_dict({key.replace("weight", "0.weight").replace("bias", "0.bias") if layer == "linear_tanh"
                            else key: value for key, value in ours.state_dict().items()})
    x = torch.randn(3, 5, device=device, dtype=torch.float64)
    results = []
    for model in (ours, theirs):
        params = list(model.parameters())
        leaf = x.clone().requires_grad_()
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            h = leaf * 1
            y = model(h)[0] if layer == "rnn" else model(h)
            with torch.no_grad():
                for t in [h] if changed == "input" else params:
                    t.mul_(2)
            (grad,) = torch.autograd.grad(y.pow(2).sum(), leaf, create_graph=True)
            results.append((grad.detach(), *torch.autograd.grad(grad.sin().sum(), [leaf, *params])))
    for mine, reference in zip(*results, strict=True):
        assert_close(mine, reference, torch.float64, f"{layer}, {changed} changed")


class _OneStepRNN(torch.nn.Module):
    """gpunn.RNN over a sequence of one step: (B, H) -> (B, H)."""

    def __init__(self, **factory):
        super().__init__()
        self.rnn = gpunn.RNN(5, 5, **factory)

    def forward(self, x):
        return self.rnn(x.unsqueeze(0))[0].squeeze(0)


# Layers whose input, with their weights frozen, only double backward reads (it recomputes z from it).
FROZEN_BLOCKS = {
    "linear_gelu": lambda **factory: gpunn.Linear(5, 5, activation="gelu", **factory),
    "masked_tanh": lambda **factory: gpunn.MaskedLinear(5, 5, _mask(5, 5, 3).to(factory["device"]),
                                                        activation="tanh", **factory),
    "rnn_cell": lambda **factory: gpunn.RNNCell(5, 5, **factory),
    "rnn": lambda **factory: _OneStepRNN(**factory),
}


def _frozen_chain(name, device, dtype=torch.float32, depth=3):
    """A function running depth frozen layers of a kind, and the weak references to each layer's input,
    appended as it runs."""
    layers = [FROZEN_BLOCKS[name](device=device, dtype=dtype).requires_grad_(False) for _ in range(depth)]
    inputs = []

    def chain(h):
        for layer in layers:
            h = h * 1  # an activation of the graph's own: only what keeps it for backward keeps it alive
            inputs.append(weakref.ref(h))
            h = layer(h)
        return h
    return chain, inputs


@pytest.mark.parametrize("name", list(FROZEN_BLOCKS))
def test_what_double_backward_keeps_is_freed_with_the_graph(device, name):
    """The frozen layers' inputs are kept for a double backward, not past the first-order backward that frees
    the graph (torch frees what it saved there): the output may outlive it, as a training loop's loss does."""
    chain, inputs = _frozen_chain(name, device)
    x = torch.randn(4, 5, device=device, requires_grad=True)
    out = chain(x)
    gc.collect()
    assert all(ref() is not None for ref in inputs)  # kept: a double backward may come
    torch.autograd.grad(out.sum(), x, retain_graph=True)
    gc.collect()
    assert all(ref() is not None for ref in inputs), "dropped while the graph is retained"
    out.sum().backward()
    gc.collect()
    assert all(ref() is None for ref in inputs), "kept after the graph was freed"


@pytest.mark.parametrize("name", list(FROZEN_BLOCKS))
def test_checkpoint_and_saved_tensor_hooks_see_what_double_backward_keeps(device, name):
    """Under torch.utils.checkpoint the layers' inputs are freed after the forward, as torch's are; under a
    saved-tensor hook (as save_on_cpu) they are packed. Both orders of gradients are unchanged, and double
    backward still refuses an input changed in place since the forward."""
    chain, inputs = _frozen_chain(name, device, torch.float64)
    x = torch.randn(4, 5, device=device, dtype=torch.float64, requires_grad=True)

    def orders(out):
        (first,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        return first, torch.autograd.grad(first.sin().sum(), x)[0]

    reference = orders(chain(x))
    checkpointed = torch.utils.checkpoint.checkpoint(chain, x, use_reentrant=False)
    gc.collect()
    assert all(ref() is None for ref in inputs[-3:]), "an activation outlived the checkpointed forward"
    for mine, ref, what in zip(orders(checkpointed), reference, ("first", "second")):
        assert_close(mine, ref, torch.float64, f"{what} order under checkpoint")
    packed = []

    def pack(tensor):
        packed.append(tensor)
        return tensor.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = chain(x)
    storages = {t.untyped_storage().data_ptr() for t in packed}  # the layer may keep a view of its input
    assert all(ref().untyped_storage().data_ptr() in storages for ref in inputs[-3:]), "kept past the hooks"
    for mine, ref, what in zip(orders(out), reference, ("first", "second")):
        assert_close(mine, ref, torch.float64, f"{what} order under a saved-tensor hook")
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
        changed = chain(x)
    inputs[-1]().add_(1)  # the last layer's input, which the hook packed as itself, changed in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(changed.pow(2).sum(), x, create_graph=True)


RNN_CASES = {"tanh": dict(nonlinearity="tanh"), "relu_two_layers": dict(nonlinearity="relu", num_layers=2),
             "bidirectional_packed": dict(bidirectional=True, packed=True),
             "bidirectional_two_layers_batch_first": dict(bidirectional=True, num_layers=2, batch_first=True),
             "frozen_weights_packed": dict(frozen=True, packed=True)}


@pytest.mark.parametrize("case", list(RNN_CASES))
def test_rnn_double_backward_matches_torch(device, case):
    """A penalty of every first-order gradient of an RNN (layers, directions, packed sequences of unequal
    lengths, frozen weights), backward into the input, h0 and the weights; against torch.nn.RNN in float64,
    with no torch matmul on gpunn's side."""
    options = dict(RNN_CASES[case])
    packed, frozen = options.pop("packed", False), options.pop("frozen", False)
    gen = torch.Generator().manual_seed(len(case))
    rnn = gpunn.RNN(3, 4, device=device, dtype=torch.float64, **options).requires_grad_(not frozen)
    ref = torch.nn.RNN(3, 4, device=device, dtype=torch.float64, **options).requires_grad_(not frozen)
    ref.load_state_dict(rnn.state_dict())
    x = torch.randn(5, 3, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()  # (T, B, I)
    if options.get("batch_first"):
        x = x.detach().transpose(0, 1).requires_grad_()
    h0 = torch.randn(rnn.num_layers * (1 + rnn.bidirectional), 3, 4, generator=gen, dtype=torch.float64)
    h0 = h0.to(device).requires_grad_()
    scales = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device)
              for t in (x, h0, *(p for p in rnn.parameters() if p.requires_grad))]

    def second_order(module):
        inputs = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3, 2])) if packed else x
        out, h_n = module(inputs, h0)
        out = out.data if packed else out
        leaves = [x, h0, *(p for p in module.parameters() if p.requires_grad)]
        first = torch.autograd.grad(out.sin().sum() + h_n.pow(2).sum(), leaves, create_graph=True)
        penalty = sum(((g + 1) * scale).pow(2).sum() for g, scale in zip(first, scales, strict=True))
        return (*first, *torch.autograd.grad(penalty, leaves))

    with TorchOpSpy() as spy:
        ours = second_order(rnn)
    assert not spy.matmuls(), spy.matmuls()
    with torch.backends.cudnn.flags(enabled=False):  # on a GPU: cuDNN's RNN backward is not differentiable
        reference_grads = second_order(ref)
    for i, (mine, theirs) in enumerate(zip(ours, reference_grads, strict=True)):
        assert_close(mine, theirs, torch.float64, f"gradient {i}")


def test_rnn_double_backward_with_a_tensor_in_two_places(device):
    """One bias as both b_ih and b_hh and one weight pair for both directions: each place's gradient once,
    under create_graph as in first order, as torch sums them."""
    gen = torch.Generator().manual_seed(9)
    w_ih, w_hh, b = (torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
                     for shape in ((4, 3), (4, 4), (4,)))
    x = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    h0 = torch.zeros(2, 2, 4, device=device, dtype=torch.float64)
    weights = [w_ih, w_hh, b, b] * 2
    leaves = (x, w_ih, w_hh, b)
    plain = torch.autograd.grad(gpunn.functional.rnn(x, h0, weights, bidirectional=True)[0].sin().sum(), leaves)
    first = torch.autograd.grad(gpunn.functional.rnn(x, h0, weights, bidirectional=True)[0].sin().sum(), leaves,
                                create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), leaves)
    with torch.backends.cudnn.flags(enabled=False):
        x64 = leaf64(x)
        ref_leaves = (x64, *(leaf64(t) for t in (w_ih, w_hh, b)))
        out = torch_reference.rnn(x64, h0, [*ref_leaves[1:], ref_leaves[3]] * 2, bidirectional=True)[0]
        ref_first = torch.autograd.grad(out.sin().sum(), ref_leaves, create_graph=True)
        ref_second = torch.autograd.grad(sum(g.pow(2).sum() for g in ref_first), ref_leaves)
    for name, ours, theirs in (("plain", plain, ref_first), ("create_graph", first, ref_first),
                               ("second", second, ref_second)):
        for mine, ref in zip(ours, theirs, strict=True):
            assert_close(mine, ref, torch.float64, name)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.enable_grad])
def test_forward_mode_without_a_rule_is_refused_before_any_launch(device, grad_mode):
    """The cross-entropy over class probabilities (every layer and the other losses take forward mode:
    tests/test_forward_mode.py)."""
    x = torch.randn(2, 3, device=device)
    with grad_mode(), forward_ad.dual_level(), count_launches() as launches:
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            gpunn.functional.cross_entropy(forward_ad.make_dual(x, torch.ones_like(x)), x.softmax(1))
    assert launches == {}


# The locally connected layers: (N, C, H, W) -> O channels, kernel, stride, padding; odd sizes.
LOCAL_2D = {"3x3_stride2_pad1": ((2, 3, 6, 5), 4, 3, 2, 1), "2x2": ((3, 2, 4, 3), 3, 2, 1, 0)}


def _local_leaves(device, x_shape, out_channels, kernel, stride, padding, frozen=(), seed=0):
    """(x, weight, bias) float64 leaves for locally_connected2d (or 1d, for a 3-D x_shape)."""
    gen = torch.Generator().manual_seed(seed)
    n, c, *size = x_shape
    out = [(length + 2 * padding - kernel) // stride + 1 for length in size]
    shapes = {"x": x_shape, "w": (out_channels, *out, c, *[kernel] * len(size)), "b": (out_channels, *out)}
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_(name not in frozen)
            for name, shape in shapes.items()]


def _local_pair(dims, stride, padding):
    """(gpunn's locally connected function of (x, w, b), torch's)."""
    ours, theirs = ((gpunn.functional.locally_connected1d, torch_reference.locally_connected1d) if dims == 1 else
                    (gpunn.functional.locally_connected2d, torch_reference.locally_connected2d))
    return (lambda x, w, b: ours(x, w, b, stride, padding)), (lambda x, w, b: theirs(x, w, b, stride, padding))


@pytest.mark.parametrize("x_shape,out_channels,kernel,stride,padding", [((2, 1, 4, 3), 2, 2, 2, 0),
                                                                         ((2, 2, 7), 2, 3, 2, 1)], ids=["2d", "1d"])
def test_local_gradgradcheck(device, x_shape, out_channels, kernel, stride, padding):
    """Finite differences of gpunn's own backward (fast mode: random projections, the interpreter is slow)."""
    leaves = _local_leaves(device, x_shape, out_channels, kernel, stride, padding)
    layer, _ = _local_pair(len(x_shape) - 2, stride, padding)
    assert torch.autograd.gradgradcheck(layer, leaves, fast_mode=True)


@pytest.mark.parametrize("frozen", [(), ("w",), ("x",), ("x", "w")], ids=str)
@pytest.mark.parametrize("case", list(LOCAL_2D))
def test_local_third_order_matches_torch(device, case, frozen):
    """Gradients of a penalty of gradients of a penalty of the gradients: three orders of derivatives, on
    the layer's three kernels, against F.unfold + einsum."""
    x_shape, out_channels, kernel, stride, padding = LOCAL_2D[case]
    leaves = _local_leaves(device, x_shape, out_channels, kernel, stride, padding, frozen, seed=len(frozen))
    layer, torch_layer = _local_pair(2, stride, padding)

    def orders(function, tensors):
        wanting = [t for t in tensors if t.requires_grad]
        first = torch.autograd.grad(function(*tensors).pow(2).sum(), wanting, create_graph=True)
        second = torch.autograd.grad(sum((g + 1).sin().sum() for g in first), wanting, create_graph=True,
                                     allow_unused=True)
        penalty = sum(g.pow(2).sum() for g in second if g is not None)
        return (*first, *second, *torch.autograd.grad(penalty, wanting, allow_unused=True))

    with TorchOpSpy() as spy, count_launches() as launches:
        ours = orders(layer, leaves)
    assert not spy.matmuls(), spy.matmuls()
    assert set(launches) <= {"local_forward_kernel", "local_grad_input_kernel", "local_grad_weight_kernel"}, launches
    theirs = orders(torch_layer, [leaf64(t) for t in leaves])
    assert len(ours) == len(theirs)
    for i, (mine, ref) in enumerate(zip(ours, theirs)):
        assert (mine is None) == (ref is None) or (ref is None and not mine.any()), f"gradient {i}"
        if ref is not None:
            assert_close(mine, ref, torch.float64, f"gradient {i}")


@pytest.mark.parametrize("layer", ["linear", "local1d", "local2d"])
def test_a_layer_that_saved_nothing_runs_backward_again_on_a_freed_graph(device, layer):
    # Only the bias trains (bias-only fine-tuning) and there is no activation: first-order backward needs
    # nothing saved, so, as torch's nodes that saved nothing, it runs again after a backward freed the graph
    # (a second loss over the same output; a gradient penalty built with retain_graph=False).
    torch.manual_seed(4)
    kw = dict(device=device, dtype=torch.float64)
    if layer == "linear":
        ours, x = gpunn.Linear(5, 3, **kw), torch.randn(4, 5, **kw)
        theirs = torch.nn.Linear(5, 3, **kw)
        theirs.load_state_dict(ours.state_dict())
    else:
        ours = (gpunn.LocallyConnected1d(2, 3, 7, 3, **kw) if layer == "local1d"
                else gpunn.LocallyConnected2d(2, 3, (5, 4), 3, **kw))
        x = torch.randn(2, 2, 7, **kw) if layer == "local1d" else torch.randn(2, 2, 5, 4, **kw)
        reference = torch_reference.locally_connected1d if layer == "local1d" else torch_reference.locally_connected2d
        theirs = _Reference(reference, ours)
    results = []
    for module in (ours, theirs):
        module.weight.requires_grad_(False)
        y = module(x)
        y.sum().backward()
        y.pow(2).sum().backward()
        penalty_y = module(x)
        (grad_bias,) = torch.autograd.grad(penalty_y.sin().sum(), module.bias, create_graph=True, retain_graph=False)
        results.append((module.bias.grad, *torch.autograd.grad(grad_bias.pow(2).sum(), module.bias)))
    for ours_grad, theirs_grad, what in zip(*results, ("twice", "penalty")):
        assert_close(ours_grad, theirs_grad, torch.float64, what)


class _Reference(torch.nn.Module):
    """A locally connected layer through gpunn.reference's torch ops, holding copies of a layer's parameters."""

    def __init__(self, function, layer):
        super().__init__()
        self.function = function
        self.weight = torch.nn.Parameter(layer.weight.detach().clone())
        self.bias = torch.nn.Parameter(layer.bias.detach().clone())

    def forward(self, x):
        return self.function(x, self.weight, self.bias)


def test_double_backward_of_what_a_freed_graph_dropped_is_refused_clearly(device):
    # With an activation, a first backward without retain_graph freed what the layer saved (tanh's output) and
    # kept for double backward (the weight, to recompute z): a create_graph backward then raises torch's error
    # (not a TypeError from inside gpunn), as torch's does. Without one, a bias-only gradient needs nothing:
    # it runs, as torch's (addmm saved nothing for it).
    x = torch.randn(4, 5, device=device, dtype=torch.float64)
    for activation in ("tanh", None):
        results = []
        for layer in (gpunn.Linear(5, 3, device=device, dtype=torch.float64, activation=activation),
                      torch.nn.Linear(5, 3, device=device, dtype=torch.float64)):
            layer.weight.requires_grad_(False)
            with torch.no_grad():
                layer.weight.copy_(torch.linspace(-1, 1, 15).view(3, 5))
                layer.bias.copy_(torch.linspace(-1, 1, 3))
            y = layer(x) if isinstance(layer, gpunn.Linear) or activation is None else torch.tanh(layer(x))
            y.sum().backward()
            if activation is None:
                (grad,) = torch.autograd.grad(y.pow(2).sum(), layer.bias, create_graph=True)
                results.append((grad.detach(), torch.autograd.grad(grad.pow(2).sum(), layer.bias)[0]))
                continue
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                torch.autograd.grad(y.pow(2).sum(), layer.bias, create_graph=True)
        for ours, theirs in zip(*results):
            assert_close(ours, theirs, torch.float64, "bias gradient and its gradient")
