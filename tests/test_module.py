"""gpunn.Linear as a drop-in for torch.nn.Linear: constructor, init, state_dict, repr, errors (with every layer's
TypeError for an argument that is not a tensor)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import TOLERANCE, assert_close, count_launches, rel_error

import gpunn


def test_same_parameters_and_init_as_nn_linear(device):
    torch.manual_seed(3)
    ours = gpunn.Linear(13, 7, device=device, activation="relu")
    torch.manual_seed(3)
    theirs = torch.nn.Linear(13, 7, device=device)
    assert isinstance(ours, torch.nn.Linear)
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name
    assert ours.in_features == 13 and ours.out_features == 7


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_constructor_dtype_and_no_bias(device, dtype):
    layer = gpunn.Linear(5, 4, bias=False, device=device, dtype=dtype)
    assert layer.bias is None and layer.weight.dtype == dtype and layer.weight.device.type == device.type
    assert list(layer.state_dict()) == ["weight"]


def test_state_dict_round_trips_with_nn_linear(device):
    ours = gpunn.Linear(6, 3, device=device, activation="tanh")
    theirs = torch.nn.Linear(6, 3, device=device)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    fresh = gpunn.Linear(6, 3, device=device, activation="tanh")
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 6, device=device)
    assert rel_error(fresh(x), torch.tanh(theirs(x))) < TOLERANCE[torch.float32]


def test_output_matches_nn_linear_plus_activation(device):
    ours = gpunn.Linear(20, 9, device=device, activation="leaky_relu", negative_slope=0.1)
    theirs = torch.nn.Sequential(torch.nn.Linear(20, 9, device=device), torch.nn.LeakyReLU(0.1))
    theirs[0].load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 20, device=device)
    assert rel_error(ours(x), theirs(x)) < TOLERANCE[torch.float32]


def test_repr():
    assert repr(gpunn.Linear(4, 3)) == "Linear(in_features=4, out_features=3, bias=True)"
    assert repr(gpunn.Linear(4, 3, bias=False, activation="gelu")) == \
        "Linear(in_features=4, out_features=3, bias=False, activation='gelu')"
    assert repr(gpunn.Linear(4, 3, activation="leaky_relu", negative_slope=0.2)) == \
        "Linear(in_features=4, out_features=3, bias=True, activation='leaky_relu', negative_slope=0.2)"


def test_constructor_errors_match_nn_linear():
    with pytest.raises(ValueError, match="Unknown activation"):
        gpunn.Linear(4, 3, activation="softmax")
    with pytest.raises(TypeError, match="negative_slope"):
        gpunn.Linear(4, 3, activation="leaky_relu", negative_slope="0.1")
    for args in [(-1, 3), (4, -2)]:
        with pytest.raises(RuntimeError):
            torch.nn.Linear(*args)
        with pytest.raises(RuntimeError):
            gpunn.Linear(*args)


def test_wrong_input_features_raise_like_nn_linear(device):
    layer = gpunn.Linear(4, 3, device=device)
    with count_launches() as launches, pytest.raises(RuntimeError, match=r"\(2x5 and 4x3\)"):
        layer(torch.randn(2, 5, device=device))
    assert launches == {}
    with pytest.raises(RuntimeError, match=r"\(2x5 and 4x3\)"):
        torch.nn.Linear(4, 3, device=device)(torch.randn(2, 5, device=device))


def test_copy_and_pickle(device):
    layer = gpunn.Linear(4, 3, device=device, activation="silu")
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.activation == "silu"
        x = torch.randn(2, 4, device=device)
        assert torch.equal(clone(x), layer(x))


def test_trains_like_nn_linear(device):
    # A few SGD steps from the same weights, in float64: gpunn and torch.nn move every parameter alike (the
    # moves compared, not the weights, which the steps leave mostly as they were).
    torch.manual_seed(0)
    kw = dict(device=device, dtype=torch.float64)
    ours = torch.nn.Sequential(gpunn.Linear(10, 16, activation="gelu", **kw), gpunn.Linear(16, 3, **kw))
    theirs = torch.nn.Sequential(torch.nn.Linear(10, 16, **kw), torch.nn.GELU(), torch.nn.Linear(16, 3, **kw))
    theirs[0].load_state_dict(ours[0].state_dict())
    theirs[2].load_state_dict(ours[1].state_dict())
    start = [p.detach().clone() for p in ours.parameters()]
    x, y = torch.randn(32, 10, **kw), torch.randint(0, 3, (32,), device=device)
    for model in (ours, theirs):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p0, mine, reference in zip(start, ours.parameters(), theirs.parameters()):
        assert_close(mine.detach() - p0, reference.detach() - p0, torch.float64, "a parameter's move")


def test_arguments_that_are_not_tensors_raise_torchs_type_error(device):
    # A list, an array or None where a tensor goes: TypeError naming the argument, as torch's argument parser
    # raises for F.linear, F.conv2d or torch.rnn_tanh_cell (not an AttributeError from inside gpunn), before
    # any kernel runs.
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    kw = dict(device=device, dtype=torch.float64)
    linear, masked = gpunn.Linear(4, 2, **kw), gpunn.MaskedLinear(4, 4, torch.ones(4, 4, dtype=torch.bool), **kw)
    local2d, local1d = gpunn.LocallyConnected2d(2, 3, (5, 5), 3, **kw), gpunn.LocallyConnected1d(2, 3, 7, 3, **kw)
    cell, rnn = gpunn.RNNCell(4, 5, **kw), gpunn.RNN(4, 5, **kw)
    calls = [(lambda: linear(x.cpu().numpy()), lambda: torch.nn.functional.linear(x.cpu().numpy(), x)),
             (lambda: linear(x.tolist()), lambda: torch.nn.functional.linear(x.tolist(), x)),
             (lambda: gpunn.functional.linear(x, None), lambda: torch.nn.functional.linear(x, None)),
             (lambda: gpunn.functional.linear(x, linear.weight, [0.0, 0.0]),
              lambda: torch.nn.functional.linear(x, linear.weight, [0.0, 0.0])),
             (lambda: masked(x.tolist()), None), (lambda: local2d(x.tolist()), None),
             (lambda: local1d(x.cpu().numpy()), None),
             (lambda: gpunn.functional.locally_connected2d(torch.zeros(2, 5, 5, **kw), None), None),
             (lambda: gpunn.functional.rnn_cell(x, None, cell.weight_ih, None),
              lambda: torch.rnn_tanh_cell(x, x, cell.weight_ih, None)),
             (lambda: gpunn.functional.rnn(x[None], [0.0], rnn._flat_weights), None)]
    for ours, theirs in calls:
        if theirs is not None:
            with pytest.raises(TypeError):
                theirs()
        with count_launches() as launches, pytest.raises(TypeError, match=r"must be Tensor, not"):
            ours()
        assert launches == {}
