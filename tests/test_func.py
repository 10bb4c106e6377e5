"""torch.func's transforms over gpunn's layers and losses (grad, vjp, jacrev, vmap and their compositions:
per-sample gradients, model ensembles), against torch in float64 computed without the transforms, sample by
sample. What gpunn does not implement under them (a second order, some forward mode: tests/test_forward_mode.py,
torch's legacy batched gradients) is refused with a NotImplementedError rather than run wrong."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import TorchOpSpy, assert_close, case_seed, count_launches

import gpunn
from gpunn import reference as torch_reference

DT = torch.float64


def _mask(n, k):
    mask = torch.rand(n, k, generator=torch.Generator().manual_seed(n * k)) < 0.5
    mask[0] = False  # an output with no inputs
    return mask


# Each case: (gpunn's module, torch's function of (params, *inputs), one sample's inputs (the first is the
# one the transforms batch; the others are shared)). Odd sizes throughout.
def _cases(device):
    mask = _mask(6, 9).to(device)
    targets = torch.tensor([4, 0, 2], device=device)
    cell_state = torch.randn(3, 6, dtype=DT, device=device)
    class_weights = torch.rand(5, dtype=DT, device=device) + 0.5
    return {
        "linear_gelu": (gpunn.Linear(7, 5, activation="gelu"),
                        lambda p, x: F.gelu(F.linear(x, p["weight"], p["bias"])), [(3, 7)]),
        "masked_tanh": (gpunn.MaskedLinear(9, 6, mask, activation="tanh"),
                        lambda p, x: torch.tanh(F.linear(x, p["weight"] * mask, p["bias"])), [(2, 9)]),
        "local2d": (gpunn.LocallyConnected2d(2, 3, (5, 4), 3, stride=2, padding=1),
                    lambda p, x: torch_reference.locally_connected2d(x, p["weight"], p["bias"], 2, 1), [(2, 5, 4)]),
        "local1d": (gpunn.LocallyConnected1d(2, 3, 7, 3, padding=1),
                    lambda p, x: torch_reference.locally_connected1d(x, p["weight"], p["bias"], 1, 1), [(2, 2, 7)]),
        "rnn_cell_relu": (gpunn.RNNCell(4, 6, nonlinearity="relu"),
                          lambda p, x, h: torch_reference.rnn_cell(x, h, p["weight_ih"], p["weight_hh"], p["bias_ih"],
                                                                   p["bias_hh"], "relu"), [(3, 4), cell_state]),
        "rnn_2layer_bidirectional": (gpunn.RNN(3, 4, num_layers=2, bidirectional=True),
                                     torch.nn.RNN(3, 4, num_layers=2, bidirectional=True), [(5, 2, 3)]),
        "rnn_batch_first_hx": (gpunn.RNN(3, 4, batch_first=True), torch.nn.RNN(3, 4, batch_first=True),
                               [(2, 5, 3), torch.randn(1, 2, 4, dtype=DT, device=device)]),
        "cross_entropy": (gpunn.CrossEntropyLoss(label_smoothing=0.1),
                          lambda p, x, t: F.cross_entropy(x, t, label_smoothing=0.1), [(3, 5), targets]),
        "cross_entropy_weighted_ignore": (
            gpunn.CrossEntropyLoss(weight=class_weights, ignore_index=2, reduction="sum"),
            lambda p, x, t: F.cross_entropy(x, t, class_weights, ignore_index=2, reduction="sum"), [(3, 5), targets]),
        "cross_entropy_probabilities": (gpunn.CrossEntropyLoss(), lambda p, x, t: F.cross_entropy(x, t),
                                        [(3, 5), torch.rand(3, 5, dtype=DT, device=device).softmax(1)]),
        "mse_sum": (gpunn.MSELoss(reduction="sum"), lambda p, x, y: F.mse_loss(x, y, reduction="sum"),
                    [(3, 5), torch.randn(3, 5, dtype=DT, device=device)]),
        "mse_mean": (gpunn.MSELoss(), lambda p, x, y: F.mse_loss(x, y), [(2, 3), torch.randn(2, 3, dtype=DT,
                                                                                           device=device)]),
    }


CASES = list(_cases("cpu"))


def _case(name, device, samples=None):
    """(ours (params, *inputs) -> output, theirs, params, inputs): float64 on device, the first input with
    `samples` samples stacked in front when given."""
    module, theirs, shapes = _cases(device)[name]
    module = module.to(device=device, dtype=DT)
    if isinstance(theirs, torch.nn.Module):  # torch's twin: the same parameters, through functional_call
        twin = theirs.to(device=device, dtype=DT)
        theirs = lambda p, *inputs: torch.func.functional_call(twin, p, inputs)  # noqa: E731
    gen = torch.Generator().manual_seed(case_seed(name, samples))
    params = {key: torch.randn(value.shape, generator=gen, dtype=DT).to(device)
              for key, value in module.named_parameters()}
    first = (samples,) if samples else ()
    inputs = [torch.randn(*first, *shape, generator=gen, dtype=DT).to(device) if i == 0 else shape
              for i, shape in enumerate(shapes)]
    return (lambda p, *x: torch.func.functional_call(module, p, x)), theirs, params, inputs


def _output(result):
    return result[0] if isinstance(result, tuple) else result  # the RNN's output, not h_n


def _objective(function, weights):
    """A scalar of the output that weighs every element differently, so that no gradient entry hides."""
    return lambda p, *x: (_output(function(p, *x)) * weights).sum()


def _weights(output, seed):
    return torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=DT).to(output.device)


def _torch_grads(theirs, weights, params, inputs):
    """Gradients of the objective by plain autograd: (the parameters' dict, the first input's)."""
    leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
    x = inputs[0].clone().requires_grad_()
    grads = torch.autograd.grad(_objective(theirs, weights)(leaves, x, *inputs[1:]), [*leaves.values(), x])
    return dict(zip(leaves, grads[:-1])), grads[-1]


def _assert_grads_close(ours, theirs, what):
    (our_params, our_x), (their_params, their_x) = ours, theirs
    assert our_params.keys() == their_params.keys()
    for key in their_params:
        assert_close(our_params[key], their_params[key], DT, f"{what}: {key}")
    assert_close(our_x, their_x, DT, f"{what}: input")


@pytest.mark.parametrize("name", CASES)
def test_grad_matches_torch(device, name):
    ours, theirs, params, inputs = _case(name, device)
    weights = _weights(_output(theirs(params, *inputs)), case_seed(name))
    with TorchOpSpy() as spy, count_launches() as launches:
        grads = torch.func.grad(_objective(ours, weights), argnums=(0, 1))(params, *inputs)
    assert launches, "no Triton kernel ran"
    assert not spy.matmuls(), spy.matmuls()
    _assert_grads_close(grads, _torch_grads(theirs, weights, params, inputs), "grad")


@pytest.mark.parametrize("name", CASES)
def test_per_sample_gradients_match_torch(device, name):
    """vmap(grad(f)), the samples along dim 1 of the batched input: each sample's gradients."""
    samples = 3
    ours, theirs, params, inputs = _case(name, device, samples)
    weights = _weights(_output(theirs(params, inputs[0][0], *inputs[1:])), case_seed(name))
    per_sample = torch.func.vmap(torch.func.grad(_objective(ours, weights), argnums=(0, 1)),
                                 in_dims=(None, 1) + (None,) * (len(inputs) - 1))
    with TorchOpSpy() as spy, count_launches() as launches:
        our_params, our_x = per_sample(params, inputs[0].movedim(0, 1), *inputs[1:])
    assert launches, "no Triton kernel ran"
    assert not spy.matmuls(), spy.matmuls()
    for i in range(samples):
        _assert_grads_close(({key: grad[i] for key, grad in our_params.items()}, our_x[i]),
                            _torch_grads(theirs, weights, params, [inputs[0][i], *inputs[1:]]), f"sample {i}")


