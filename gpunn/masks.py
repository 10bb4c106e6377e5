"""Connectivity masks for locally connected layers: bool tensors of shape (out_features, in_features),
True where output neuron j reads input i (the layout of a torch.nn.Linear weight); and the block layouts
the masked kernels walk."""
from __future__ import annotations

import torch

from .arguments import SUPPORTED_DTYPES, as_pair, is_int, non_negative_int, padding_sides, positive_int
from .kernels.layout import DEFAULT_BLOCKS, BlockLayout, check_block, layout_for
from .kernels.local import Geometry


def local_1d(in_features: int, out_features: int, window: int) -> torch.Tensor:
    """Each output neuron reads `window` consecutive inputs around its position.

    Output j is centred as near as possible on input position (j + 0.5) * in_features / out_features
    and shifted inward at the borders, so every output has exactly min(window, in_features) inputs.

    Returns:
        bool (out_features, in_features).
    """
    in_features, out_features = non_negative_int(in_features, "in_features"), non_negative_int(out_features,
                                                                                               "out_features")
    width = min(positive_int(window, "window"), in_features)
    centre = (torch.arange(out_features, dtype=torch.float64) + 0.5) * in_features / max(out_features, 1)
    # The window [start, start + width) has its centre at start + width / 2 (input i spans [i, i + 1)).
    start = torch.floor(centre - width / 2 + 0.5).long().clamp(0, in_features - width)
    columns = torch.arange(in_features)
    return (columns >= start[:, None]) & (columns < start[:, None] + width)


def local_2d(in_shape, kernel_size, stride=1, padding=0, dilation=1, out_channels: int = 1) -> torch.Tensor:
    """The connectivity of a k x k neighbourhood over an image, as LocallyConnected2d and F.unfold see it.

    in_shape is (C, H, W), or (H, W) for one channel, flattened in torch's C-major order. Outputs are
    (out_channels, oh, ow) flattened likewise, oh = (H + 2p - d(k - 1) - 1) // s + 1 (ow alike). Output
    (o, i, j) reads every input (c, i*s - p + di*d, j*s - p + dj*d), 0 <= di, dj < k, that lies inside the
    image; taps in the padding read nothing. kernel_size=3 is the nine-neuron neighbourhood. padding may
    also be "valid" (0) or "same" (stride 1; oh = H, p the top's padding, as nn.Conv2d pads: the bottom one
    more where d(k - 1) is odd).

    Returns:
        bool (out_channels * oh * ow, C * H * W).
    """
    shape = tuple(in_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or not all(is_int(size) and size >= 1 for size in shape):
        raise ValueError(f"in_shape must be (C, H, W) or (H, W) of positive ints, got {tuple(in_shape)}")
    channels, height, width = shape
    (kh, kw), (sh, sw) = as_pair(kernel_size, "kernel_size"), as_pair(stride, "stride")
    (dh, dw) = as_pair(dilation, "dilation")
    (ph, pw), (ph_end, pw_end) = padding_sides(padding, (kh, kw), (sh, sw), (dh, dw))
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("kernel_size, stride and dilation must be positive and padding non-negative")
    out_channels = positive_int(out_channels, "out_channels")
    oh, ow = Geometry((kh, kw), (sh, sw), (ph, pw), (dh, dw), (ph_end, pw_end)).output_size(height, width)
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel of {kh}x{kw} (dilation {dh}x{dw}) does not fit the padded "
                         f"{height}x{width} image")
    rows = torch.arange(oh)[:, None, None, None] * sh - ph + torch.arange(kh)[None, None, :, None] * dh
    cols = torch.arange(ow)[None, :, None, None] * sw - pw + torch.arange(kw)[None, None, None, :] * dw
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)  # (oh, ow, kh, kw)
    pixel = (rows * width + cols).masked_fill(~inside, height * width)  # taps off the image -> a spare column
    spatial = torch.zeros(oh * ow, height * width + 1, dtype=torch.bool)
    spatial.scatter_(1, pixel.reshape(oh * ow, kh * kw), True)
    spatial = spatial[:, :-1]  # (oh*ow, H*W)
    return spatial.repeat(out_channels, channels)


def random(in_features: int, out_features: int, density: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Each connection present independently with probability `density`.

    Returns:
        bool (out_features, in_features).
    """
    in_features, out_features = non_negative_int(in_features, "in_features"), non_negative_int(out_features,
                                                                                               "out_features")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return torch.rand(out_features, in_features, generator=generator) < density



def block_layout(mask: torch.Tensor, dtype: torch.dtype = torch.float32,
                 block: tuple[int, int] | None = None) -> BlockLayout:
    """The block-sparse layout gpunn's masked kernels use for `mask`, built on mask's device.

    Args:
        mask: bool (out_features, in_features).
        dtype: the weight dtype the layout will serve (float16, bfloat16, float32 or float64); it picks
            the default block size.
        block: (BLOCK_N, BLOCK_K) weight block, powers of two from 16 to 128 of at most 32 KiB of weights;
            default by dtype (64 x 64 for 16-bit weights, 32 x 32 otherwise).

    Returns:
        A BlockLayout, cached per mask tensor, device and block: a change to the mask through torch ops
        rebuilds it on the next call (see gpunn.kernels.layout.layout_for). Its visited_blocks /
        dense_blocks is the fraction of the dense layer's work the kernels do.

    Raises:
        TypeError for a mask that is not a 2-D bool tensor or an unsupported dtype; ValueError for a bad block.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(f"mask must be a 2-D bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)} "
                        f"of shape {tuple(getattr(mask, 'shape', ()))}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    size = dtype.itemsize
    block = check_block(block if block is not None else DEFAULT_BLOCKS[size], size)
    return layout_for(mask, block)
