"""Segmentation data: both layouts, pairing by stem, every mask kind, ADE20K's reduce-zero-label,
class names, and bad pairs named (skipped, or an error with strict)."""
import warnings

import numpy as np
import pytest
import torch
from helpers import segmentation_images
from PIL import Image

from fcmae.data.reading import BadFile, BadFileWarning
from fcmae.errors import UserError
from fcmae.labelmaps import IGNORE
from fcmae.segment.data import (MissingMasks, SegmentationSet, count_classes, find_layout, list_pairs,
                                read_classes, read_mask, spread, val_split)


def dataset(root, split="train", **kwargs):
    layout = find_layout(root)
    images, masks = list_pairs(*(layout.train if split == "train" else layout.val))
    return SegmentationSet(images, masks, kwargs.pop("num_classes", 4), **kwargs)


def test_generic_layout_pairs_images_with_masks_of_the_same_stem(tmp_path):
    root = segmentation_images(tmp_path, train=3, val=2)
    layout = find_layout(root)
    assert layout == ("generic", (root / "train/images", root / "train/masks"),
                      (root / "val/images", root / "val/masks"))
    images, masks = list_pairs(*layout.train)
    assert [p.stem for p in images] == [p.stem for p in masks] == ["train_000", "train_001", "train_002"]
    image, mask, skipped = dataset(root)[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64) and mask.shape == (64, 64) and skipped == 0
    assert torch.equal(mask, torch.from_numpy(np.array(Image.open(masks[1]))).long())
    assert read_classes(root) == ["background", "disc", "square", "triangle"]


def test_without_val_the_layout_says_so_and_a_seeded_share_is_held_out(tmp_path):
    root = segmentation_images(tmp_path, train=10, val=0)
    assert find_layout(root).val is None
    kept, held = val_split(10, 0.2, seed=3)
    assert len(held) == 2 and sorted(kept + held) == list(range(10)) and (kept, held) == val_split(10, 0.2, seed=3)
    assert val_split(10, 0.2, seed=4) != (kept, held)
    assert len(val_split(3, 0.01)[1]) == 1 and len(val_split(3, 0.99)[0]) == 1  # at least one, never all


def test_ade20k_layout_and_reduce_zero_label(tmp_path):
    root = segmentation_images(tmp_path, layout="ade20k", train=2, val=1)
    layout = find_layout(root)
    assert layout.name == "ade20k" and layout.val == (root / "images/validation", root / "annotations/validation")
    stored = torch.from_numpy(np.asarray(Image.open(root / "annotations/training/train_000.png")).copy()).long()
    _, mask, _ = dataset(root, reduce_zero_label=True)[0]
    assert torch.equal(mask[stored == 0], torch.full_like(mask[stored == 0], IGNORE))  # "other" is ignored
    assert torch.equal(mask[stored > 0], stored[stored > 0] - 1)
    assert (mask[:2] == IGNORE).all() and set(mask.unique().tolist()) <= {0, 1, 2, 3, IGNORE}


@pytest.mark.parametrize("mode", ["L", "P", "I;16"])
def test_masks_grayscale_palette_or_16_bit_read_as_labels(tmp_path, mode):
    root = segmentation_images(tmp_path / "set", train=2, val=0, mask_mode=mode)
    reference = segmentation_images(tmp_path / "ref", train=2, val=0, mask_mode="L")  # the same draws
    assert Image.open(root / "train/masks/train_000.png").mode == mode
    for name in ("train_000", "train_001"):
        mask = root / f"train/masks/{name}.png"
        assert torch.equal(read_mask(mask), read_mask(reference / f"train/masks/{name}.png"))


def test_a_palette_mask_is_read_by_index_not_colour(tmp_path):
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    img = Image.fromarray(labels, mode="P")
    img.putpalette([200, 10, 10] * 256)  # every index the same colour: only the index tells them apart
    img.save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == labels.tolist()