@pytest.mark.parametrize("name", CASES)
def test_vmap_over_inputs_and_over_stacked_parameters_matches_torch(device, name):
    """vmap of the forward over a batch of inputs, and over an ensemble of parameter sets at once."""
    members = 2
    ours, theirs, params, inputs = _case(name, device, members)
    in_dims = (None, 0) + (None,) * (len(inputs) - 1)
    batched = _output(torch.func.vmap(ours, in_dims=in_dims)(params, *inputs))
    gen = torch.Generator().manual_seed(case_seed(name, "ensemble"))
    ensemble = {key: torch.stack([value] + [torch.randn(value.shape, generator=gen, dtype=DT).to(device)
                                            for _ in range(members - 1)]) for key, value in params.items()}
    both = _output(torch.func.vmap(ours, in_dims=(0, 0) + (None,) * (len(inputs) - 1))(ensemble, *inputs))
    for i in range(members):
        rest = [inputs[0][i], *inputs[1:]]
        assert_close(batched[i], _output(theirs(params, *rest)), DT, f"input {i}")
        member = {key: value[i] for key, value in ensemble.items()}
        assert_close(both[i], _output(theirs(member, *rest)), DT, f"member {i}")


@pytest.mark.parametrize("name", CASES)
def test_vjp_fn_called_after_vjp_matches_torch_with_grad_mode_on_or_off(device, name):
    """torch.func.vjp's vjp_fn, called after vjp returned (the transform's tensors then wrap nothing live),
    in grad mode and under no_grad: the parameters' and input's gradients as torch's autograd gives them."""
    ours, theirs, params, inputs = _case(name, device)
    weights = _weights(_output(theirs(params, *inputs)), case_seed(name))
    _, vjp_fn = torch.func.vjp(lambda p, x: _output(ours(p, x, *inputs[1:])), params, inputs[0])
    expected = _torch_grads(theirs, weights, params, inputs)
    _assert_grads_close(vjp_fn(weights), expected, "vjp_fn")
    with torch.no_grad():
        _assert_grads_close(vjp_fn(weights), expected, "vjp_fn under no_grad")


@pytest.mark.parametrize("name", ["linear_gelu", "masked_tanh", "local2d", "rnn_cell_relu"])
def test_a_call_under_no_grad_inside_grad_is_a_constant_to_every_autograd(device, name):
    """A gpunn call made under torch.no_grad() inside torch.func.grad is recorded by no autograd, the eager one
    around the transform included (torch.func runs a Function's forward in grad mode): as torch's layers, a
    constant, so no gradient of the outer objective reaches the parameters through it."""
    ours, theirs, params, inputs = _case(name, device)
    results = []
    for function in (ours, theirs):
        leaves = {key: value.clone().requires_grad_() for key, value in params.items()}

        def inner(x):
            with torch.no_grad():
                constant = _output(function(leaves, x, *inputs[1:]))
            return (constant * _output(function(leaves, x, *inputs[1:]))).sum()

        grad = torch.func.grad(inner)(inputs[0])
        results.append((grad, torch.autograd.grad(grad.pow(2).sum(), list(leaves.values()), allow_unused=True)))
    (our_grad, ours), (their_grad, theirs) = results
    assert_close(our_grad, their_grad, DT, "inner gradient")
    for mine, ref in zip(ours, theirs, strict=True):
        assert (mine is None) == (ref is None)
        if ref is not None:
            assert_close(mine, ref, DT, "outer gradient")


def test_a_no_grad_constant_inside_nested_grads_and_under_forward_mode(device):
    """grad(grad(f)) with a gpunn call under no_grad in f: a constant at both levels, as torch's layer. Forward
    mode (jvp, hessian), which no_grad does not stop, still carries its tangent, as through torch's."""
    ours, theirs, params, inputs = _case("linear_gelu", device)
    square = {key: value[:, :5] if key == "weight" else value for key, value in params.items()}
    x = inputs[0][:, :5]

    def objective(function):
        def run(y):
            with torch.no_grad():
                constant = _output(function(square, y))
            return (constant * y.pow(2)).sum()
        return run

    results = [torch.func.grad(lambda y: torch.func.grad(objective(f))(y).sin().sum())(x) for f in (ours, theirs)]
    assert_close(*results, DT, "grad of grad")
    for name, transform in (("hessian", lambda f: torch.func.hessian(objective(f))(x)),
                            ("jvp of grad", lambda f: torch.func.jvp(torch.func.grad(objective(f)), (x,),
                                                                     (torch.ones_like(x),))[1])):
        assert_close(transform(ours), transform(theirs), DT, name)


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_weighted_ignore", "mse_mean"])
def test_loss_jacobians_over_several_outputs_match_torch(device, name):
    """jacrev of several values of one mean loss: vmap over the cotangents, each sample's reduced values the
    same (unbatched) tensors: each row of the Jacobian as torch's."""
    ours, theirs, params, inputs = _case(name, device)
    jacobians = [torch.func.jacrev(lambda x: torch.stack([f(params, x, *inputs[1:]), 2 * f(params, x, *inputs[1:])]))(
        inputs[0]) for f in (ours, theirs)]
    assert_close(*jacobians, DT, "Jacobian")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "tanh"])
@pytest.mark.parametrize("shape", [(7,), (1, 7)])
def test_jacrev_of_one_row_matches_torch(device, masked, activation, shape):
    """jacrev of a layer over one row (vmap over the cotangents, the forward's saved act'(z) or output shared by
    every sample): the saved row expanded to the samples is a view with rows 0 apart, which the kernels must not
    read as dense rows."""
    gen = torch.Generator().manual_seed(case_seed("one row", masked, activation, shape))
    x, w, b = (torch.randn(s, generator=gen, dtype=DT).to(device) for s in (shape, (5, 7), (5,)))
    mask = _mask(5, 7).to(device)
    ours = ((lambda t: gpunn.functional.masked_linear(t, w, mask, b, activation)) if masked
            else (lambda t: gpunn.functional.linear(t, w, b, activation)))
    act = F.gelu if activation == "gelu" else torch.tanh
    theirs = lambda t: act(F.linear(t, w * mask if masked else w, b))  # noqa: E731
    assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(theirs)(x), DT, "Jacobian")


@pytest.mark.parametrize("name", ["linear_gelu", "rnn_2layer_bidirectional", "local2d", "cross_entropy"])
def test_jacrev_matches_torch(device, name):
    ours, theirs, params, inputs = _case(name, device)
    jacobian = torch.func.jacrev(lambda x: _output(ours(params, x, *inputs[1:])))(inputs[0])
    expected = torch.autograd.functional.jacobian(lambda x: _output(theirs(params, x, *inputs[1:])), inputs[0])
    assert_close(jacobian, expected, DT, "Jacobian")


def test_local_hessian_under_transforms_matches_torch(device):
    """The locally connected layers take every order, under the transforms too: jacrev(jacrev(f))."""
    ours, theirs, params, inputs = _case("local2d", device)
    hessians = [torch.func.jacrev(torch.func.jacrev(lambda x: _output(function(params, x)).sin().sum()))(inputs[0])
                for function in (ours, theirs)]
    assert hessians[0].abs().sum() > 0
    assert_close(*hessians, DT, "Hessian")


@pytest.mark.parametrize("name", ["linear_gelu", "masked_tanh", "rnn_cell_relu", "rnn_2layer_bidirectional",
                                  "cross_entropy", "mse_sum"])
