"""gpunn.convert(model): nn.Linear / RNNCell / RNN replaced by gpunn twins holding the same parameters,
Linear + activation fused in Sequentials, outputs unchanged."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, count_launches

import gpunn


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(approximate="tanh"),
                                           torch.nn.Linear(16, 16), torch.nn.LeakyReLU(0.2),
                                           torch.nn.Dropout(0.0), torch.nn.Linear(16, 8))
        self.rnn = torch.nn.RNN(8, 12, 2, bidirectional=True, batch_first=True)
        self.cell = torch.nn.RNNCell(24, 5, nonlinearity="relu")
        self.head = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Sigmoid()))

    def forward(self, x):
        h, _ = self.rnn(self.encoder(x))
        return self.head(self.cell(h[:, -1]))


def test_nested_model_converts_with_outputs_unchanged(device):
    torch.manual_seed(0)
    model = Net().to(device=device, dtype=torch.float64)
    converted = gpunn.convert(model)
    assert converted is not model and type(model.encoder[0]) is torch.nn.Linear  # the original is untouched
    encoder = converted.encoder
    assert isinstance(encoder[0], gpunn.Linear) and encoder[0].activation == "gelu_tanh"
    assert encoder[2].activation == "leaky_relu" and encoder[2].negative_slope == 0.2
    assert isinstance(encoder[1], torch.nn.Identity) and isinstance(encoder[4], torch.nn.Dropout)
    assert isinstance(encoder[5], gpunn.Linear) and encoder[5].activation is None
    assert isinstance(converted.rnn, gpunn.RNN) and isinstance(converted.cell, gpunn.RNNCell)
    assert converted.head[0][0].activation == "sigmoid"
    assert converted.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(4, 7, 6, device=device, dtype=torch.float64)
    with count_launches() as launches:
        out = converted(x)
    assert "dense_forward_kernel" in launches and "rnn_sequence_forward_kernel" in launches
    assert_close(out, model(x), torch.float64, "output")


def test_inplace_keeps_the_parameter_tensors(device):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).to(device)
    model.eval()
    params = list(model.parameters())
    converted = gpunn.convert(model, inplace=True)
    assert converted is model and isinstance(model[0], gpunn.Linear)
    assert not any(module.training for module in model.modules())  # the new Identity included
    assert all(a is b for a, b in zip(params, model.parameters()))


def test_fuse_false_keeps_every_modules_output(device):
    # Fused, the Linear's own output is its activation's (a slice dropping the final Sigmoid gives
    # probabilities, not logits); without fusing, every module computes what it did.
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2),
                                torch.nn.Sigmoid()).to(device=device, dtype=torch.float64)
    x = torch.randn(4, 6, device=device, dtype=torch.float64)
    fused, unfused = gpunn.convert(model), gpunn.convert(model, fuse=False)
    assert [type(m) for m in unfused] == [gpunn.Linear, torch.nn.ReLU, gpunn.Linear, torch.nn.Sigmoid]
    assert unfused[0].activation is None and unfused[2].activation is None
    for converted in (fused, unfused):
        assert_close(converted(x), model(x), torch.float64, "output")
    assert_close(unfused[:-1](x), model[:-1](x), torch.float64, "logits")
    assert_close(fused[:-1](x), model(x), torch.float64, "the fused Linear's activated output")


class Branches(torch.nn.Sequential):
    """A Sequential that does not chain: every child sees the input."""

    def forward(self, x):
        return torch.cat([module(x) for module in self], -1)


class Chain(torch.nn.Sequential):
    """A Sequential subclass that keeps Sequential's forward."""


def test_fuses_only_where_the_sequential_chains(device):
    torch.manual_seed(2)
    model = torch.nn.Sequential(Branches(torch.nn.Linear(4, 4), torch.nn.ReLU()),
                                Chain(torch.nn.Linear(8, 3), torch.nn.Tanh())).to(device=device, dtype=torch.float64)
    converted = gpunn.convert(model)
    assert [type(m) for m in converted[0]] == [gpunn.Linear, torch.nn.ReLU] and converted[0][0].activation is None
    assert [type(m) for m in converted[1]] == [gpunn.Linear, torch.nn.Identity]
    assert converted[1][0].activation == "tanh"
    x = torch.randn(5, 4, device=device, dtype=torch.float64)
    assert_close(converted(x), model(x), torch.float64, "output")