def test_colour_and_out_of_range_masks_are_bad_files(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "rgb.png")
    with pytest.raises(BadFile, match=r"rgb\.png \(a RGB image, not a label map: save masks as single-channel PNGs"):
        read_mask(tmp_path / "rgb.png")
    Image.fromarray(np.full((4, 4), 300, np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(BadFile, match=r"wide\.png \(label 300: labels run from 0 to 254, 255 = ignore\)"):
        read_mask(tmp_path / "wide.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(BadFile, match=r"junk\.png \(UnidentifiedImageError"):
        read_mask(tmp_path / "junk.png")


def test_an_image_without_its_mask_is_an_error_naming_it(tmp_path):
    root = segmentation_images(tmp_path, train=3, val=0)
    (root / "train/masks/train_001.png").unlink()
    with pytest.raises(MissingMasks, match=r"^1 of 3 images in \S+ have no mask: \S+train_001\.png has no "
                                           r"\S+masks/train_001\.png$"):
        list_pairs(*find_layout(root).train)


def test_a_mask_of_another_size_or_a_label_beyond_the_classes_is_skipped_and_named(tmp_path, monkeypatch):
    root = segmentation_images(tmp_path, train=4, val=0, classes=4)
    Image.new("L", (32, 64), 1).save(root / "train/masks/train_001.png")  # 32 wide, its image 64
    Image.new("L", (64, 64), 7).save(root / "train/masks/train_002.png")  # label 7 of 4 classes
    listed = tmp_path / "skipped.txt"
    monkeypatch.setenv("FCMAE_SKIPPED_FILES", str(listed))
    data = dataset(root, num_classes=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [data[i] for i in range(4)]
    assert [s.skipped for s in items] == [0, 2, 1, 0]  # 1 -> 3 (2 skipped), 2 -> 3
    assert torch.equal(items[1].mask, items[3].mask)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadFileWarning)]
    assert any("train_001.png (mask of 32x64 pixels, but its image" in m and
               "has 64x64: save each mask at its image's size)" in m for m in messages)
    assert any("train_002.png (label 7, but there are 4 classes, 0 to 3, and 255 = ignore: fix the mask, or name "
               "every class in classes.txt)" in m for m in messages)
    assert len(listed.read_text().splitlines()) == 2
    with pytest.raises(UserError, match=r"unreadable file \S+train_001\.png \(mask of 32x64"):
        dataset(root, num_classes=4, strict=True)[1]


def test_count_classes_from_the_masks(tmp_path):
    root = segmentation_images(tmp_path, train=6, val=0, classes=4, names=False)
    assert read_classes(root) is None
    _, masks = list_pairs(*find_layout(root).train)
    labels = set().union(*(set(np.unique(np.asarray(Image.open(m))).tolist()) for m in masks))
    assert count_classes(masks) == (max(labels) + 1, [])
    (root / "train/masks/train_000.png").write_bytes(b"junk")
    k, bad = count_classes(masks)
    assert len(bad) == 1 and "train_000.png" in bad[0]


def test_classes_txt_must_name_every_class(tmp_path):
    (tmp_path / "classes.txt").write_text("sky\n\nroad\n")
    with pytest.raises(ValueError, match=r"classes\.txt: expected 1 to 255 class names, one per line, none empty; "
                                         r"found 3 lines with empty ones"):
        read_classes(tmp_path)
    (tmp_path / "classes.txt").write_text("sky\nroad\n\n")
    assert read_classes(tmp_path) == ["sky", "road"]


def test_npy_images_with_png_masks(tmp_path):
    root = segmentation_images(tmp_path, train=2, val=0, arrays=True)
    image, mask, _ = dataset(root)[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64) and mask.shape == (64, 64)
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    with pytest.raises(ValueError, match="mixes images and .npy arrays"):
        Image.new("RGB", (64, 64)).save(root / "train/images/extra.png")
        list_pairs(*find_layout(root).train)


def test_no_layout_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"holds neither train/images/ with train/masks/ nor ADE20K's images/"):
        find_layout(tmp_path)


def test_spread_picks_images_across_the_set():
    assert spread(10, 4) == [0, 2, 5, 7] and spread(3, 4) == [0, 1, 2]


def test_augmentations_are_seeded_per_item_whatever_the_order(tmp_path):
    """What exact resume rests on: item `key` gets the same crop, flip and distortion in any process
    and in any order (fcmae.data.modules.SeededItems, which SegmentData's train loader serves)."""
    from fcmae.data.modules import SeededItems
    from fcmae.segment.transforms import TrainTransform
    root = segmentation_images(tmp_path, train=4, val=0)
    layout = find_layout(root)
    train = SeededItems(SegmentationSet(*list_pairs(*layout.train), 4, TrainTransform(32)), seed=5)
    forward = [train[k] for k in range(8)]
    backward = [train[k] for k in reversed(range(8))][::-1]
    assert all(torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) for a, b in zip(forward, backward))
    assert not torch.equal(forward[0].image, forward[4].image)  # the same image in the next epoch: other draws