def test_a_second_order_under_transforms_is_refused(device, name):
    """A second order under the transforms would need the first-order ops differentiable there: refused, not
    silently wrong (without the transforms, torch.autograd.grad with create_graph=True takes it)."""
    ours, _, params, inputs = _case(name, device)
    first = torch.func.grad(lambda x: _output(ours(params, x, *inputs[1:])).pow(2).sum())
    with pytest.raises(NotImplementedError, match=r"computed under torch.func transforms \(a second order\)"):
        torch.func.grad(lambda x: first(x).pow(2).sum())(inputs[0])


def test_legacy_batched_gradients_are_refused(device):
    layer = gpunn.Linear(3, 4, device=device, dtype=DT, activation="tanh")
    x = torch.randn(2, 3, dtype=DT, device=device, requires_grad=True)
    basis = torch.eye(8, dtype=DT, device=device).view(8, 2, 4)
    with pytest.raises(NotImplementedError, match="is_grads_batched"):
        torch.autograd.grad(layer(x), x, basis, is_grads_batched=True)
    with pytest.raises(NotImplementedError, match="vectorize=True"):
        torch.autograd.functional.jacobian(layer, x, vectorize=True)


def test_vmap_over_no_samples(device):
    """A batch of none: the shapes torch's vmap gives, with no kernel to run."""
    layer, rnn = gpunn.Linear(4, 3, device=device), gpunn.RNN(3, 5, num_layers=2, device=device)
    params = {key: value.detach() for key, value in layer.named_parameters()}
    objective = torch.func.grad(lambda p, x: torch.func.functional_call(layer, p, (x,)).sum())
    with count_launches() as launches:
        assert torch.func.vmap(layer)(torch.randn(0, 2, 4, device=device)).shape == (0, 2, 3)
        grads = torch.func.vmap(objective, in_dims=(None, 0))(params, torch.randn(0, 2, 4, device=device))
        out, h_n = torch.func.vmap(rnn, in_dims=1, out_dims=1)(torch.randn(6, 0, 2, 3, device=device))
    assert launches == {}
    assert {key: tuple(grad.shape) for key, grad in grads.items()} == {"weight": (0, 3, 4), "bias": (0, 3)}
    assert out.shape == (6, 0, 2, 5) and h_n.shape == (2, 0, 2, 5)
    # Losses over samples of any shape, unbatched logits (C,) included.
    empty = torch.randn(0, 5, 2, device=device)
    unbatched, index = torch.randn(0, 4, device=device), torch.zeros(0, device=device, dtype=torch.long)
    assert torch.func.vmap(gpunn.functional.mse_loss)(empty, empty).shape == (0,)
    assert torch.func.vmap(gpunn.functional.cross_entropy)(unbatched, index).shape == (0,)
    assert torch.func.vmap(gpunn.functional.cross_entropy)(unbatched, unbatched.softmax(-1)).shape == (0,)


@pytest.mark.parametrize("name", ["linear_gelu", "rnn_cell_relu"])
def test_a_frozen_layers_input_may_change_in_place_under_grad(device, name):
    """First order does not read a frozen layer's input; changed in place after the forward, it fails no
    version check under torch.func either (as with torch's layers)."""
    ours, theirs, params, inputs = _case(name, device)

    def objective(function):
        def run(x):
            h = x * 2
            out = function(params, h, *inputs[1:])
            h.add_(1)
            return out.pow(2).sum()
        return run

    grad = torch.func.grad(objective(ours))(inputs[0])
    x = inputs[0].clone().requires_grad_()
    assert_close(grad, torch.autograd.grad(objective(theirs)(x), x)[0], DT, "input gradient")


@pytest.mark.parametrize("name", ["linear_gelu", "masked_tanh", "rnn_cell_relu", "local2d", "cross_entropy"])
def test_autograd_over_grad_matches_torch(device, name):
    """A MAML-style outer gradient: plain autograd through torch.func.grad's inner gradients (their double
    backward runs outside the transforms)."""
    ours, theirs, params, inputs = _case(name, device)
    weights = _weights(_output(theirs(params, *inputs)), case_seed(name))
    results = []
    for function in (ours, theirs):
        leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
        x = inputs[0].clone().requires_grad_()
        inner = torch.func.grad(_objective(function, weights), argnums=1)(leaves, x, *inputs[1:])
        wrt = [*leaves.values(), x]
        grads = torch.autograd.grad(inner.sin().sum(), wrt, allow_unused=True)  # the local layer's bias: unused
        results.append([torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)])
    for mine, ref in zip(*results, strict=True):
        assert_close(mine, ref, DT, "outer gradient")


def test_backward_through_vmap_matches_torch(device):
    """Plain autograd through a vmapped forward: the gradients of the whole batch."""
    ours, theirs, params, inputs = _case("rnn_cell_relu", device, samples=3)
    results = []
    for function in (ours, theirs):
        leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
        out = torch.func.vmap(function, in_dims=(None, 0, None))(leaves, *inputs)
        results.append(torch.autograd.grad(out.pow(2).sum(), list(leaves.values())))
    for mine, ref in zip(*results, strict=True):
        assert_close(mine, ref, DT, "parameter gradient")


@pytest.mark.parametrize("name,kernel", [
    ("linear_gelu", "dense_forward_kernel"), ("masked_tanh", "masked_forward_kernel"),
    ("local2d", "local_forward_kernel"), ("local1d", "local_forward_kernel"),
    ("rnn_cell_relu", "rnn_cell_forward_kernel")])
def test_vmap_over_inputs_folds_the_samples_into_one_launch(device, name, kernel):
    """A layer whose rows are independent runs once over every sample's rows (the RNN cell's shared hx
    expanded to each sample); its results are the per-sample ones (test_vmap_over_inputs_...)."""
    ours, theirs, params, inputs = _case(name, device, samples=4)
    with count_launches() as launches:
        out = torch.func.vmap(ours, in_dims=(None, 1) + (None,) * (len(inputs) - 1))(
            params, inputs[0].movedim(0, 1), *inputs[1:])
    assert launches == {kernel: 1}, launches
    for i in range(4):
        assert_close(out[i], theirs(params, inputs[0][i], *inputs[1:]), DT, f"sample {i}")


@pytest.mark.parametrize("in_features,out_features,rows", [(0, 3, 2), (4, 0, 2), (4, 3, 0)])
def test_vmap_over_empty_rows_or_features(device, in_features, out_features, rows):
    """The folded forward with nothing to multiply, write or read: torch's shapes and values (zeros, bias)."""
    ours = gpunn.Linear(in_features, out_features, device=device, dtype=DT)
    theirs = torch.nn.Linear(in_features, out_features, device=device, dtype=DT)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, rows, in_features, device=device, dtype=DT)
    out = torch.func.vmap(ours)(x)
    assert out.shape == (3, rows, out_features)
    assert_close(out, torch.func.vmap(theirs)(x), DT, "output")