def test_a_single_layer_and_the_module_functions():
    linear = torch.nn.Linear(3, 2)
    assert isinstance(gpunn.convert(linear), gpunn.Linear)
    assert callable(gpunn.convert) and callable(gpunn.convert.masked_from_local)
    from gpunn.convert import masked_from_local  # importing the module keeps gpunn.convert callable
    assert masked_from_local is gpunn.convert.masked_from_local and callable(gpunn.convert)


@pytest.mark.parametrize("inplace", [False, True])
def test_gpunn_layers_and_other_modules_are_left_alone(inplace):
    model = torch.nn.Sequential(gpunn.Linear(3, 3, activation="relu"), torch.nn.ReLU(), torch.nn.Conv1d(1, 1, 1))
    converted = gpunn.convert(model, inplace=inplace)
    assert isinstance(converted[1], torch.nn.ReLU) and isinstance(converted[2], torch.nn.Conv1d)


def test_layers_it_cannot_reproduce_stay_torch_layers():
    """A pruned Linear (a pre-hook rebuilding the weight from weight_orig and a mask buffer), one with a
    user hook or buffer, and an activation with a hook stay torch modules; the model's output is unchanged."""
    import torch.nn.utils.prune

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.GELU())
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", 0.5)
    model[3].register_forward_hook(lambda module, args, output: output * 2)
    model[4].register_buffer("scale", torch.ones(3))
    x = torch.randn(5, 4)
    expected = model(x)
    converted = gpunn.convert(model, inplace=True)
    kinds = [type(m) for m in converted]
    assert kinds == [torch.nn.Linear, torch.nn.Tanh, gpunn.Linear, torch.nn.ReLU, torch.nn.Linear, gpunn.Linear,
                     torch.nn.Identity]
    assert converted[2].activation is None and converted[5].activation == "gelu"
    assert_close(converted(x), expected, torch.float32, "output")
    # A child module or a state-dict hook would be lost on a twin too.
    with_child, with_hook = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with_child.extra = torch.nn.Linear(4, 2)
    with_hook.register_load_state_dict_post_hook(lambda module, keys: None)
    keys = torch.nn.Sequential(with_child, with_hook).state_dict().keys()
    converted = gpunn.convert(torch.nn.Sequential(with_child, with_hook))
    assert [type(m) for m in converted] == [torch.nn.Linear, torch.nn.Linear]
    assert converted.state_dict().keys() == keys
    # gpunn's layers refuse complex parameters: a complex layer stays torch's and the model still runs.
    complex_model = torch.nn.Sequential(torch.nn.Linear(4, 3, dtype=torch.complex64), torch.nn.Tanh())
    x = torch.randn(2, 4, dtype=torch.complex64)
    converted = gpunn.convert(complex_model)
    assert [type(m) for m in converted] == [torch.nn.Linear, torch.nn.Tanh]
    assert torch.equal(converted(x), complex_model(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_attributes_set_on_a_layer_go_to_its_twin(inplace):
    """A tag set on a layer is on its twin; a layer whose attribute the twin would shadow, that shadows its
    class (a forward set on the instance) or has a private one (module.compile()), and an activation module
    with a tag, stay as they were."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.RNNCell(4, 3))
    model[0].tag, model[0].scale = "first", torch.ones(2)
    model[2].activation = "mine"  # gpunn.Linear's own attribute
    model[3].tag = "tanh"  # fusing would drop the activation module
    model[4].forward = lambda x: x  # shadows the class's forward
    model[7].tag = "cell"
    model[5].compile(backend="eager")  # a compiled forward of the torch layer (a deep copy drops it, as torch's do)
    x = torch.randn(3, 4)
    expected = model(x)
    converted = gpunn.convert(model, inplace=inplace)
    kinds = [type(m) for m in converted]
    compiled = [torch.nn.Linear, torch.nn.GELU] if inplace else [gpunn.Linear, torch.nn.Identity]
    assert kinds == [gpunn.Linear, torch.nn.Identity, torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear, *compiled,
                     gpunn.RNNCell]
    assert converted[0].tag == "first" and torch.equal(converted[0].scale, torch.ones(2))
    assert converted[0].activation == "relu" and converted[2].activation == "mine" and converted[3].tag == "tanh"
    assert converted[7].tag == "cell"
    assert_close(converted(x), expected, torch.float32, "output")


def test_a_module_registered_twice_becomes_one_twin():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Linear(3, 3)
            self.second = self.first  # the same layer applied twice

        def forward(self, x):
            return self.second(torch.tanh(self.first(x)))

    model = Tied()
    x = torch.randn(4, 3)
    expected = model(x)
    converted = gpunn.convert(model)
    assert isinstance(converted.first, gpunn.Linear) and converted.first is converted.second
    assert_close(converted(x), expected, torch.float32, "output")


@pytest.mark.parametrize("built, set_after", [("tanh", "relu"), ("relu", "tanh"), ("tanh", "gelu")])
def test_an_rnn_converts_to_the_activation_it_runs(device, built, set_after):
    """torch's RNN runs the activation of its mode, fixed at construction: a `nonlinearity` set since changes
    neither torch's output nor its twin's (the twin had been built from the attribute: another activation,
    or an error for one gpunn has no RNN of)."""
    torch.manual_seed(2)
    model = torch.nn.RNN(5, 4, nonlinearity=built).to(device=device, dtype=torch.float64)
    model.nonlinearity = set_after
    converted = gpunn.convert(model)
    assert converted.mode == model.mode and converted.nonlinearity == set_after
    x = torch.randn(3, 2, 5, device=device, dtype=torch.float64)
    with count_launches() as launches:
        out, h_n = converted(x)
    assert "rnn_sequence_forward_kernel" in launches or "rnn_split_forward_kernel" in launches
    expected, expected_h_n = model(x)
    assert_close(out, expected, torch.float64, "output")
    assert_close(h_n, expected_h_n, torch.float64, "h_n")


def test_activations_it_cannot_fuse_stay_as_they_are():
    """An activation module with a parameter of its own (fused away, it would leave the state_dict), a GELU
    whose approximate torch refuses and a LeakyReLU whose slope is not a real number (a 0-d tensor, which
    torch runs) are not fused; the model converts, its state_dict keys and its output (or error) unchanged."""
    torch.manual_seed(2)
    with_parameter = torch.nn.ReLU()
    with_parameter.register_parameter("scale", torch.nn.Parameter(torch.tensor(2.0)))
    tensor_slope = torch.nn.LeakyReLU(torch.tensor(0.3))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), with_parameter, torch.nn.Linear(4, 4), tensor_slope,
                                torch.nn.Linear(4, 3))
    x = torch.randn(5, 4)
    converted = gpunn.convert(model)
    assert [type(m) for m in converted] == [gpunn.Linear, torch.nn.ReLU, gpunn.Linear, torch.nn.LeakyReLU,
                                            gpunn.Linear]
    assert converted[0].activation is None and converted[2].activation is None
    assert list(converted.state_dict()) == list(model.state_dict())
    assert_close(converted(x), model(x), torch.float32, "output")
    gelu = torch.nn.GELU()
    gelu.approximate = "Tanh"
    bad = gpunn.convert(torch.nn.Sequential(torch.nn.Linear(4, 4), gelu))
    assert type(bad[1]) is torch.nn.GELU
    with pytest.raises(RuntimeError, match="approximate"):
        bad(x)


def test_parameters_keep_the_layers_order():
    # prune.remove registers the weight again, after the bias: the twin lists them in that order too, as
    # parameters() and state_dict() order an optimizer's saved state (its buffers would go to the other tensor).
    import torch.nn.utils.prune

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", 0.5)
    torch.nn.utils.prune.remove(model[0], "weight")
    rnn = torch.nn.RNN(3, 4)
    weight = rnn.weight_hh_l0
    del rnn.weight_hh_l0
    rnn.weight_hh_l0 = weight
    for torch_model in (model, rnn):
        names = [name for name, _ in torch_model.named_parameters()]
        assert names != sorted(names, key=lambda name: "weight" not in name)  # re-registered out of order
        converted = gpunn.convert(torch_model)
        assert [name for name, _ in converted.named_parameters()] == names
        assert list(converted.state_dict()) == list(torch_model.state_dict())
