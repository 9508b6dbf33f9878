"""The sparse backend's row layout (encoders/rows.py): Z order within a patch, so that the 2x2
children of a position are 4 consecutive rows; the stem's patches; the same visible patches with
and without the caller's count; no host-device sync when the count is given."""
import torch
import torch.nn.functional as F

from fcmae.encoders.rows import morton_order, stage_rows, visible_patches
from fcmae.masking import random_mask, stage_visibility
from fcmae.profiling import count_syncs


def test_morton_order():
    assert morton_order(1).tolist() == [0]
    assert morton_order(2).tolist() == [0, 1, 2, 3]
    assert morton_order(4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert sorted(morton_order(8).tolist()) == list(range(64))


def positions(layout):
    """(M, 3) sample, row, col of each row of a layout."""
    n, h, w = layout.shape
    i = layout.index
    return torch.stack([i // (h * w), i % (h * w) // w, i % w], 1)


def test_rows_are_the_visible_positions_and_children_are_consecutive():
    mask = random_mask(3, 2, 3, 0.5, generator=torch.Generator().manual_seed(0))
    layouts = stage_rows(mask, 3)
    for layout, visible in zip(layouts, stage_visibility(mask)):
        assert sorted(layout.index.tolist()) == visible.reshape(-1).nonzero().squeeze(1).tolist()
    for fine, coarse in zip(layouts, layouts[1:]):
        kids = positions(fine).view(-1, 4, 3)  # 4 consecutive rows per coarse row
        parent = positions(coarse)
        assert torch.equal(kids[:, :, 0], parent[:, :1].expand(-1, 4))
        assert torch.equal(kids[:, :, 1], 2 * parent[:, 1:2] + torch.tensor([0, 0, 1, 1]))
        assert torch.equal(kids[:, :, 2], 2 * parent[:, 2:3] + torch.tensor([0, 1, 0, 1]))


def test_stem_patches_are_the_conv_input_of_each_row():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 96)
    mask = random_mask(2, 2, 3, 0.5, generator=torch.Generator().manual_seed(1))
    layout = stage_rows(mask, 3)[0]
    patches = layout.stem_patches(imgs, 4)  # (M, 4*4*3), (row, col, channel) ordered
    unfolded = F.unfold(imgs, 4, stride=4)  # (N, C*4*4, 16*24), (channel, row, col) ordered
    n, h, w = layout.shape
    expected = unfolded.view(2, 3, 4, 4, h * w).permute(0, 4, 2, 3, 1).reshape(n * h * w, 48)[layout.index]
    assert torch.equal(patches, expected)


def test_given_count_equals_counted():
    mask = random_mask(4, 3, 3, 0.6, generator=torch.Generator().manual_seed(2))  # 3 visible each
    counted, given = stage_rows(mask), stage_rows(mask, 3)
    for a, b in zip(counted, given):
        assert a.per_sample == b.per_sample == 3
        assert torch.equal(a.index, b.index) and torch.equal(a.sample, b.sample)
    sample, position = visible_patches(mask, 3)
    assert torch.equal(mask.view(4, 9)[sample, position], torch.zeros(12))


def test_unequal_counts_are_handled_without_the_equal_count_path():
    mask = torch.ones(2, 2, 2)
    mask[0, 0, 0] = 0
    mask[1, :, 1] = 0  # 1 and 2 visible patches
    layout = stage_rows(mask)[3]
    assert layout.per_sample is None and layout.by_sample(torch.zeros(3, 5)) is None
    assert layout.index.tolist() == [0, 5, 7]
    sums = layout.per_sample_sum(torch.ones(3, 2))
    assert sums.tolist() == [[1, 1], [2, 2]]


def test_building_layouts_with_the_count_given_makes_no_sync():
    mask = random_mask(2, 2, 2, 0.5)
    assert sum(count_syncs(lambda: stage_rows(mask, 2)).values()) == 0
    counted = count_syncs(lambda: stage_rows(mask))  # counting reads the mask
    assert counted["aten::nonzero"] == 1 and counted["aten::_local_scalar_dense"] == 2