# Each kernel's launches for vmap(grad(f)) over any number of samples: one (the dense layer's bias gradient is
# summed in its preactivation pass; the losses' reductions in reduced_loss_kernel), the RNN's per layer and
# direction (its weight gradients, W_ih's and each direction's W_hh, one launch each).
_LOSS = {"reduced_loss_kernel": 1}
FOLDED_LAUNCHES = {
    "linear_gelu": {"dense_forward_kernel": 1, "dense_grad_preactivation_kernel": 1, "dense_grad_input_kernel": 1,
                    "dense_grad_weight_kernel": 1},
    "masked_tanh": {"masked_forward_kernel": 1, "masked_grad_input_kernel": 1, "masked_grad_weight_kernel": 1},
    "local2d": {"local_forward_kernel": 1, "local_grad_input_kernel": 1, "local_grad_weight_kernel": 1},
    "local1d": {"local_forward_kernel": 1, "local_grad_input_kernel": 1, "local_grad_weight_kernel": 1},
    "rnn_cell_relu": {"rnn_cell_forward_kernel": 1, "dense_grad_preactivation_kernel": 1,
                      "dense_grad_input_kernel": 1, "dense_grad_weight_kernel": 1},
    "cross_entropy": {"cross_entropy_forward_kernel": 1, "cross_entropy_backward_kernel": 1, **_LOSS},
    "cross_entropy_weighted_ignore": {"cross_entropy_forward_kernel": 1, "cross_entropy_backward_kernel": 1, **_LOSS},
    "cross_entropy_probabilities": {"cross_entropy_probs_forward_kernel": 1, "cross_entropy_probs_backward_kernel": 1,
                                    **_LOSS},
    "mse_sum": {"mse_forward_kernel": 1, "mse_backward_kernel": 1, **_LOSS},
    "mse_mean": {"mse_forward_kernel": 1, "mse_backward_kernel": 1, **_LOSS},
    "rnn_2layer_bidirectional": {"dense_forward_kernel": 2, "rnn_sequence_forward_kernel": 4,
                                 "rnn_sequence_backward_kernel": 4, "dense_grad_preactivation_kernel": 2,
                                 "dense_grad_input_kernel": 2, "dense_grad_weight_kernel": 6},
    "rnn_batch_first_hx": {"dense_forward_kernel": 1, "rnn_sequence_forward_kernel": 1,
                           "rnn_sequence_backward_kernel": 1, "dense_grad_preactivation_kernel": 1,
                           "dense_grad_input_kernel": 1, "dense_grad_weight_kernel": 2},
}


@pytest.mark.parametrize("name", list(FOLDED_LAUNCHES))
def test_per_sample_gradients_take_one_launch_per_kernel_whatever_the_samples(device, name):
    """vmap(grad(f)) over the inputs of a dense, masked or cell layer, of a loss, or of an RNN over padded
    sequences: every kernel, the backward's per-sample weight and bias gradients and the per-sample losses
    included, runs once over all samples (the RNN's as often as for one call: per layer and direction);
    test_per_sample_gradients_match_torch checks the values."""
    for samples in (2, 5):
        ours, theirs, params, inputs = _case(name, device, samples)
        weights = _weights(_output(theirs(params, inputs[0][0], *inputs[1:])), case_seed(name))
        per_sample = torch.func.vmap(torch.func.grad(_objective(ours, weights), argnums=(0, 1)),
                                     in_dims=(None, 0) + (None,) * (len(inputs) - 1))
        with TorchOpSpy() as spy, count_launches() as launches:
            per_sample(params, *inputs)
        assert launches == FOLDED_LAUNCHES[name], (samples, launches)
        assert not spy.matmuls(), spy.matmuls()


def _rnn_pair(device, **options):
    ours = gpunn.RNN(3, 5, device=device, dtype=DT, **options)
    theirs = torch.nn.RNN(3, 5, device=device, dtype=DT, **options)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs, {key: value.detach() for key, value in ours.named_parameters()}


@pytest.mark.parametrize("hx", [False, True])
def test_per_sample_gradients_of_an_rnn_over_single_sequences_match_torch(device, hx):
    """DP-SGD's case: each sample one unbatched sequence (T, I), with or without its own initial state, and
    vmap(grad) over them; and a vmap over such batches of samples (each sample's gradients apart within an
    already folded call): every sample's weight, input and state gradients as torch's autograd gives them."""
    ours, theirs, params = _rnn_pair(device, num_layers=2, bidirectional=True, nonlinearity="relu")
    gen = torch.Generator().manual_seed(case_seed("rnn_single_sequences", hx))
    x = torch.randn(2, 3, 7, 3, generator=gen, dtype=DT).to(device)  # (outer samples, samples, T, I)
    h0 = torch.randn(2, 3, 4, 5, generator=gen, dtype=DT).to(device)  # (outer, samples, layers * 2, H)
    weights = torch.randn(7, 10, generator=gen, dtype=DT).to(device)

    def objective(model):
        def run(p, x, h0):
            out, h_n = torch.func.functional_call(model, p, (x, h0) if hx else (x,))
            return (out * weights).sum() + h_n.pow(2).sum()
        return run

    per_sample = torch.func.vmap(torch.func.grad(objective(ours), argnums=(0, 1, 2)), in_dims=(None, 0, 0))
    with count_launches() as launches:
        grads = torch.func.vmap(per_sample, in_dims=(None, 0, 0))(params, x, h0)
    assert launches["rnn_sequence_forward_kernel"] == 4  # 2 layers x 2 directions, for all 6 samples
    for i, j in itertools.product(range(2), range(3)):
        leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
        xs, hs = x[i, j].clone().requires_grad_(), h0[i, j].clone().requires_grad_()
        expected = torch.autograd.grad(objective(theirs)(leaves, xs, hs), [*leaves.values(), xs, hs],
                                       allow_unused=True)
        for key, value in zip(leaves, expected):
            assert_close(grads[0][key][i, j], value, DT, f"sample {i}, {j}: {key}")
        assert_close(grads[1][i, j], expected[-2], DT, f"sample {i}, {j}: input")
        if hx:
            assert_close(grads[2][i, j], expected[-1], DT, f"sample {i}, {j}: initial state")


@pytest.mark.parametrize("x_dim,h_dim", [(1, None), (None, 0), (2, 1)])
@pytest.mark.parametrize("wrt", ["everything", "weight_hh and biases", "output only"])
def test_rnn_fold_over_any_batched_arguments_matches_torch(device, monkeypatch, x_dim, h_dim, wrt):
    """vmap(grad(f)) over gpunn.RNN (two layers, both directions, batch_first, three batch rows a sample)
    with the samples at any dim of the input, of the initial state or of both; gradients of all arguments,
    or of W_hh and the biases alone (the input is then not kept), or of a loss of the output alone (no
    gradient reaches h_n); with at most 2 samples a launch (MOST_GROUPS), so in chunks: each sample's
    gradients as torch's autograd gives them."""
    from gpunn.ops import library
    ours, theirs, params = _rnn_pair(device, num_layers=2, bidirectional=True, batch_first=True)
    samples, gen = 5, torch.Generator().manual_seed(case_seed("rnn_fold_dims", x_dim, h_dim, wrt))
    x = torch.randn(3, 6, 3, generator=gen, dtype=DT).to(device)  # (B, T, I), batch_first
    h0 = torch.randn(4, 3, 5, generator=gen, dtype=DT).to(device)
    if x_dim is not None:
        x = torch.randn(samples, *x.shape, generator=gen, dtype=DT).to(device).movedim(0, x_dim)
    if h_dim is not None:
        h0 = torch.randn(samples, *h0.shape, generator=gen, dtype=DT).to(device).movedim(0, h_dim)
    weights = torch.randn(3, 6, 10, generator=gen, dtype=DT).to(device)
    names = [key for key in params if wrt == "everything" or "weight_hh" in key or "bias" in key]

    def objective(model, output_only=wrt == "output only"):
        def run(chosen, x, h0):
            out, h_n = torch.func.functional_call(model, {**params, **chosen}, (x, h0))
            return (out * weights).sum() + (0 if output_only else h_n.pow(2).sum())
        return run

    monkeypatch.setattr(library, "MOST_GROUPS", 2)
    argnums = (0, 1, 2) if wrt == "everything" else 0
    with count_launches() as launches:
        grads = torch.func.vmap(torch.func.grad(objective(ours), argnums=argnums), in_dims=(None, x_dim, h_dim))(
            {key: params[key] for key in names}, x, h0)
    assert launches["rnn_sequence_forward_kernel"] == 4  # one call: 2 layers x 2 directions
    assert launches["rnn_sequence_backward_kernel"] == 4 * 3  # in 3 chunks of at most 2 samples
    if wrt != "everything":
        grads = (grads,)
    for i in range(samples):
        leaves = {key: params[key].clone().requires_grad_() for key in names}
        xs = (x.select(x_dim, i) if x_dim is not None else x).clone().requires_grad_()
        hs = (h0.select(h_dim, i) if h_dim is not None else h0).clone().requires_grad_()
        wanted = [*leaves.values(), xs, hs] if wrt == "everything" else list(leaves.values())
        expected = iter(torch.autograd.grad(objective(theirs)(leaves, xs, hs), wanted))
        for key in names:
            assert_close(grads[0][key][i], next(expected), DT, f"sample {i}: {key}")
        if wrt == "everything":
            assert_close(grads[1][i], next(expected), DT, f"sample {i}: input")
            assert_close(grads[2][i], next(expected), DT, f"sample {i}: initial state")


