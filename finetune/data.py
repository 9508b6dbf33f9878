"""Labeled data: an ImageFolder root with train/ and val/ (one folder per class, ImageNet's
layout), and the release's transforms built by timm. Images are converted as for pre-training
(`fcmae.data.convert_image`); an unreadable file is skipped with a warning naming it (the next
one stands in), and each item carries how many were skipped: (image, label, files skipped)."""
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from fcmae.data import load_image, read_or_skip
from fcmae.errors import UserError

# Grayscale data is normalized with the mean of ImageNet's channel statistics.
STATS = {3: (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
         1: ((sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,))}


def check_in_chans(in_chans):
    if in_chans not in STATS:
        raise UserError(f"--in-chans {in_chans}: image folders give 3 (RGB) or 1 (grayscale) channels: pass 3 or 1")


def train_transform(input_size, in_chans=3, aa="rand-m9-mstd0.5-inc1", reprob=0.25):
    """RandomResizedCrop + flip + RandAugment + random erasing, bicubic (the release's recipe);
    aa None and reprob 0 leave crop + flip (MAE's linear-probe augmentation)."""
    mean, std = STATS[in_chans]
    transform = create_transform(input_size, is_training=True, color_jitter=None, auto_augment=aa or None,
                                 interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
                                 mean=mean, std=std)
    for t in transform.transforms:
        for op in getattr(t, "ops", ()):  # timm's RandAugment
            if op.aug_fn is timm_posterize:
                op.aug_fn = posterize
    return transform


timm_posterize = auto_augment.posterize


def posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, except that keeping 0 bits gives a black image, as Pillow < 13 did:
    Pillow 13 raises instead, and "inc1" asks for 0 bits at magnitude 10 (9 + noise)."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_posterize(img, bits_to_keep, **kwargs)


def eval_transform(input_size, in_chans=3, crop_pct=None):
    """Resize to input_size / crop_pct and center-crop (crop_pct 224/256 below 384 px); from 384
    px up the release resizes straight to input_size, without cropping."""
    mean, std = STATS[in_chans]
    if crop_pct is None:
        crop_pct = 224 / 256 if input_size < 384 else 1.0
    crop_mode = "squash" if crop_pct == 1.0 else "center"
    return create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            crop_mode=crop_mode, mean=mean, std=std)


class SkippingImageFolder(ImageFolder):
    """ImageFolder whose items are (image, label, files skipped): a file the loader cannot read
    (`BadFile`) is replaced by the next one, or with `strict` is a one-line error."""

    def __init__(self, root, transform, in_chans=3, strict=False):
        mode = "RGB" if in_chans == 3 else "L"
        super().__init__(root, transform=transform, loader=partial(load_image, mode=mode))  # picklable for workers
        self.strict = strict

    def __getitem__(self, index):
        (image, label), skipped = read_or_skip(super().__getitem__, index, len(self),
                                               lambda i: self.samples[i][0], self.strict)
        return image, label, skipped


def image_folder(root, split, transform, in_chans=3, strict=False):
    """`root/split` as an ImageFolder (or `root` itself when it has no `split` folder and
    split is "val", so `fcmae eval --data DIR` also takes a bare class-folder tree)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data {root} is not a directory: pass a folder holding train/ and val/ class folders")
    folder = root / split
    if not folder.is_dir():
        if split == "val" and any(p.is_dir() for p in root.iterdir()) and not (root / "train").is_dir():
            folder = root
        else:
            raise UserError(f"--data {root} has no {split}/ folder: expected {root}/{split}/<class>/<image>")
    try:
        return SkippingImageFolder(str(folder), transform, in_chans, strict)
    except (FileNotFoundError, RuntimeError) as e:
        # e.g. an empty class folder: it would shift every label after it, so it is an error here
        raise UserError(f"{folder}: {str(e).splitlines()[0]}: put images in one folder per class") from None


def check_classes(train, val):
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:3]
        raise UserError(f"train/ has {len(train.classes)} classes and val/ {len(val.classes)}, differing in "
                        f"{', '.join(only) or 'order'}: both need the same class folders")


def loader(dataset, batch_size, workers, train):
    # Full batches in training: Mixup/CutMix pair samples within a batch and needs it even.
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def stratified_split(labels, fraction, seed=0):
    """Split sample indices per class: (kept, held out), each sorted. Each class with two or
    more samples holds out round(fraction x its count), at least one and never all of them;
    a class of one sample stays in `kept`. Seeded: the same split on every run and process."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 and fraction > 0 else 0
        held += idx[:n].tolist()
        kept += idx[n:].tolist()
    return sorted(kept), sorted(held)
