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
from torchvision.datasets import VisionDataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from fcmae.data import load_image, read_or_skip
from fcmae.errors import UserError
from fcmae.filelist import list_classes

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


class SkippingImageFolder(VisionDataset):
    """torchvision's ImageFolder (labels = index of the sorted class folder name; `classes`,
    `class_to_idx`, `targets`) with items (image, label, files skipped): a file the loader cannot
    read (`BadFile`) is replaced by the next one, or with `strict` is a one-line error. The file
    list is flat (`paths`, a PathList; `targets` a numpy array), so forked loader workers share
    it instead of copying it page by page. `cache`: a folder to keep the listing in."""

    def __init__(self, root, transform, in_chans=3, strict=False, cache=None):
        super().__init__(root, transform=transform)
        self.paths = list_classes(self.root, IMG_EXTENSIONS, cache)
        self.classes = self.paths.classes
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = self.paths.labels
        self.loader = partial(load_image, mode="RGB" if in_chans == 3 else "L")  # picklable for workers
        self.strict = strict

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        image = self.loader(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])  # a Python int, collated to int64 as ImageFolder's

    def __getitem__(self, index):
        (image, label), skipped = read_or_skip(self.read, index, len(self), self.paths.__getitem__, self.strict)
        return image, label, skipped


def image_folder(root, split, transform, in_chans=3, strict=False, cache=None):
    """`root/split` as an ImageFolder (or `root` itself when it has no `split` folder and
    split is "val", so `fcmae eval --data DIR` also takes a bare class-folder tree). `cache`: a
    folder to keep the file listing in, None to list the folder every time."""
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
        return SkippingImageFolder(str(folder), transform, in_chans, strict, cache)
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


def held_out_split(dataset, fraction, seed, list_file):
    """(train indices, held-out indices) of `dataset` for a folder without val/: a stratified,
    seeded `fraction` of each class, its files (relative to the dataset root) listed in
    `list_file` by `write_split`. If `list_file` (optional) exists, its files are held out again
    (a resumed run validates on the same images)."""
    root = Path(dataset.root)
    paths = [str(Path(dataset.paths[i]).relative_to(root)) for i in range(len(dataset))]
    if list_file is not None and Path(list_file).is_file():
        list_file = Path(list_file)
        held_names = [line for line in list_file.read_text().splitlines() if line]
        index = {p: i for i, p in enumerate(paths)}
        missing = [p for p in held_names if p not in index]
        if missing:
            raise UserError(f"{list_file} holds out {len(missing)} file(s) no longer in {root} (e.g. {missing[0]}): "
                            f"put them back, or start over with --no-resume or another --output")
        held = sorted(index[p] for p in held_names)
        held_set = set(held)
        return [i for i in range(len(paths)) if i not in held_set], held
    counts = torch.bincount(torch.as_tensor(dataset.targets), minlength=len(dataset.classes))
    few = [name for name, n in zip(dataset.classes, counts.tolist()) if n < 2]
    if few:
        raise UserError(f"{root}: class{'es' * (len(few) > 1)} {', '.join(few[:10])} "
                        f"{'have' if len(few) > 1 else 'has'} fewer than 2 images, too few to hold one out for "
                        f"validation: add images, add a val/ folder, or pass --val-split 0")
    kept, held = stratified_split(dataset.targets, fraction, seed)
    return kept, held


def write_split(list_file, dataset, held):
    """The held-out files, one path (relative to the dataset root) a line, atomically."""
    from fcmae.files import write_atomic
    root = Path(dataset.root)
    write_atomic(list_file, "".join(f"{Path(dataset.paths[i]).relative_to(root)}\n" for i in held))