def test_rnn_backward_through_vmap_and_vjp_over_cotangents_match_torch(device):
    """Plain autograd through a vmapped gpunn.RNN (the fold recorded, summing over every sample), and
    vmap over vjp's function (only the cotangents batched): torch's results."""
    ours, theirs, params = _rnn_pair(device, bidirectional=True)
    gen = torch.Generator().manual_seed(case_seed("rnn_fold_autograd"))
    x = torch.randn(4, 5, 2, 3, generator=gen, dtype=DT).to(device)
    results = []
    for model in (ours, theirs):
        leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
        if model is ours:
            out, h_n = torch.func.vmap(lambda x: torch.func.functional_call(model, leaves, (x,)))(x)
        else:
            out, h_n = (torch.stack(t) for t in zip(*[torch.func.functional_call(model, leaves, (x[i],))
                                                      for i in range(4)]))
        results.append(torch.autograd.grad(out.sin().sum() + h_n.pow(2).sum(), list(leaves.values())))
    for mine, ref, key in zip(*results, params):
        assert_close(mine, ref, DT, f"through vmap: {key}")
    cotangents = torch.randn(3, 5, 2, 10, generator=gen, dtype=DT).to(device)
    _, vjp = torch.func.vjp(lambda p: torch.func.functional_call(ours, p, (x[0],))[0], params)
    per_cotangent = torch.func.vmap(vjp)(cotangents)[0]
    for i in range(3):
        leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
        expected = torch.autograd.grad(torch.func.functional_call(theirs, leaves, (x[0],))[0], list(leaves.values()),
                                       cotangents[i])
        for key, value in zip(params, expected):
            assert_close(per_cotangent[key][i], value, DT, f"cotangent {i}: {key}")


def test_rnn_per_sample_gradients_tracked_outside_refuse_a_further_order(device):
    """Per-sample gradients of gpunn.RNN whose parameters an outer autograd tracks: the penalty's backward
    is refused (the RNN's gradients under the transforms are first order), not silently left out."""
    ours, _, params = _rnn_pair(device)
    leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
    x = torch.randn(3, 4, 2, 3, dtype=DT, device=device)
    grads = torch.func.vmap(torch.func.grad(lambda p, x: torch.func.functional_call(ours, p, (x,))[0].sin().sum()),
                            in_dims=(None, 0))(leaves, x)
    penalty = sum(grad.pow(2).sum() for grad in grads.values())
    assert penalty.requires_grad
    with pytest.raises(NotImplementedError, match=r"computed under torch.func transforms \(a second order\)"):
        penalty.backward()


def test_rnn_fold_over_no_samples_or_no_batch(device):
    """vmap(grad(f)) over zero samples, and over samples of no batch rows: torch's shapes, zero gradients."""
    ours, _, params = _rnn_pair(device)
    objective = torch.func.grad(lambda p, x: torch.func.functional_call(ours, p, (x,))[0].sin().sum())
    for shape in ((0, 4, 2, 3), (3, 4, 0, 3)):
        grads = torch.func.vmap(objective, in_dims=(None, 0))(params, torch.randn(shape, dtype=DT, device=device))
        for key, value in params.items():
            assert grads[key].shape == (shape[0], *value.shape)
            assert not grads[key].any()


def _per_sample_model(device):
    """A dense GELU layer, a masked layer and a cross-entropy with class weights, ignore_index and label
    smoothing, as gpunn's and torch's functions of (params, x, target); odd sizes."""
    mask = _mask(5, 7).to(device)
    model = torch.nn.Sequential(gpunn.Linear(9, 7, activation="gelu"), gpunn.MaskedLinear(7, 5, mask)).to(device, DT)
    class_weights = torch.rand(5, dtype=DT, device=device) + 0.5
    options = dict(weight=class_weights, ignore_index=3, label_smoothing=0.2)

    def ours(p, x, t):
        return gpunn.losses.cross_entropy(torch.func.functional_call(model, p, (x,)), t, **options)

    def theirs(p, x, t):
        hidden = F.gelu(F.linear(x, p["0.weight"], p["0.bias"]))
        return F.cross_entropy(F.linear(hidden, p["1.weight"] * mask, p["1.bias"]), t, **options)

    gen = torch.Generator().manual_seed(case_seed("per_sample_model"))
    params = {key: torch.randn(value.shape, generator=gen, dtype=DT).to(device)
              for key, value in model.named_parameters()}
    return ours, theirs, params


@pytest.mark.parametrize("samples,rows", [(7, 37), (3, 1)])
def test_per_sample_gradients_of_a_model_and_its_loss_match_torch(device, samples, rows):
    """Per-sample gradients (DP-SGD's kind) of a small model and its loss, each sample several rows (more than
    a block of the kernels' row loops) or one: each sample's gradients as torch's autograd gives them."""
    ours, theirs, params = _per_sample_model(device)
    gen = torch.Generator().manual_seed(case_seed("per_sample_model", samples, rows))
    x = torch.randn(samples, rows, 9, generator=gen, dtype=DT).to(device)
    target = torch.randint(0, 5, (samples, rows), generator=gen).to(device)
    grads = torch.func.vmap(torch.func.grad(ours), in_dims=(None, 0, 0))(params, x, target)
    for i in range(samples):
        leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
        expected = torch.autograd.grad(theirs(leaves, x[i], target[i]), list(leaves.values()))
        for key, value in zip(leaves, expected):
            assert_close(grads[key][i], value, DT, f"sample {i}: {key}")


@pytest.mark.parametrize("one_d", [False, True])
def test_per_sample_gradients_of_local_layers_over_batches_of_images_match_torch(device, one_d):
    """Per-sample gradients where each sample is a batch of images (more than a block of the weight gradient's
    batch loop), batched along dim 1 (strided): each sample's weight, bias and input gradients as torch's."""
    if one_d:
        module = gpunn.LocallyConnected1d(3, 2, 9, 4, stride=2, padding=1, dilation=2)
        theirs = lambda p, x: torch_reference.locally_connected1d(x, p["weight"], p["bias"], 2, 1, 2)  # noqa: E731
        image = (3, 9)
    else:
        module = gpunn.LocallyConnected2d(3, 2, (6, 5), (3, 2), stride=(2, 1), padding=(1, 0))
        theirs = lambda p, x: torch_reference.locally_connected2d(x, p["weight"], p["bias"], (2, 1), (1, 0))  # noqa: E731
        image = (3, 6, 5)
    module = module.to(device, DT)
    gen = torch.Generator().manual_seed(case_seed("local per sample", one_d))
    params = {key: torch.randn(value.shape, generator=gen, dtype=DT).to(device)
              for key, value in module.named_parameters()}
    x = torch.randn(67, 3, *image, generator=gen, dtype=DT).to(device)  # (rows, samples, *image)
    weights = _weights(theirs(params, x[:, 0]), case_seed("local per sample weights", one_d))
    objective = _objective(lambda p, x: torch.func.functional_call(module, p, (x,)), weights)
    with count_launches() as launches:
        grads, grad_x = torch.func.vmap(torch.func.grad(objective, argnums=(0, 1)), in_dims=(None, 1))(params, x)
    assert launches["local_grad_weight_kernel"] == 1, launches
    for i in range(3):
        _assert_grads_close(({key: grad[i] for key, grad in grads.items()}, grad_x[i]),
                            _torch_grads(theirs, weights, params, [x[:, i]]), f"sample {i}")


