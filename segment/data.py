"""Segmentation data: images with their PNG label maps, in one of two layouts (`find_layout`):

- ADE20K: DIR/images/{training,validation}/*.jpg and DIR/annotations/{training,validation}/*.png;
- generic: DIR/train/images/* with DIR/train/masks/<same stem>.png, DIR/val/ the same; without
  val/, a seeded share of train/ is held out (`val_split`).

Images are read as pre-training reads them (fcmae.data.sources.FileSamples: RGB or grayscale, 16-bit and
transparent images converted, decompression bombs refused, or `.npy` arrays (C, H, W)). Masks are
single-channel PNG label maps, 8- or 16-bit, grayscale or palette (the palette index is the label);
IGNORE (255) marks pixels that are neither trained on nor scored. `reduce_zero_label` (ADE20K):
label 0 ("other") becomes IGNORE and 1..K become 0..K-1. Class names: DIR/classes.txt, line i
naming label i (after the reduction), when present (`read_classes`); else the command counts them
(`count_classes`).

A pair that cannot be used (an unreadable image or mask, a mask of another size than its image, a
label >= the number of classes other than IGNORE) is a BadFile: skipped and named like any
unreadable file (fcmae.data.reading.read_or_skip), or with `strict` an error. An image without a mask is
found when listing, and is an error (`MissingMasks`): the pairing is wrong, not one file.
"""
import copy
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.transforms.v2.functional import pil_to_tensor

from fcmae.data.filelist import PathList
from fcmae.data.labelled import stratified_split
from fcmae.data.modules import LabelledData, loader
from fcmae.data.reading import ARRAY_EXTENSIONS, PIL_ERRORS, BadFile, read_or_skip, reason
from fcmae.data.sources import FileSamples, list_files
from fcmae.labelmaps import IGNORE

MAX_CLASSES = IGNORE  # labels 0..254: 255 is taken
MASK_SUFFIX = ".png"
# layout name: ((train images, train masks), (val images, val masks)), relative to DIR
LAYOUTS = {"ade20k": (("images/training", "annotations/training"), ("images/validation", "annotations/validation")),
           "generic": (("train/images", "train/masks"), ("val/images", "val/masks"))}
MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B")  # single-channel: the value (or index) is the label


class Sample(NamedTuple):
    """A dataset item, and (collated) a batch: image (C, H, W), mask (H, W) int64, and how many
    unusable pairs were skipped to find this one (SkippedFiles sums it, the last field)."""
    image: torch.Tensor
    mask: torch.Tensor
    skipped: int


class MissingMasks(ValueError):
    """Images without a mask of the same stem; the message names the first."""


class Layout(NamedTuple):
    name: str  # "ade20k" or "generic"
    train: tuple  # (images folder, masks folder)
    val: tuple  # the same, or None: no val/ (hold out part of train/)


def find_layout(root):
    """The layout of `root` (an ADE20K or a generic folder), or a ValueError saying what is expected."""
    root = Path(root)
    for name, (train, val) in LAYOUTS.items():
        if all((root / folder).is_dir() for folder in train):
            has_val = all((root / folder).is_dir() for folder in val)
            return Layout(name, tuple(root / f for f in train), tuple(root / f for f in val) if has_val else None)
    raise ValueError(f"{root} holds neither train/images/ with train/masks/ nor ADE20K's images/training/ with "
                     f"annotations/training/")


def list_pairs(images, masks, cache=None):
    """(image paths, mask paths), paired by stem: `masks`/<stem>.png for every image (or .npy
    array) in `images`. Images without a mask are a MissingMasks error; masks without an image
    are ignored. `cache`: a folder to keep the image listing in (fcmae.data.filelist)."""
    images, masks = Path(images), Path(masks)
    paths = list_files(images, cache)
    if not len(paths):
        raise ValueError(f"no images or .npy files in {images}")
    is_array = paths.has_suffix(ARRAY_EXTENSIONS[0])
    if is_array.any() and not is_array.all():
        raise ValueError(f"{images} mixes images and .npy arrays: keep one kind per data folder")
    have = {e.name for e in os.scandir(masks)} if masks.is_dir() else set()  # one listing, not a stat per image
    names = [Path(paths.relative(i)).with_suffix(MASK_SUFFIX).as_posix() for i in range(len(paths))]
    missing = [i for i, name in enumerate(names) if not (name in have if "/" not in name else (masks / name).is_file())]
    if missing:
        raise MissingMasks(f"{len(missing)} of {len(paths)} images in {images} have no mask: {paths[missing[0]]} "
                           f"has no {masks / names[missing[0]]}")
    return paths, PathList.from_paths(names, root=masks)


