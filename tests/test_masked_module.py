"""gpunn.MaskedLinear as a module: constructor, init, the mask buffer in the state_dict, repr, errors,
training."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import TOLERANCE, count_launches, rel_error

import gpunn
from gpunn import masks


def _layer(device, mask=None, **kwargs):
    mask = masks.local_2d((2, 6, 7), 3, padding=1, out_channels=3) if mask is None else mask
    return gpunn.MaskedLinear(mask.shape[1], mask.shape[0], mask, device=device, **kwargs)


def test_parameters_buffers_and_state_dict(device):
    layer = _layer(device, activation="relu")
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.weight.shape == (126, 84) and layer.bias.shape == (126,)
    assert list(layer.state_dict()) == ["weight", "bias", "mask"]
    assert layer.mask.dtype == torch.bool and layer.mask.device.type == device.type
    no_bias = _layer(device, bias=False, dtype=torch.float64)
    assert no_bias.bias is None and no_bias.weight.dtype == torch.float64
    assert list(no_bias.state_dict()) == ["weight", "mask"]


def test_mask_is_copied(device):
    mask = masks.local_1d(20, 10, 3)
    layer = gpunn.MaskedLinear(20, 10, mask, device=device)
    mask.fill_(True)
    assert layer.mask.sum() == 30


def test_init_uses_each_neurons_fan_in(device):
    torch.manual_seed(0)
    mask = masks.random(200, 300, 0.3)
    mask[:5] = False
    layer = gpunn.MaskedLinear(200, 300, mask, device=device)
    weight, bias, mask = layer.weight.detach().cpu(), layer.bias.detach().cpu(), layer.mask.cpu()
    assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))
    bound = mask.sum(1).clamp(min=1).double().rsqrt()
    assert (weight.abs().double() <= bound[:, None]).all() and (bias.abs().double() <= bound).all()
    assert torch.equal(bias[:5], torch.zeros(5))  # no connection: nn.Linear's bound for fan_in 0
    # Uniform in +-bound: the largest draws come close to it.
    assert (weight.abs().double().amax(1)[5:] > 0.6 * bound[5:]).all()
    # With a local_2d mask, an interior neuron's bound is nn.Conv2d's for the same kernel.
    conv = torch.nn.Conv2d(2, 3, 3)
    fan_in = torch.nn.init._calculate_fan_in_and_fan_out(conv.weight)[0]
    assert _layer(device).mask[7 * 1 + 1].sum() == fan_in


def test_state_dict_round_trip_restores_the_mask(device):
    source = _layer(device, activation="tanh")
    target = _layer(device, mask=masks.random(84, 126, 0.5), activation="tanh")
    x = torch.randn(4, 84, device=device)
    target(x)  # caches a layout for the old mask
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(target.mask, source.mask)
    assert rel_error(target(x), source(x)) == 0  # the new mask's layout, not the cached one
    with pytest.raises(RuntimeError, match="size mismatch for mask"):
        _layer(device, mask=masks.random(10, 126, 0.5)).load_state_dict(source.state_dict())


def test_matches_the_dense_reference(device):
    layer = _layer(device, activation="gelu")
    reference = torch.nn.Linear(84, 126, device=device)
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "mask"})
    x = torch.randn(2, 5, 84, device=device)
    assert rel_error(layer(x), torch.nn.functional.gelu(reference(x))) < TOLERANCE[torch.float32]


def test_training_never_moves_masked_weights(device):
    layer = _layer(device, activation="silu")
    with torch.no_grad():
        layer.weight[~layer.mask] = float("nan")  # whatever they hold, nothing reads them
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 84, device=device)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = layer(x).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert layer.weight[~layer.mask].isnan().all() and not layer.weight[layer.mask].isnan().any()
    assert losses[-1] < losses[0]


def test_repr():
    layer = gpunn.MaskedLinear(4, 3, masks.local_1d(4, 3, 2), activation="leaky_relu", negative_slope=0.2)
    assert repr(layer) == ("MaskedLinear(in_features=4, out_features=3, bias=True, connections=6, "
                           "activation='leaky_relu', negative_slope=0.2)")
    assert repr(gpunn.MaskedLinear(4, 3, torch.ones(3, 4, dtype=torch.bool), bias=False)) == \
        "MaskedLinear(in_features=4, out_features=3, bias=False, connections=12)"
    with torch.device("meta"):  # a meta mask has no values to count (deferred initialisation prints it)
        assert "connections=?" in repr(gpunn.MaskedLinear(4, 3, masks.local_1d(4, 3, 2)))


def test_deferred_initialisation_keeps_the_mask_it_was_given(device):
    """Built on the meta device from a real mask, the layer gets that mask back when to_empty makes it real:
    through torch.nn.utils.skip_init, and through a model's to_empty."""
    mask = masks.local_1d(6, 5, 3)
    layer = torch.nn.utils.skip_init(gpunn.MaskedLinear, 6, 5, mask, device=device)
    assert torch.equal(layer.mask.cpu(), mask)
    with torch.device("meta"):
        model = torch.nn.Sequential(gpunn.MaskedLinear(6, 5, mask), torch.nn.Linear(5, 2))
    model.to_empty(device=device)
    assert torch.equal(model[0].mask.cpu(), mask)
    model[0].reset_parameters()
    assert not model[0].weight[~model[0].mask].any()


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(3, 4), TypeError, "bool tensor"),
    ([[True] * 4] * 3, TypeError, "bool tensor"),
    (torch.ones(4, 3, dtype=torch.bool), ValueError, r"shape \(out_features, in_features\) = \(3, 4\)"),
], ids=["float mask", "list", "transposed"])
def test_constructor_errors(mask, error, match):
    with pytest.raises(error, match=match):
        gpunn.MaskedLinear(4, 3, mask)


def test_unknown_activation():
    with pytest.raises(ValueError, match="Unknown activation"):
        gpunn.MaskedLinear(4, 3, torch.ones(3, 4, dtype=torch.bool), activation="swish")


def test_forward_errors_match_nn_linear(device):
    layer = _layer(device)
    with count_launches() as launches, pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        layer(torch.randn(3, 83, device=device))
    assert launches == {}


def test_pickle_deepcopy_and_dtype_conversion(device):
    layer = _layer(device, activation="gelu")
    x = torch.randn(3, 84, device=device)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(clone(x), layer(x)) and torch.equal(clone.mask, layer.mask)
    as_double = copy.deepcopy(layer).double()
    assert as_double.weight.dtype == torch.float64 and as_double.mask.dtype == torch.bool
    assert rel_error(as_double(x.double()), layer(x)) < TOLERANCE[torch.float32]