def test_per_sample_gradients_fold_at_most_the_grid_limit_of_samples_at_once(device, monkeypatch):
    """The samples' groups sit on a grid axis CUDA limits (65535): a larger batch folds in chunks of samples
    (here a limit of 4 groups, over 11 samples in 3 chunks, and over 3 x 3 samples nested, one sample a chunk)."""
    from gpunn.ops import library
    monkeypatch.setattr(library, "MOST_GROUPS", 4)
    ours, theirs, params = _per_sample_model(device)
    gen = torch.Generator().manual_seed(case_seed("chunked"))
    x = torch.randn(11, 2, 9, generator=gen, dtype=DT).to(device)
    target = torch.randint(0, 5, (11, 2), generator=gen).to(device)
    per_sample = torch.func.vmap(torch.func.grad(ours), in_dims=(None, 0, 0))
    with count_launches() as launches:
        grads = per_sample(params, x, target)
    assert launches["dense_grad_weight_kernel"] == 3 and launches["cross_entropy_backward_kernel"] == 3, launches
    nested = torch.func.vmap(per_sample, in_dims=(None, 0, 0))(params, x[:9].view(3, 3, 2, 9), target[:9].view(3, 3, 2))
    for i in range(11):
        leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
        expected = torch.autograd.grad(theirs(leaves, x[i], target[i]), list(leaves.values()))
        for key, value in zip(leaves, expected):
            assert_close(grads[key][i], value, DT, f"sample {i}: {key}")
            if i < 9:
                assert_close(nested[key][i // 3, i % 3], value, DT, f"nested sample {i}: {key}")


def test_per_sample_values_read_from_strided_or_expanded_batches_match_torch(device):
    # A sample that is one value (an MSE element, a class index) taken from a column of a wider batch (x[:, 0])
    # or expanded from one value: the fold's reshape of such a batch is a view at another stride, which the loss
    # kernels read densely (other samples' values; past the end of an expanded one). Folded contiguous now.
    gen = torch.Generator().manual_seed(case_seed("strided samples"))
    pred, other = (torch.randn(5, 3, generator=gen, dtype=DT).to(device) for _ in range(2))
    zero = torch.zeros(1, device=device, dtype=DT).expand(5)
    logits = torch.randn(5, 4, generator=gen, dtype=DT).to(device)
    labels = torch.randint(0, 4, (5, 3), generator=gen).to(device)
    cases = [(gpunn.functional.mse_loss, F.mse_loss, (pred[:, 0], other[:, 1])),
             (gpunn.functional.mse_loss, F.mse_loss, (pred[:, 2], zero)),
             (gpunn.functional.cross_entropy, F.cross_entropy, (logits, labels[:, 1]))]
    for ours, theirs, args in cases:
        assert_close(torch.func.vmap(ours)(*args), torch.func.vmap(theirs)(*args), DT, "per-sample loss")
        assert_close(torch.func.vmap(torch.func.grad(ours))(*args), torch.func.vmap(torch.func.grad(theirs))(*args),
                     DT, "per-sample gradient")


def test_nested_folds_in_chunks_of_single_rows_match_torch(device, monkeypatch):
    # Nested vmaps over samples of one row each, cut into chunks of at most 2 groups: a chunk's rows are a
    # strided view of the inner fold's, and the backward read what the forward saved (tanh's output) as dense
    # rows: another sample's.
    from gpunn.ops import library
    monkeypatch.setattr(library, "MOST_GROUPS", 2)
    layer = gpunn.Linear(2, 1, activation="tanh", device=device, dtype=DT)
    params = {key: value.detach() for key, value in layer.named_parameters()}
    x = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(case_seed("nested chunks")), dtype=DT).to(device)
    ours = torch.func.grad(lambda p, x: torch.func.functional_call(layer, p, (x,)).sum())
    theirs = torch.func.grad(lambda p, x: torch.tanh(F.linear(x, p["weight"], p["bias"])).sum())
    per_sample = [torch.func.vmap(torch.func.vmap(f, in_dims=(None, 0)), in_dims=(None, 0)) for f in (ours, theirs)]
    nested = [f(params, x) for f in per_sample]
    for key in params:
        assert_close(nested[0][key], nested[1][key], DT, key)


@pytest.mark.parametrize("loss", ["mse_mean", "cross_entropy_mean"])
def test_per_sample_losses_over_more_than_a_block_of_rows_match_torch(device, loss):
    """Per-sample losses whose samples span several of the reducing kernels' blocks (MSE's elements, the
    reduction's 1024 rows): each sample's loss and input gradient as torch's."""
    gen = torch.Generator().manual_seed(case_seed(loss, "long samples"))
    x = torch.randn(3, 1100, 3, generator=gen, dtype=DT).to(device)
    if loss == "mse_mean":
        target = torch.randn(3, 1100, 3, generator=gen, dtype=DT).to(device)
        ours, theirs = gpunn.losses.mse_loss, F.mse_loss
    else:
        target = torch.randint(0, 3, (3, 1100), generator=gen).to(device)
        ours, theirs = gpunn.losses.cross_entropy, F.cross_entropy
    grads, values = torch.func.vmap(torch.func.grad_and_value(ours))(x, target)
    for i in range(3):
        leaf = x[i].clone().requires_grad_()
        value = theirs(leaf, target[i])
        assert_close(values[i], value.detach(), DT, f"sample {i}: loss")
        assert_close(grads[i], torch.autograd.grad(value, leaf)[0], DT, f"sample {i}: input gradient")


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_weighted_ignore", "cross_entropy_probabilities",
                                  "mse_sum", "mse_mean"])
@pytest.mark.parametrize("outer", ["autograd", "torch.func.grad"])
def test_gradients_through_vmap_of_a_loss_match_torch(device, name, outer):
    """Autograd, or torch.func.grad, over per-sample losses from vmap: the losses' backward takes one loss over
    all rows, so a recorded call runs once per sample rather than folded (a fold's per-sample sums would be
    misread: wrong gradients, no error)."""
    ours, theirs, params, inputs = _case(name, device, samples=3)
    weights = torch.randn(3, generator=torch.Generator().manual_seed(case_seed(name, outer)), dtype=DT).to(device)
    results = []
    for function in (ours, theirs):
        def objective(x, function=function):
            return (torch.func.vmap(function, in_dims=(None, 0) + (None,) * (len(inputs) - 1))(
                params, x, *inputs[1:]) * weights).sum()
        if outer == "autograd" or function is theirs:
            x = inputs[0].clone().requires_grad_()
            results.append(torch.autograd.grad(objective(x), x)[0])
        else:
            results.append(torch.func.grad(objective)(inputs[0]))
    assert_close(*results, DT, "input gradient")


