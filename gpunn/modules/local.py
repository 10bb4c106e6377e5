"""gpunn.LocallyConnected2d / LocallyConnected1d: convolutions whose every output position has its own
filter (unshared weights)."""
from __future__ import annotations

import math

import torch

from .. import arguments, functional


class LocallyConnected2d(torch.nn.Module):
    """y[n, o, i, j] = bias[o, i, j] + sum_{c,di,dj} weight[o, i, j, c, di, dj] x[n, c, i*s - p + di*d, j*s - p + dj*d].

    Like nn.Conv2d, but each of the OH x OW output positions has its own (out_channels x in_channels x KH x
    KW) filter. Zero padding as in F.unfold; the patches are gathered inside the Triton kernels.

    Args:
        in_channels, out_channels: C and O.
        input_size: (H, W) of the inputs (the weights depend on the number of positions).
        kernel_size, stride, padding, dilation: an int or a pair, as nn.Conv2d (zero padding only; padding
            "valid", or "same" at stride 1, padding the far side one more where nn.Conv2d does).
        bias, device, dtype: as nn.Conv2d.

    Parameters:
        weight (O, OH, OW, C, KH, KW); bias (O, OH, OW). Both are initialised as nn.Conv2d's are, with its
        fan-in C * KH * KW: uniform in +-1/sqrt(C * KH * KW).

    Shape:
        input (N, C, H, W) or (C, H, W) -> output (N, O, OH, OW) or (O, OH, OW),
        OH = (H + 2p - d(KH - 1) - 1) // s + 1 (OW alike).
    """

    def __init__(self, in_channels: int, out_channels: int, input_size, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        in_channels = arguments.positive_int(in_channels, "in_channels")
        out_channels = arguments.positive_int(out_channels, "out_channels")
        geometry = _geometry(kernel_size, stride, padding, dilation)
        height, width = arguments.as_pair(input_size, "input_size")
        if min(height, width) < 1:
            raise ValueError(f"input_size must be positive, got {(height, width)}")
        oh, ow = geometry.output_size(height, width)
        if min(oh, ow) < 1:
            raise ValueError(f"kernel {geometry.kh}x{geometry.kw} (dilation {geometry.dh}x{geometry.dw}) does "
                             f"not fit the padded {height}x{width} input")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.input_size, self.output_size = (height, width), (oh, ow)
        self.kernel_size, self.stride = (geometry.kh, geometry.kw), (geometry.sh, geometry.sw)
        # A padding string is kept as given, as nn.Conv2d keeps it.
        self.padding = padding if isinstance(padding, str) else (geometry.ph, geometry.pw)
        self.dilation = (geometry.dh, geometry.dw)
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty((out_channels, oh, ow, in_channels, *self.kernel_size),
                                                     **factory))
        self.register_parameter("bias", torch.nn.Parameter(torch.empty((out_channels, oh, ow), **factory))
                                if bias else None)
        self.reset_parameters()

    @property
    def padding_pair(self) -> tuple[int, int]:
        """The zero padding (height, width) before the first row and column, a padding string resolved
        ("same" pads one more after the last where dilation x (kernel - 1) is odd, as nn.Conv2d does)."""
        geometry = functional.local_geometry(self.kernel_size, self.stride, self.padding, self.dilation)
        return geometry.ph, geometry.pw

    def reset_parameters(self) -> None:
        """nn.Conv2d's init: kaiming_uniform(a=sqrt(5)) and the bias alike, i.e. uniform in +-1/sqrt(fan_in)."""
        _uniform_init(self, self.in_channels * self.kernel_size[0] * self.kernel_size[1])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(input) and input.dim() in (3, 4) and tuple(input.shape[-2:]) != self.input_size:
            # The functional form accepts any size giving the same positions; the layer's weights are for one.
            raise RuntimeError(f"{type(self).__name__} was built for inputs of {self.input_size[0]}x"
                               f"{self.input_size[1]}, got input of shape {tuple(input.shape)}")
        return functional.locally_connected2d(input, self.weight, self.bias, self.stride, self.padding,
                                              self.dilation)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        return text + ("" if self.bias is not None else ", bias=False")


