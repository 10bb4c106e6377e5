"""Conversions to gpunn layers.

gpunn.convert(model) (this module is callable) returns the model with its torch.nn.Linear, RNNCell and RNN
layers replaced by their gpunn twins, holding the same parameters, and (unless fuse=False) each nn.Linear
that an activation module directly follows in an nn.Sequential fused with it into one gpunn.Linear.

masked_from_local / local_from_masked: a LocallyConnected2d and the MaskedLinear with a local_2d mask
compute the same function: the masked layer reads the input flattened, x.flatten(1) of shape
(N, C * H * W), and its output (N, O * OH * OW) is the locally connected output flattened. Weights of taps
that fall in the zero padding have no place in the masked layer (they multiply zeros): converting to it
drops them, and converting back gives them zero.
"""
from __future__ import annotations

import copy
import functools
import numbers
import sys
import types

import torch

from . import arguments, masks
from .modules import RNN, Linear, LocallyConnected2d, MaskedLinear, RNNCell
from .modules.rnn import nonlinearity_of

# Activation modules gpunn.Linear can fuse: (its activation name, negative slope) for a module, or None for
# one it cannot (an approximate torch's GELU refuses, a slope that is not a real number: a 0-d tensor, a bool),
# which stays as it is.
_GELUS = {"none": "gelu", "tanh": "gelu_tanh"}
_FUSABLE = {
    torch.nn.ReLU: lambda m: ("relu", 0.01),
    torch.nn.Tanh: lambda m: ("tanh", 0.01),
    torch.nn.Sigmoid: lambda m: ("sigmoid", 0.01),
    torch.nn.SiLU: lambda m: ("silu", 0.01),
    torch.nn.GELU: lambda m: (_GELUS[m.approximate], 0.01) if m.approximate in _GELUS else None,
    torch.nn.LeakyReLU: lambda m: (("leaky_relu", m.negative_slope) if isinstance(m.negative_slope, numbers.Real)
                                   and not isinstance(m.negative_slope, bool) else None),
}


# The torch layers convert replaces, each with its gpunn twin's type.
_TWINS = {torch.nn.Linear: Linear, torch.nn.RNNCell: RNNCell, torch.nn.RNN: RNN}
_CONVERTIBLE = tuple(_TWINS)


@functools.cache
def _constructed(kind: type) -> frozenset:
    """The instance attributes a module of this torch type (or gpunn twin type) has once constructed."""
    args = () if kind in _FUSABLE else (1, 1)
    return frozenset(vars(kind(*args, device="meta") if args else kind()))


def _set_on_instance(module: torch.nn.Module) -> dict:
    """What was set on module beyond what its type's constructor sets: a user's tag, say."""
    return {name: value for name, value in vars(module).items() if name not in _constructed(type(module))}


def _attributes_carry(module: torch.nn.Module) -> bool:
    """Whether module's own attributes can go to its twin: none for an activation module (fused away, it
    becomes an nn.Identity); none of a layer's names a twin has (gpunn.Linear's activation) or its class
    defines (a forward set on the instance would run in place of the twin's), and no private name (torch's
    state for the module itself, as module.compile() leaves a compiled forward of the torch layer)."""
    extra = _set_on_instance(module)
    if type(module) in _FUSABLE:
        return not extra
    twin = _TWINS[type(module)]
    return not any(name.startswith("_") or name in _constructed(twin) or hasattr(twin, name) for name in extra)


def _adopt(twin: torch.nn.Module, module: torch.nn.Module) -> torch.nn.Module:
    """twin (built on the meta device) takes module's own parameters and training mode (the same tensors,
    so optimizers and hooks on them still apply), in module's order (parameters() and state_dict() order what
    an optimizer's saved state is matched by: a weight registered again after the bias, as prune.remove
    does, comes after it on the twin too), and the attributes set on it beyond its constructor's."""
    for name, parameter in module.named_parameters(recurse=False):
        setattr(twin, name, parameter)
    order = [*module._parameters, *(name for name in twin._parameters if name not in module._parameters)]
    reordered = {name: twin._parameters[name] for name in order}
    twin._parameters.clear()
    twin._parameters.update(reordered)
    for name, value in _set_on_instance(module).items():
        setattr(twin, name, value)
    return twin.train(module.training)


def _twin(module: torch.nn.Module, activation: tuple[str, float] | None = None) -> torch.nn.Module:
    """The gpunn layer computing what module computes (followed by activation, for a Linear)."""
    if type(module) is torch.nn.Linear:
        name, slope = activation or (None, 0.01)
        twin = Linear(module.in_features, module.out_features, module.bias is not None, device="meta",
                      activation=name, negative_slope=slope)
    elif type(module) is torch.nn.RNNCell:
        twin = RNNCell(module.input_size, module.hidden_size, module.bias, module.nonlinearity, device="meta")
    else:
        # The twin runs the activation torch's runs, and keeps the `nonlinearity` attribute as it was.
        twin = RNN(module.input_size, module.hidden_size, module.num_layers, nonlinearity_of(module), module.bias,
                   module.batch_first, module.dropout, module.bidirectional, device="meta")
        twin.nonlinearity = module.nonlinearity
    return _adopt(twin, module)