@pytest.mark.parametrize("name", ["linear_gelu", "masked_tanh"])
def test_autograd_over_per_sample_gradients_matches_torch(device, name):
    """A penalty on per-sample gradients (vmap(grad(f)), differentiated by plain autograd): the layer's
    backward op (the RNN cell's too), recorded, runs once per sample, and its double backward sees each
    sample's gradients. (The relu cell's penalty has zero gradient: relu'' is 0.)"""
    ours, theirs, params, inputs = _case(name, device, samples=3)
    weights = _weights(_output(theirs(params, inputs[0][0], *inputs[1:])), case_seed(name))
    results = []
    for function in (ours, theirs):
        leaves = {key: value.clone().requires_grad_() for key, value in params.items()}
        per_sample = torch.func.vmap(torch.func.grad(_objective(function, weights)),
                                     in_dims=(None, 0) + (None,) * (len(inputs) - 1))(leaves, *inputs)
        penalty = sum(grad.pow(2).sum() for grad in per_sample.values())
        results.append(torch.autograd.grad(penalty, list(leaves.values())))
    assert sum(ref.abs().sum() for ref in results[1]) > 0
    for mine, ref in zip(*results, strict=True):
        assert_close(mine, ref, DT, "penalty gradient")



@pytest.mark.parametrize("layer", ["dense", "masked", "local2d", "local1d"])
def test_per_group_weight_gradients_equal_a_launch_per_group_whatever_the_strides(device, layer):
    """A weight-gradient op with groups (the per-sample fold's) over operands read in place at unusual strides
    (a column-major input, an output gradient sliced from wider rows; the local layer's batch at stride 1,
    every other channel): each group's dW and db are those of a launch over that group's rows alone."""
    from gpunn.kernels.layout import DEFAULT_BLOCKS
    from gpunn.ops import linear as ops_linear, local as ops_local
    gen = torch.Generator().manual_seed(case_seed("grouped", layer))
    rows, groups = 67, 3  # more rows a group than a block of the kernels' row loops

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=DT).to(device)

    if layer.startswith("local"):
        one_d = layer == "local1d"
        geometry = gpunn.functional.local_geometry(3, 2, 1, 1, dims=1 if one_d else 2)
        c, h, w, o = 2, 1 if one_d else 5, 7, 3
        oh, ow = geometry.output_size(h, w)
        x = randn(c, h, w, groups * rows).permute(3, 0, 1, 2)
        dy = randn(groups * rows, 2 * o, oh, ow)[:, ::2]
        weight_shape = [o, oh * ow, c * geometry.kh * geometry.kw]

        def launch(part, g):
            return ops_local.grad_weight(x[part], dy[part], [c, h, w], weight_shape, geometry.as_list(), True, g)
    else:
        n, k = 6, 9
        mask = _mask(n, k).to(device) if layer == "masked" else None
        block, activation = (DEFAULT_BLOCKS[8], "relu") if mask is not None else ((0, 0), None)
        x = randn(k, groups * rows).t()
        dy = randn(groups * rows, 2 * n)[:, n:]
        saved = randn(groups * rows, n).relu() if mask is not None else None  # relu's output

        def launch(part, g):
            return ops_linear.grad_weight(dy[part], saved[part] if saved is not None else None, x[part], [n, k], mask,
                                          *block, activation, True, g)

    with count_launches() as launches:
        grouped = launch(slice(None), groups)
    assert sum(launches.values()) == 1 + (layer == "dense"), launches  # the dense layer's db: a pass of its own
    for i in range(groups):
        for mine, theirs, what in zip(grouped, launch(slice(i * rows, (i + 1) * rows), 0), ("dW", "db")):
            assert_close(mine[i], theirs, DT, f"group {i}: {what}")


def test_per_group_sums_are_not_differentiable(device):
    """An op's per-group sums (groups > 0) recorded by autograd are refused rather than differentiated wrong
    (their backward takes one sum over all rows; torch.func's fold makes no such call), and rows that do not
    make equal groups are refused."""
    from gpunn.kernels.runtime import group_rows
    from gpunn.ops import local as ops_local
    geometry = gpunn.functional.local_geometry(3, 1, 1, 1)
    x = torch.randn(4, 2, 5, 5, dtype=DT, device=device, requires_grad=True)
    dy = torch.randn(4, 3, 5, 5, dtype=DT, device=device)
    args = (x, dy, [2, 5, 5], [3, 25, 18], geometry.as_list(), True, 2)
    for op in (ops_local.grad_weight, torch.ops.gpunn.locally_connected_grad_weight):
        with pytest.raises(NotImplementedError, match="groups > 0"):
            op(*args)
    logits = torch.randn(4, 5, dtype=DT, device=device, requires_grad=True)
    with pytest.raises(NotImplementedError, match="groups > 0"):
        gpunn.losses._cross_entropy(logits, torch.tensor([0, 1, 2, 3], device=device), None, -100, 0.0, "mean", 2)
    with pytest.raises(ValueError, match="equal groups"):
        group_rows(7, 2)


def _ensemble(name, device, members):
    """(ours, theirs, one sample's params, the members' params stacked, inputs: the first with a dim of members)."""
    ours, theirs, params, inputs = _case(name, device, members)
    gen = torch.Generator().manual_seed(case_seed(name, "ensemble", members))
    stacked = {key: torch.randn((members, *value.shape), generator=gen, dtype=DT).to(device)
               for key, value in params.items()}
    return ours, theirs, params, stacked, inputs


@pytest.mark.parametrize("name", ["linear_gelu", "masked_tanh", "rnn_cell_relu"])
@pytest.mark.parametrize("shared_input", [False, True])
def test_ensemble_gradients_match_torch(device, name, shared_input):
    """vmap(grad(f)) over an ensemble's stacked parameters (torch.func.stack_module_state's form), each member
    with its own input or all with one: each member's gradients as torch's autograd gives them."""
    members = 3
    ours, theirs, params, stacked, inputs = _ensemble(name, device, members)
    weights = _weights(_output(theirs(params, inputs[0][0], *inputs[1:])), case_seed(name))
    x = inputs[0][0] if shared_input else inputs[0]
    in_dims = (0, None if shared_input else 0) + (None,) * (len(inputs) - 1)
    grads, grad_x = torch.func.vmap(torch.func.grad(_objective(ours, weights), argnums=(0, 1)), in_dims=in_dims)(
        stacked, x, *inputs[1:])
    for i in range(members):
        member = {key: value[i] for key, value in stacked.items()}
        _assert_grads_close(({key: grad[i] for key, grad in grads.items()}, grad_x[i]),
                            _torch_grads(theirs, weights, member, [x if shared_input else x[i], *inputs[1:]]),
                            f"member {i}")


def test_ensembles_of_dense_layers_take_one_launch_per_kernel_whatever_the_members(device):
    """Forward and vmap(grad(f)) over an ensemble of dense layers: every kernel runs once for all members
    (each member's weight on a grid axis of the forward and input-gradient GEMMs, its rows a group of the
    weight and bias gradients), at most 65535 members a launch."""
    kernels = []
    for members in (2, 5):
        ours, theirs, params, stacked, inputs = _ensemble("linear_gelu", device, members)
        weights = _weights(_output(theirs(params, inputs[0][0])), case_seed("linear_gelu"))
        with count_launches() as forward:
            torch.func.vmap(ours)(stacked, inputs[0])
        with count_launches() as backward:
            torch.func.vmap(torch.func.grad(_objective(ours, weights), argnums=(0, 1)))(stacked, inputs[0])
        assert set(forward.values()) == set(backward.values()) == {1}, (forward, backward)
        kernels.append(set(backward))
    assert kernels[0] == kernels[1] and "dense_grad_input_kernel" in kernels[0]


def test_ensembles_fold_at_most_the_grid_limit_of_members_at_once(device, monkeypatch):
    from gpunn.ops import library
    monkeypatch.setattr(library, "MOST_GROUPS", 2)
    ours, theirs, params, stacked, inputs = _ensemble("linear_gelu", device, 5)
    with count_launches() as launches:
        out = torch.func.vmap(ours)(stacked, inputs[0])
    assert launches["dense_forward_kernel"] == 3, launches
    for i in range(5):
        assert_close(out[i], theirs({key: value[i] for key, value in stacked.items()}, inputs[0][i]), DT, f"member {i}")


