"""gpunn.kernels.work.count_work: what the interpreter counts for a dense layer whose tiles are known.

The interpreter runs the dense forward with one 64 x 64 x 64 tile config (kernels/tiling.py), so every
count follows from the shape: one program per 64 x 64 output tile, each reading its x rows and W rows.
"""
from __future__ import annotations

import pytest
import torch

import gpunn
from gpunn.kernels import tiling
from gpunn.kernels.work import Work, count_work

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts what Triton's interpreter executes")


def test_interpreter_tile_is_the_one_assumed():
    assert tiling.INTERPRETER_TILE[:3] == (64, 64, 64)


@pytest.mark.parametrize("m, n, k", [(128, 64, 192), (33, 70, 50)])
def test_dense_forward_counts(m, n, k):
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    with count_work() as work:
        gpunn.functional.linear(x, w, b, "relu")
    row_tiles, col_tiles, k_tiles = -(-m // 64), -(-n // 64), -(-k // 64)
    assert work.launches == 1 and work.programs == row_tiles * col_tiles
    # Padding past the edges is issued to the MMA (counted); masked-off elements are never loaded (not counted).
    assert work.dot_flops == 2 * (64 * row_tiles) * (64 * col_tiles) * (64 * k_tiles)
    # Each program reads its 64 rows of x, its 64 rows of W and its bias slice: x once per column tile, W and
    # the bias once per row tile; y is written once; the activation is fused (no extra pass).
    assert work.bytes_loaded == 4 * (m * k * col_tiles + (n * k + n) * row_tiles)
    assert work.bytes_stored == 4 * m * n


def test_counts_per_call_and_nothing_outside_the_block():
    x, w = torch.randn(64, 64), torch.randn(64, 64)
    with count_work() as work:
        for _ in range(3):
            gpunn.functional.linear(x, w)
    assert work / 3 == Work(launches=1, programs=1, dot_flops=2 * 64**3, bytes_loaded=2 * 4 * 64 * 64,
                            bytes_stored=4 * 64 * 64)
    gpunn.functional.linear(x, w)
    assert work.launches == 3


@pytest.mark.parametrize("activation, saves_derivative", [("relu", False), ("tanh", False), ("gelu", True),
                                                          ("silu", True), ("leaky_relu", True), (None, False)])
def test_training_forward_writes_the_derivative_only_where_backward_needs_it(activation, saves_derivative):
    """relu and tanh take their derivative from the output; gelu, silu and leaky_relu (whose output may be
    changed in place, as torch allows) need act'(z) written beside it."""
    x = torch.randn(64, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)
    with count_work() as work:
        gpunn.functional.linear(x, w, None, activation)
    assert work.bytes_stored == 4 * 64 * 64 * (2 if saves_derivative else 1)