def _parameter_names(module: torch.nn.Module) -> set[str]:
    """The parameters a layer of module's type and configuration registers."""
    if type(module) is torch.nn.Linear:
        return {"weight", "bias"} if module.bias is not None else {"weight"}
    if type(module) is torch.nn.RNNCell:
        return {"weight_ih", "weight_hh", "bias_ih", "bias_hh"} if module.bias else {"weight_ih", "weight_hh"}
    return set(module._flat_weights_names)


def _plain(module: torch.nn.Module, types) -> bool:
    """Whether module is exactly one of types and nothing more: no hooks (module or state-dict), no buffers, no
    child modules, its type's own parameters (an activation module: none), real floating point, and
    attributes of its own that its twin can carry (_attributes_carry). Old-style prune, weight_norm and
    spectral_norm (a forward pre-hook that rebuilds the weight from renamed parameters and buffers), user
    hooks, buffers or children would be lost on a twin, and gpunn's layers refuse complex parameters: such a
    module is left as it is."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks,
             module._state_dict_hooks, module._state_dict_pre_hooks, module._load_state_dict_pre_hooks,
             module._load_state_dict_post_hooks)
    return (type(module) in types and not any(hooks) and next(module.buffers(recurse=False), None) is None
            and next(module.children(), None) is None
            and {name for name, _ in module.named_parameters(recurse=False)} == (
                _parameter_names(module) if type(module) in _CONVERTIBLE else set())
            and all(parameter.is_floating_point() for parameter in module.parameters(recurse=False))
            and _attributes_carry(module))


def _chains(parent: torch.nn.Module) -> bool:
    """Whether parent feeds each child's output to the next: an nn.Sequential whose forward is nn.Sequential's
    (a subclass with a forward of its own may use its children otherwise, as branches)."""
    return (isinstance(parent, torch.nn.Sequential) and type(parent).forward is torch.nn.Sequential.forward
            and "forward" not in vars(parent))


def _convert_children(parent: torch.nn.Module, twins: dict, fuse: bool) -> None:
    """Replace parent's convertible children, recursively. twins: (the module, the activation module fused
    with it or None) -> its twin, so that a module registered in two places gets one twin."""
    # Every registered name, a module registered twice included (named_children lists it once).
    children = [(name, child) for name, child in parent._modules.items() if child is not None]
    skip = False
    for index, (name, child) in enumerate(children):
        if skip:
            skip = False
            continue
        following = children[index + 1][1] if index + 1 < len(children) else None
        activation = (_FUSABLE[type(following)](following) if fuse and _chains(parent) and following is not None
                      and _plain(following, _FUSABLE) else None)
        if activation is not None and _plain(child, (torch.nn.Linear,)):
            if (child, following) not in twins:
                twins[child, following] = _twin(child, activation)
            setattr(parent, name, twins[child, following])
            # An Identity keeps the Sequential's indices (and its training mode, as model.training reads it).
            setattr(parent, children[index + 1][0], torch.nn.Identity().train(following.training))
            skip = True
        elif _plain(child, _CONVERTIBLE):
            if (child, None) not in twins:
                twins[child, None] = _twin(child)
            setattr(parent, name, twins[child, None])
        else:
            _convert_children(child, twins, fuse)


def convert(module: torch.nn.Module, inplace: bool = False, fuse: bool = True) -> torch.nn.Module:
    """module with its torch.nn.Linear, RNNCell and RNN layers (exactly those types) replaced by gpunn.Linear,
    RNNCell and RNN holding the same parameters, and each nn.Linear directly followed, in an nn.Sequential
    (one that keeps nn.Sequential's forward: a subclass with its own may not chain its children), by an
    nn.ReLU, GELU, Tanh, Sigmoid, SiLU or LeakyReLU fused with it (the activation module becomes an
    nn.Identity, so indices and state_dict keys do not change). The model's outputs are unchanged, but a
    fused Linear's own output is then its activation's: the Linear alone (model[i]), a slice that drops the
    activation and a hook on the Linear see activated values. fuse=False converts without fusing, keeping
    every module's output as it was.

    inplace=False (default) converts a deep copy; inplace=True converts module itself, and the converted
    layers keep its very parameter tensors. A module registered under two names becomes one twin under both
    (fused with two different activation modules, one twin per fusion, sharing its parameters). A layer
    carrying hooks, buffers, child modules, or parameters other than its own (old-style prune, weight_norm,
    spectral_norm) stays a torch layer, and an activation module with hooks or parameters, or settings gpunn
    does not run (a GELU approximate torch refuses, a LeakyReLU slope that is not a real number), is not
    fused. Parameters keep each layer's order. A module that is itself a convertible layer comes back as
    its twin (sharing its parameters); inplace=True cannot turn the object passed in into it. Attributes set on
    a layer (layer.tag = ...) go to its twin, unless the twin uses the name (gpunn.Linear's activation), its
    class defines it (a forward set on the instance) or it is private (module.compile()'s compiled forward):
    such a layer stays a torch layer, as an activation module with attributes of its own stays unfused.
    """
    root = module if inplace else copy.deepcopy(module)
    if _plain(root, _CONVERTIBLE):
        return _twin(root)
    _convert_children(root, {}, fuse)
    return root


def _positions(layer: LocallyConnected2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every element of layer.weight (O, OH, OW, C, KH, KW): its (row, column) in the masked layer's
    weight (O*OH*OW, C*H*W), and whether its tap lies inside the image."""
    o, oh, ow, c, kh, kw = layer.weight.shape
    (h, w), (sh, sw), (ph, pw), (dh, dw) = layer.input_size, layer.stride, layer.padding_pair, layer.dilation
    device = layer.weight.device
    ar = lambda size: torch.arange(size, device=device)  # noqa: E731
    # Broadcast over (O, OH, OW, C, KH, KW).
    oo, ii, jj = ar(o).view(-1, 1, 1, 1, 1, 1), ar(oh).view(1, -1, 1, 1, 1, 1), ar(ow).view(1, 1, -1, 1, 1, 1)
    cc, di, dj = ar(c).view(1, 1, 1, -1, 1, 1), ar(kh).view(1, 1, 1, 1, -1, 1), ar(kw).view(1, 1, 1, 1, 1, -1)
    rows_in, cols_in = ii * sh - ph + di * dh, jj * sw - pw + dj * dw
    inside = ((rows_in >= 0) & (rows_in < h) & (cols_in >= 0) & (cols_in < w)).expand(layer.weight.shape)
    row = ((oo * oh + ii) * ow + jj).expand(layer.weight.shape)
    column = ((cc * h + rows_in) * w + cols_in).expand(layer.weight.shape)
    return row, column, inside


def masked_from_local(layer: LocallyConnected2d) -> MaskedLinear:
    """The MaskedLinear(C*H*W, O*OH*OW, local_2d mask) computing what `layer` computes, on the flattened
    input; same device, dtype and weights (those of taps in the padding dropped), no activation."""
    if not isinstance(layer, LocallyConnected2d):
        raise TypeError(f"masked_from_local takes a gpunn.LocallyConnected2d, got {type(layer).__name__} (a "
                        f"LocallyConnected1d is the 2-D layer over a height of 1: build that one to convert)")
    c, (h, w) = layer.in_channels, layer.input_size
    mask = masks.local_2d((c, h, w), layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                          layer.out_channels)
    weight = layer.weight.detach()
    masked = MaskedLinear(c * h * w, mask.shape[0], mask.to(weight.device), bias=layer.bias is not None,
                          device=weight.device, dtype=weight.dtype)
    row, column, inside = _positions(layer)
    with torch.no_grad():
        masked.weight.zero_()
        masked.weight[row[inside], column[inside]] = weight[inside]
        if layer.bias is not None:
            masked.bias.copy_(layer.bias.reshape(-1))
    return masked


def local_from_masked(layer: MaskedLinear, in_channels: int, input_size, kernel_size, stride=1, padding=0,
                      dilation=1) -> LocallyConnected2d:
    """The LocallyConnected2d with this geometry computing what `layer` computes; layer's mask must be
    masks.local_2d of that geometry (ValueError otherwise, as for a geometry LocallyConnected2d refuses).
    Weights of taps in the padding are zero."""
    if not isinstance(layer, MaskedLinear):
        raise TypeError(f"local_from_masked takes a gpunn.MaskedLinear, got {type(layer).__name__}")
    if layer.activation is not None:
        raise ValueError(f"the MaskedLinear fuses the activation {layer.activation!r}, which a LocallyConnected2d "
                         f"does not have")
    in_channels = arguments.positive_int(in_channels, "in_channels")
    height, width = arguments.as_pair(input_size, "input_size")
    if layer.in_features != in_channels * height * width:
        raise ValueError(f"a MaskedLinear with {layer.in_features} inputs does not read {in_channels} channels of "
                         f"{height}x{width}")
    probe = masks.local_2d((in_channels, height, width), kernel_size, stride, padding, dilation)
    if layer.out_features % probe.shape[0]:
        raise ValueError(f"a MaskedLinear with {layer.out_features} outputs does not fit {probe.shape[0]} output "
                         f"positions per channel")
    out_channels = layer.out_features // probe.shape[0]
    expected = probe.repeat(out_channels, 1).to(layer.mask.device)
    if not torch.equal(layer.mask, expected):
        raise ValueError("the MaskedLinear's mask is not masks.local_2d of this geometry")
    weight = layer.weight.detach()
    local = LocallyConnected2d(in_channels, out_channels, (height, width), kernel_size, stride, padding, dilation,
                               bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
    row, column, inside = _positions(local)
    with torch.no_grad():
        local.weight.zero_()
        local.weight[inside] = weight[row[inside], column[inside]]
        if layer.bias is not None:
            local.bias.copy_(layer.bias.reshape(local.bias.shape))
    return local


class _CallableModule(types.ModuleType):
    """Lets `gpunn.convert(model)` call convert() while gpunn.convert stays this module (its other
    functions remain gpunn.convert.masked_from_local and so on, however it was imported)."""

    __call__ = staticmethod(convert)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["convert", "local_from_masked", "masked_from_local"]
