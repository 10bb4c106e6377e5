"""gpunn.masks.block_layout: which weight blocks the masked kernels visit, checked block by block against
the mask, and how layouts are cached."""
from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from gpunn import masks
from gpunn.kernels import layout as block_layout

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


def test_a_version_bump_without_a_change_keeps_the_layout(device):
    mask = masks.local_1d(100, 80, 5).to(device)
    first = masks.block_layout(mask)
    mask.copy_(mask.clone())  # as load_state_dict or a buffer broadcast does: same content, new version
    assert masks.block_layout(mask) is first


def test_inference_mode_masks_are_compared_by_content(device):
    with torch.inference_mode():
        mask = masks.local_1d(100, 80, 5).to(device)
        first = masks.block_layout(mask)
        assert masks.block_layout(mask) is first
        mask[:, :] = True  # inference tensors have no version counter
        rebuilt = masks.block_layout(mask)
    assert rebuilt is not first and rebuilt.full_blocks == rebuilt.dense_blocks


def test_a_freed_masks_entry_is_dropped(device):
    mask = masks.local_1d(64, 64, 3).to(device)
    masks.block_layout(mask)
    key = next(key for key, entry in block_layout._cache.items() if entry.mask() is mask)
    del mask
    assert key not in block_layout._cache


def test_an_entry_evicted_by_another_thread_during_a_lookup(device, monkeypatch):
    # A mask made under inference_mode is compared with its layout's copy on every lookup (torch.equal, which
    # releases the GIL): another thread can evict that entry meanwhile (here, as if it did, during the
    # comparison). The lookup still returns its layout; it had then moved the evicted key (KeyError).
    with torch.inference_mode():
        mask = masks.local_1d(64, 64, 3).to(device)
    first = masks.block_layout(mask)
    equal = torch.equal

    def evicting(a, b):
        block_layout._cache.clear()
        return equal(a, b)

    monkeypatch.setattr(torch, "equal", evicting)
    assert masks.block_layout(mask) is first


def test_an_entry_for_a_dead_mask_never_matches_a_new_one(device, monkeypatch):
    # A new tensor can reuse a freed one's id: plant an entry under the new mask's key whose weak
    # reference is dead (as if its mask had died without the entry being dropped) and whose version and
    # address match, and check the layout is rebuilt rather than returned.
    mask = torch.ones(64, 64, dtype=torch.bool, device=device)
    stale = block_layout.build(torch.zeros(64, 64, dtype=torch.bool, device=device), (32, 32))
    dead = weakref.ref(torch.empty(0))
    assert dead() is None
    key = (id(mask), mask.device, (32, 32))
    monkeypatch.setitem(block_layout._cache, key, block_layout._Entry(dead, mask.data_ptr(), mask._version, stale))
    layout = masks.block_layout(mask, block=(32, 32))
    assert layout is not stale and layout.full_blocks == 4


@pytest.mark.parametrize("block", [(8, 16), (16, 24), (16,), (16, 16.0), (256, 16), 64], ids=str)
def test_bad_blocks(block):
    with pytest.raises(ValueError, match="powers of two"):
        masks.block_layout(torch.ones(4, 4, dtype=torch.bool), block=block)


def test_blocks_too_large_for_the_dtype():
    mask = torch.ones(4, 4, dtype=torch.bool)
    assert masks.block_layout(mask, torch.float16, (128, 128)).block == (128, 128)
    with pytest.raises(ValueError, match="exceeds"):
        masks.block_layout(mask, torch.float32, (128, 128))
    with pytest.raises(ValueError, match="exceeds"):
        masks.block_layout(mask, torch.float64, (128, 64))
    assert block_layout.check_block((np.int64(32), np.int64(16))) == (32, 16)


def test_bad_masks_and_dtypes():
    with pytest.raises(TypeError, match="2-D bool"):
        masks.block_layout(torch.ones(3, 4))
    with pytest.raises(TypeError, match="2-D bool"):
        masks.block_layout(torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype must be"):
        masks.block_layout(torch.ones(3, 4, dtype=torch.bool), torch.int8)


def test_empty_shapes(device):
    for shape in ((0, 5), (5, 0), (0, 0)):
        layout = masks.block_layout(torch.ones(shape, dtype=torch.bool, device=device))
        assert layout.visited_blocks == 0


def test_tables_a_graph_capture_used_outlive_their_caches(monkeypatch):
    """A captured CUDA graph reads a mask's layout and an RNN's step table by address on every replay: used
    during a capture, they are held after their caches evict them (a capture is faked here)."""
    from gpunn.kernels import runtime
    from gpunn.ops.rnn_sequence import _STEPS_KEPT, Steps

    monkeypatch.setattr(runtime, "_held_for_graphs", {})
    mask, cpu = torch.rand(40, 40) < 0.5, torch.device("cpu")
    built, steps = block_layout.layout_for(mask, (32, 32)), Steps.of(None, [3, 2, 5], cpu)
    monkeypatch.setattr(runtime, "capturing", lambda device: True)
    assert block_layout.layout_for(mask, (32, 32)) is built and Steps.of(None, [3, 2, 5], cpu) is steps
    monkeypatch.setattr(runtime, "capturing", lambda device: False)
    others = [torch.rand(40, 40) < 0.5 for _ in range(block_layout._CACHE_SIZE + 1)]  # kept alive: their entries stay
    for other in others:
        block_layout.layout_for(other, (32, 32))
    for length in range(4, 5 + _STEPS_KEPT):
        Steps.of(None, [length, 2, 5], cpu)
    # Both evicted from their caches, and held:
    assert block_layout.layout_for(mask, (32, 32)) is not built and Steps.of(None, [3, 2, 5], cpu) is not steps
    assert runtime._held_for_graphs == {id(built): built, id(steps): steps}