@pytest.mark.parametrize("name", ["linear_gelu", "masked_tanh"])
@pytest.mark.parametrize("batched", ["members of samples", "samples of members", "members of members"])
def test_nested_vmaps_over_members_and_samples_match_torch(device, name, batched):
    """vmap(vmap(grad(f))) where the parameters are stacked at the outer level, the inner or both, and the
    inputs at both: the inner fold's members (or groups) stay together when the outer one folds again."""
    outer, inner = 3, 2
    ours, theirs, params, _, inputs = _ensemble(name, device, outer * inner)
    weights = _weights(_output(theirs(params, inputs[0][0])), case_seed(name))
    x = inputs[0].view(outer, inner, *inputs[0].shape[1:])
    lead = {"members of samples": (outer,), "samples of members": (inner,), "members of members": (outer, inner)}
    gen = torch.Generator().manual_seed(case_seed(name, batched))
    stacked = {key: torch.randn((*lead[batched], *value.shape), generator=gen, dtype=DT).to(device)
               for key, value in params.items()}
    dims = {"members of samples": (0, None), "samples of members": (None, 0), "members of members": (0, 0)}[batched]
    per_sample = torch.func.vmap(torch.func.vmap(torch.func.grad(_objective(ours, weights)), in_dims=(dims[1], 0)),
                                 in_dims=(dims[0], 0))
    grads = per_sample(stacked, x)
    for i in range(outer):
        for j in range(inner):
            index = {"members of samples": (i,), "samples of members": (j,), "members of members": (i, j)}[batched]
            member = {key: value[index] for key, value in stacked.items()}
            leaves = {key: value.clone().requires_grad_() for key, value in member.items()}
            expected = torch.autograd.grad(_objective(theirs, weights)(leaves, x[i, j]), list(leaves.values()))
            for key, value in zip(leaves, expected):
                assert_close(grads[key][i, j], value, DT, f"{batched} ({i}, {j}): {key}")


def test_autograd_and_grad_through_nested_vmaps_of_members_and_samples_match_torch(device):
    """Eager autograd, and torch.func.grad further out, over vmap(vmap(...)) of an ensemble and a batch of
    inputs: an inner vmap sees the outer one's wrappers, which do not say that autograd records the tensors
    inside them, so the fold looks through them (folded there, a member's call would be recorded and refused)."""
    gen = torch.Generator().manual_seed(case_seed("nested autograd"))
    w = torch.randn(3, 6, 5, generator=gen, dtype=DT).to(device)
    x = torch.randn(2, 4, 5, generator=gen, dtype=DT).to(device)

    def run(linear, w, x):
        return torch.func.vmap(torch.func.vmap(lambda w, x: linear(x, w).tanh(), in_dims=(0, None)),
                               in_dims=(None, 0))(w, x)

    grads = []
    for linear in (gpunn.functional.linear, F.linear):
        leaf_w, leaf_x = w.clone().requires_grad_(), x.clone().requires_grad_()
        run(linear, leaf_w, leaf_x).pow(2).sum().backward()
        outer = torch.func.grad(lambda w: run(linear, w, x).pow(2).sum())(w)
        grads.append((leaf_w.grad, leaf_x.grad, outer))
    for mine, theirs, what in zip(*grads, ("weight", "input", "grad over the weight")):
        assert_close(mine, theirs, DT, what)
    logits = torch.randn(2, 3, 4, 5, generator=gen, dtype=DT).to(device)
    target = torch.randint(0, 5, (2, 3, 4), generator=gen).to(device)
    losses = []
    for loss in (gpunn.losses.cross_entropy, F.cross_entropy):
        leaf = logits.clone().requires_grad_()
        torch.func.vmap(torch.func.vmap(loss))(leaf, target).sum().backward()
        losses.append(leaf.grad)
    assert_close(*losses, DT, "vmapped losses' gradient")


@pytest.mark.parametrize("masked", [False, True])
def test_backward_of_an_ensemble_forward_under_vmap_matches_torch(device, masked):
    """An ensemble's forward under vmap (stack_module_state's parameters, which require grad), then plain
    .backward(): the forward sees through vmap's wrappers that autograd records it, and saves GELU's act'(z)."""
    gen = torch.Generator().manual_seed(case_seed("ensemble backward", masked))
    mask = _mask(6, 5).to(device)
    models = [(gpunn.MaskedLinear(5, 6, mask, activation="gelu") if masked else
               gpunn.Linear(5, 6, activation="gelu")).to(device, DT) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    x = torch.randn(3, 4, 5, generator=gen, dtype=DT).to(device)
    out = torch.func.vmap(lambda p, b, x: torch.func.functional_call(models[0], (p, b), (x,)))(params, buffers, x)
    out.pow(2).sum().backward()
    for i, model in enumerate(models):
        leaves = {key: value.detach().clone().requires_grad_() for key, value in model.named_parameters()}
        z = F.linear(x[i], leaves["weight"] * mask if masked else leaves["weight"], leaves["bias"])
        expected = torch.autograd.grad(F.gelu(z).pow(2).sum(), list(leaves.values()))
        for key, value in zip(leaves, expected):
            assert_close(params[key].grad[i], value, DT, f"member {i}: {key}")


def test_an_ensemble_of_samples_runs_once_a_sample_without_copying_weights(device):
    """vmap over samples of vmap over an ensemble: the inner fold's members are runs of rows, which folding
    the samples would interleave, and making each sample a member would copy the weights once a sample: the
    outer level runs the members' launch once a sample."""
    gen = torch.Generator().manual_seed(case_seed("samples of members"))
    w = torch.randn(3, 6, 5, generator=gen, dtype=DT).to(device)
    x = torch.randn(4, 2, 5, generator=gen, dtype=DT).to(device)
    with count_launches() as launches:
        out = torch.func.vmap(lambda x: torch.func.vmap(lambda w: gpunn.functional.linear(x, w))(w))(x)
    assert launches == {"dense_forward_kernel": 4}, launches
    assert_close(out, torch.einsum("snk,mok->smno", x, w), DT, "output")


def test_members_take_any_weight_and_bias_strides(device):
    """The members' launch steps from one member's weight and bias to the next by their strides: weights of one
    output (size-1 dims, which is_contiguous() ignores) and expanded biases are packed first."""
    from gpunn.ops import linear as ops_linear
    gen = torch.Generator().manual_seed(case_seed("member strides"))
    weight = torch.randn(3, 5, 1, generator=gen, dtype=DT).to(device).transpose(1, 2)  # (3, 1, 5), strides (5, 1, 1)
    bias = torch.randn(1, 1, generator=gen, dtype=DT).to(device).expand(3, 1)
    x = torch.randn(6, 5, generator=gen, dtype=DT).to(device)
    out = ops_linear.linear(x, weight, bias, None, 0, 0, None, 0.0, False, 3)[0]
    expected = torch.cat([F.linear(part, weight[i], bias[i]) for i, part in enumerate(x.chunk(3))])
    assert_close(out, expected, DT, "output")


def test_a_backward_without_what_its_forward_saved_is_refused(device):
    """The op's forward saves GELU's act'(z) only when asked: a backward without it raises rather than read
    the empty placeholder."""
    from gpunn.ops import linear as ops_linear
    x = torch.randn(4, 5, dtype=DT, device=device)
    weight = torch.randn(3, 5, dtype=DT, device=device, requires_grad=True)
    out = ops_linear.linear(x, weight, None, None, 0, 0, "gelu", 0.01, False, 0)[0]
    with pytest.raises(RuntimeError, match="needs what its forward saved"):
        out.sum().backward()