def read_classes(root):
    """The class names of DIR/classes.txt (line i names label i; trailing empty lines dropped), or None."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or len(names) > MAX_CLASSES or not all(names):
        raise ValueError(f"{path}: expected 1 to {MAX_CLASSES} class names, one per line, none empty; "
                         f"found {len(names)} lines{' with empty ones' if names and not all(names) else ''}")
    return names


def read_mask(path, reduce_zero_label=False):
    """A PNG label map -> uint8 tensor (H, W) of labels (IGNORE = 255). A file that does not
    read, is not single-channel, or holds a label above 255 is a BadFile naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in MASK_MODES:
                raise BadFile(f"{path} (a {img.mode} image, not a label map: save masks as single-channel PNGs, "
                              f"grayscale or palette, one label per pixel)")
            labels = np.asarray(img)
    except PIL_ERRORS as e:
        raise BadFile(f"{path} ({reason(e)})") from e
    if labels.min(initial=0) < 0 or labels.max(initial=0) > IGNORE:
        worst = int(labels.max() if labels.max() > IGNORE else labels.min())
        raise BadFile(f"{path} (label {worst}: labels run from 0 to {MAX_CLASSES - 1}, {IGNORE} = ignore)")
    labels = torch.from_numpy(labels.astype(np.uint8))
    if reduce_zero_label:  # 0 -> IGNORE, k -> k - 1, IGNORE stays
        labels = torch.where((labels == 0) | (labels == IGNORE), IGNORE, labels - 1).to(torch.uint8)
    return labels


def count_classes(masks, reduce_zero_label=False):
    """(K = the highest label in `masks` + 1 (IGNORE aside), the BadFile messages of masks that
    could not be read). Reads every mask."""
    top, bad = -1, []
    for path in masks:
        try:
            labels = read_mask(path, reduce_zero_label)
        except BadFile as e:
            bad.append(str(e))
            continue
        known = labels[labels != IGNORE]
        if known.numel():
            top = max(top, int(known.max()))
    return top + 1, bad


class SegmentationSet(Dataset):
    """index -> Sample(image, mask, skipped) through `transform(image, mask)`; untransformed
    (`raw`): image (C, H, W) uint8 (images) or float (.npy arrays), mask (H, W) uint8, both at the
    file's own size. `images`, `masks`: paired paths (`list_pairs`)."""

    def __init__(self, images, masks, num_classes, transform=None, in_chans=3, reduce_zero_label=False, strict=False):
        self.files = FileSamples(images, in_chans)  # pre-training's reader: conversions, arrays, bad files
        self.masks = masks if isinstance(masks, PathList) else PathList.from_paths(masks)
        self.num_classes, self.transform, self.in_chans = num_classes, transform, in_chans
        self.reduce_zero_label, self.strict = reduce_zero_label, strict
        self.arrays = self.files.arrays

    def __len__(self):
        return len(self.files)

    def raw(self, index):
        """(image, mask) of pair `index` as read, or a BadFile naming what is wrong with it."""
        image = self.files.read(index)  # PIL image, or a uint8 (decoded JPEG) / float (array) tensor
        if isinstance(image, Image.Image):
            image = pil_to_tensor(image)  # uint8 (C, H, W)
        mask = read_mask(self.masks[index], self.reduce_zero_label)
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise BadFile(f"{self.masks[index]} (mask of {mask.shape[1]}x{mask.shape[0]} pixels, but its image "
                          f"{self.files.paths[index]} has {image.shape[-1]}x{image.shape[-2]}: save each mask at its "
                          f"image's size)")
        known = mask[mask != IGNORE]
        if known.numel() and int(known.max()) >= self.num_classes:
            raise BadFile(f"{self.masks[index]} (label {int(known.max())}, but there are {self.num_classes} classes, "
                          f"0 to {self.num_classes - 1}, and {IGNORE} = ignore: fix the mask, or name every class in "
                          f"classes.txt)")
        return image, mask

    def read(self, index):
        image, mask = self.raw(index)
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask.long()

    def __getitem__(self, index):
        (image, mask), skipped = read_or_skip(self.read, index, len(self), self.files.paths.__getitem__, self.strict)
        return Sample(image, mask, skipped)


def val_split(size, fraction, seed=0):
    """(kept, held out) indices of a set without val/: a seeded `fraction` of it, at least one
    and never all (fine-tuning's split with every pair in one class)."""
    return stratified_split(torch.zeros(size, dtype=torch.int64), fraction, seed)


def subset(dataset, indices, transform):
    """`dataset` restricted to `indices`, with its own transform (the train and val shares of one folder)."""
    share = copy.copy(dataset)
    share.transform = transform
    return Subset(share, indices)


class SegmentData(LabelledData):
    """Fine-tuning's loaders (each rank's resumable share of a seeded permutation, augmentations
    seeded per item: a resumed run sees the batches the interrupted one would have), except that
    validation takes one image at a time, at its own size, and every val image exactly once over
    all ranks (rank r: images r, r + world, ...): the confusion matrices they sum are exact."""

    def val_dataloader(self):
        if self.val is None:
            return []
        trainer = self.trainer
        # Ranks may get one image more than the others: validation_step must hold no collective.
        share = Subset(self.val, range(trainer.global_rank, len(self.val), trainer.world_size))
        return loader(share, 1, self.workers, train=False, generator=self.generator())


def spread(size, n):
    """n indices spread evenly over range(size) (all of them when size <= n): a fixed choice of
    images to picture, not the first n (which may all look alike)."""
    return [i * size // n for i in range(n)] if n < size else list(range(size))