class LocallyConnected1d(torch.nn.Module):
    """The 1-D locally connected layer: each of the OL output positions has its own (O x C x K) filter.

    Args:
        in_channels, out_channels: C and O.
        input_length: L.
        kernel_size, stride, padding, dilation: ints (or 1-tuples), as nn.Conv1d (zero padding only; padding
            "valid", or "same" at stride 1, padding the far side one more where nn.Conv1d does).
        bias, device, dtype: as nn.Conv1d.

    Parameters:
        weight (O, OL, C, K); bias (O, OL); uniform in +-1/sqrt(C * K), as nn.Conv1d's init.

    Shape:
        input (N, C, L) or (C, L) -> output (N, O, OL) or (O, OL), OL = (L + 2p - d(K - 1) - 1) // s + 1.
    """

    def __init__(self, in_channels: int, out_channels: int, input_length: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        kernel_size, stride, dilation = (arguments.as_single(v, n) for v, n in (
            (kernel_size, "kernel_size"), (stride, "stride"), (dilation, "dilation")))
        padding = padding if isinstance(padding, str) else arguments.as_single(padding, "padding")
        padding_2d = padding if isinstance(padding, str) else (0, padding)
        line = _geometry((1, kernel_size), (1, stride), padding_2d, (1, dilation), dims=1)  # errors in 1-D terms
        input_length = arguments.positive_int(input_length, "input_length")
        if line.output_size(1, input_length)[1] < 1:
            raise ValueError(f"kernel {kernel_size} (dilation {dilation}) does not fit the padded input of length "
                             f"{input_length}")
        # The 2-D layer over a height of 1 computes the geometry; its parameters are viewed.
        plane = LocallyConnected2d(in_channels, out_channels, (1, input_length), (1, kernel_size), (1, stride),
                                   padding_2d, (1, dilation), bias, device, dtype)
        self.in_channels, self.out_channels, self.input_length = plane.in_channels, plane.out_channels, input_length
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.output_length = plane.output_size[1]
        o, ol = out_channels, self.output_length
        self.weight = torch.nn.Parameter(plane.weight.detach().reshape(o, ol, in_channels, kernel_size))
        self.register_parameter("bias", torch.nn.Parameter(plane.bias.detach().reshape(o, ol)) if bias else None)

    def reset_parameters(self) -> None:
        """nn.Conv1d's init: uniform in +-1/sqrt(C * K)."""
        _uniform_init(self, self.in_channels * self.kernel_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(input) and input.dim() in (2, 3) and input.shape[-1] != self.input_length:
            raise RuntimeError(f"LocallyConnected1d was built for inputs of length {self.input_length}, got input "
                               f"of shape {tuple(input.shape)}")
        return functional.locally_connected1d(input, self.weight, self.bias, self.stride, self.padding,
                                              self.dilation)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, input_length={self.input_length}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}")
        if self.padding:
            text += f", padding={self.padding}"
        if self.dilation != 1:
            text += f", dilation={self.dilation}"
        return text + ("" if self.bias is not None else ", bias=False")


def _geometry(kernel_size, stride, padding, dilation, dims: int = 2):
    """functional.local_geometry, with a constructor's ValueError for what the functional form raises as
    RuntimeError (as nn.Conv2d and F.conv2d differ)."""
    try:
        return functional.local_geometry(kernel_size, stride, padding, dilation, dims)
    except RuntimeError as error:
        raise ValueError(str(error)) from None


__all__ = ["LocallyConnected1d", "LocallyConnected2d"]


def _uniform_init(layer: torch.nn.Module, fan_in: int) -> None:
    """The weight and bias uniform in +-1/sqrt(fan_in), as torch's convolutions initialise theirs."""
    bound = 1 / math.sqrt(fan_in)
    torch.nn.init.uniform_(layer.weight, -bound, bound)
    if layer.bias is not None:
        torch.nn.init.uniform_(layer.bias, -bound, bound)
