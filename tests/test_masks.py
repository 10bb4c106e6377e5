"""gpunn.masks: the connectivity of local neighbourhoods, checked against F.unfold's geometry."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gpunn


@pytest.mark.parametrize("in_features,out_features,window", [(9, 9, 3), (10, 7, 4), (7, 10, 3), (5, 3, 9),
                                                             (1, 4, 3), (33, 130, 5)])
def test_local_1d_windows(in_features, out_features, window):
    mask = gpunn.masks.local_1d(in_features, out_features, window)
    assert mask.shape == (out_features, in_features) and mask.dtype == torch.bool
    width = min(window, in_features)
    for j, row in enumerate(mask):
        columns = row.nonzero().flatten()
        assert len(columns) == width
        assert torch.equal(columns, torch.arange(columns[0], columns[0] + width))  # consecutive
        centre = (j + 0.5) * in_features / out_features
        start = int(columns[0])
        # Centred within half an input, then shifted inward just enough to fit.
        nearest = math.floor(centre - width / 2 + 0.5)
        assert start == min(max(nearest, 0), in_features - width)


def test_local_1d_nine_neighbours_of_a_square_layer():
    mask = gpunn.masks.local_1d(12, 12, 9)
    assert mask[6].nonzero().flatten().tolist() == list(range(2, 11))
    assert mask[0].nonzero().flatten().tolist() == list(range(0, 9))  # shifted inward at the border


def _unfold_connectivity(shape, kernel_size, stride, padding, dilation, out_channels):
    """The reference: F.unfold applied to one-hot images says which inputs each output position sees."""
    channels, height, width = shape
    basis = torch.eye(channels * height * width, dtype=torch.float64).reshape(-1, channels, height, width)
    patches = F.unfold(basis, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (CHW, C k k, L)
    seen = (patches != 0).any(dim=1).T  # (L, CHW)
    return seen.repeat(out_channels, 1)


@pytest.mark.parametrize("shape,kernel_size,stride,padding,dilation,out_channels", [
    ((1, 5, 5), 3, 1, 0, 1, 1),
    ((3, 7, 6), 3, 1, 1, 1, 2),
    ((2, 9, 8), (3, 2), (2, 1), (1, 0), (2, 1), 3),
    ((1, 6, 11), 5, 3, 2, 1, 1),
    ((4, 4, 4), 1, 1, 0, 1, 2),
])
def test_local_2d_matches_unfold(shape, kernel_size, stride, padding, dilation, out_channels):
    mask = gpunn.masks.local_2d(shape, kernel_size, stride, padding, dilation, out_channels)
    expected = _unfold_connectivity(shape, kernel_size, stride, padding, dilation, out_channels)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_local_2d_single_channel_shape_and_nine_neighbours():
    mask = gpunn.masks.local_2d((6, 6), 3, padding=1)
    assert mask.shape == (36, 36)
    assert int(mask[2 * 6 + 3].sum()) == 9  # an interior pixel sees its 3x3 neighbourhood
    assert int(mask[0].sum()) == 4  # a corner's taps in the padding connect to nothing


def test_random_density_and_generator():
    assert not gpunn.masks.random(20, 10, 0.0).any()
    assert gpunn.masks.random(20, 10, 1.0).all()
    mask = gpunn.masks.random(300, 200, 0.3, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (200, 300) and abs(mask.float().mean().item() - 0.3) < 0.01
    again = gpunn.masks.random(300, 200, 0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)


@pytest.mark.parametrize("call", [
    lambda: gpunn.masks.local_1d(4, 4, 0),
    lambda: gpunn.masks.local_2d((3, 3), 5),
    lambda: gpunn.masks.local_2d((3, 3), 2, stride=0),
    lambda: gpunn.masks.local_2d((1, 2, 3, 4), 1),
    lambda: gpunn.masks.random(3, 3, 1.5),
    lambda: gpunn.masks.random(-1, 3, 0.5),
    # Sizes that are not ints (they had built masks of the wrong connectivity, or failed inside torch).
    lambda: gpunn.masks.local_1d(8, 8, 2.5),
    lambda: gpunn.masks.local_1d(8.5, 8, 3),
    lambda: gpunn.masks.local_1d(8, 8, True),
    lambda: gpunn.masks.local_1d(None, 8, 3),
    lambda: gpunn.masks.local_2d((4, 4), 3, out_channels=1.5),
    lambda: gpunn.masks.local_2d((4.0, 4.0), 3),
    lambda: gpunn.masks.random(True, 4, 0.5),
    lambda: gpunn.masks.random(4.0, 4, 0.5),
])
def test_bad_arguments(call):
    with pytest.raises(ValueError):
        call()
