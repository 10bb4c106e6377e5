"""gpunn.masks.block_layout: which weight blocks the masked kernels visit, checked block by block against
the mask, and how layouts are cached."""
from __future__ import annotations

import pytest
import torch

from gpunn import masks
from gpunn.kernels import block_layout

MASKS = {
    "local_1d": lambda: masks.local_1d(300, 200, 9),
    "local_2d": lambda: masks.local_2d((3, 10, 12), 3, stride=2, padding=1, out_channels=4),
    "random": lambda: masks.random(150, 97, 0.02, generator=torch.Generator().manual_seed(0)),
    "striped": lambda: (torch.arange(70)[:, None] % 3 == 0) | (torch.arange(90)[None, :] < 40),
}


def _expected_kinds(mask: torch.Tensor, block: tuple[int, int]) -> dict[tuple[int, int], str]:
    """Each block's kind, cut out of the mask one block at a time."""
    bn, bk = block
    kinds = {}
    for r in range(-(-mask.shape[0] // bn)):
        for c in range(-(-mask.shape[1] // bk)):
            piece = mask[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk]
            kinds[r, c] = "full" if piece.all() else "partial" if piece.any() else "empty"
    return kinds


@pytest.mark.parametrize("block", [(16, 16), (64, 32), (32, 128)], ids=str)
@pytest.mark.parametrize("name", list(MASKS))
def test_lists_match_the_mask_block_by_block(device, name, block):
    mask = MASKS[name]().to(device)
    layout = masks.block_layout(mask, block=block)
    kinds = _expected_kinds(mask.cpu(), block)
    rows, cols = layout.grid
    assert layout.dense_blocks == rows * cols == len(kinds)
    assert layout.full_blocks == sum(kind == "full" for kind in kinds.values())
    assert layout.partial_blocks == sum(kind == "partial" for kind in kinds.values())

    def check(count, full, index, of_block):
        count, full, index = count.tolist(), full.tolist(), index.tolist()
        for line, listed in enumerate(index):
            blocks = [of_block(line, other) for other in listed]
            got = [kinds[b] for b in blocks]
            assert sorted(listed) == list(range(len(listed)))  # a permutation of every block in the line
            assert got[:full[line]] == ["full"] * full[line]
            assert got[full[line]:count[line]] == ["partial"] * (count[line] - full[line])
            assert set(got[count[line]:]) <= {"empty"}
            # Within each kind, ascending order (the kernels walk x and W forward in memory).
            assert listed[:full[line]] == sorted(listed[:full[line]])
            assert listed[full[line]:count[line]] == sorted(listed[full[line]:count[line]])

    check(layout.row_count, layout.row_full, layout.row_index, lambda r, c: (r, c))
    check(layout.col_count, layout.col_full, layout.col_index, lambda c, r: (r, c))
    order = [divmod(b, cols) for b in layout.block_order.tolist()]
    assert sorted(layout.block_order.tolist()) == list(range(rows * cols))
    visited = layout.visited_blocks
    assert [kinds[b] for b in order] == (["full"] * layout.full_blocks + ["partial"] * layout.partial_blocks
                                         + ["empty"] * (rows * cols - visited))
    assert torch.equal(layout.mask.bool(), mask)
    for tensor in (layout.row_index, layout.col_index, layout.block_order, layout.row_count):
        assert tensor.dtype == torch.int32 and tensor.device == mask.device


def test_band_density_report(device):
    # The block density each mask family reaches at its default block (quoted in the closing note).
    band = masks.block_layout(masks.local_1d(4096, 4096, 9).to(device), torch.bfloat16)
    assert band.block == (64, 64)
    assert band.visited_blocks == 3 * 64 - 2  # three blocks per block row; one fewer at each border
    assert band.full_blocks == 0


def test_cached_per_mask_block_and_version(device):
    mask = masks.local_1d(100, 80, 5).to(device)
    first = masks.block_layout(mask, torch.float32)
    assert masks.block_layout(mask, torch.float32) is first
    assert masks.block_layout(mask, torch.float16) is not first  # another default block
    assert masks.block_layout(mask.clone(), torch.float32) is not first  # another tensor
    mask[0, :] = True  # an in-place change rebuilds the layout
    rebuilt = masks.block_layout(mask, torch.float32)
    assert rebuilt is not first and torch.equal(rebuilt.mask.bool(), mask)
    assert masks.block_layout(mask, torch.float32) is rebuilt


def test_a_freed_mask_never_matches_a_new_one(device):
    layouts = []
    for density in (0.0, 1.0):
        mask = masks.random(64, 64, density).to(device)
        layouts.append(masks.block_layout(mask))
        del mask  # the next mask may reuse the address (and id)
    assert layouts[0].visited_blocks == 0 and layouts[1].full_blocks == layouts[1].dense_blocks


@pytest.mark.parametrize("block", [(8, 16), (16, 24), (16,), (16, 16.0)], ids=str)
def test_bad_blocks(block):
    with pytest.raises(ValueError, match="powers of two"):
        block_layout.check_block(block)


def test_bad_masks():
    with pytest.raises(TypeError, match="2-D bool"):
        masks.block_layout(torch.ones(3, 4))
    with pytest.raises(TypeError, match="2-D bool"):
        masks.block_layout(torch.ones(3, dtype=torch.bool))


def test_empty_shapes(device):
    for shape in ((0, 5), (5, 0), (0, 0)):
        layout = masks.block_layout(torch.ones(shape, dtype=torch.bool, device=device))
        assert layout.visited_blocks == 0
