"""Labelled data: class folders (ImageNet's layout, `DIR/train/<class>/<file>` and
`DIR/val/<class>/<file>`), their items (image, label, files skipped), and held-out splits.

Labels are the index of the sorted class folder name (torchvision's ImageFolder). Class folders
hold images or `.npy` arrays (C, H, W) for any channel count, read as pre-training reads them
(fcmae/data/reading.py); an unreadable file is skipped and counted, the next one standing in.
Without a val/ folder, a stratified, seeded fraction of train/ is held out (`stratified_split`,
`held_out_split`) and its files listed, so a resumed run validates on the same images.
"""
import os
from functools import partial
from pathlib import Path
from typing import NamedTuple, Union

import torch
from torch.utils.data import Subset
from torchvision.datasets import VisionDataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from fcmae.data.filelist import list_classes
from fcmae.data.reading import ARRAY_EXTENSIONS, check_channels, holds_arrays, load_image, read_array, read_or_skip
from fcmae.data.transforms import STATS, eval_transform
from fcmae.errors import SettingError
from fcmae.files import write_atomic
from fcmae.masking import check_input_size


class Labelled(NamedTuple):
    """A labelled item, and (collated) a batch of them."""
    image: torch.Tensor  # (C, S, S); batch (N, C, S, S)
    label: Union[int, torch.Tensor]  # the class index; batch (N,) int64
    skipped: int  # files skipped to find a readable one; batch (N,)


def check_in_chans(in_chans, data=None):
    """Images give 3 or 1 channels; any other count needs .npy arrays (looked for in `data`, cheaply:
    the first file of its first class folder)."""
    if in_chans < 1:
        raise SettingError(f"`in_chans` {in_chans}: must be at least 1")
    if in_chans not in STATS and not (data and folder_holds_arrays(data)):
        raise SettingError(f"`in_chans` {in_chans}: image folders give 3 (RGB) or 1 (grayscale) channels: pass 3 or "
                           f"1, or use class folders of .npy arrays ({in_chans}, H, W)")


def folder_holds_arrays(data):
    """Whether the first file of the first class folder of DATA/train (or DATA/val, or DATA) is .npy."""
    root = Path(data)
    for folder in (root / "train", root / "val", root):
        if folder.is_dir():
            classes = sorted(e.path for e in os.scandir(folder) if e.is_dir())
            if classes:
                files = sorted(e.name for e in os.scandir(classes[0]) if not e.is_dir())
                return bool(files) and Path(files[0]).suffix.lower() in ARRAY_EXTENSIONS
    return False


class SkippingImageFolder(VisionDataset):
    """torchvision's ImageFolder (labels = index of the sorted class folder name; `classes`,
    `class_to_idx`, `targets`) with items (image, label, files skipped): a file the loader cannot
    read (`BadFile`) is replaced by the next one, or with `strict` is a one-line error. The file
    list is flat (`paths`, a PathList; `targets` a numpy array), so forked loader workers share
    it instead of copying it page by page. `cache`: a folder to keep the listing in.

    Class folders of `.npy` arrays (C, H, W) instead of images (`arrays`): float tensors as
    pre-training reads them; an array with another channel count than `in_chans` is a bad file
    (the first one is checked up front: a one-line error)."""

    def __init__(self, root, transform, in_chans=3, strict=False, cache=None):
        super().__init__(root, transform=transform)
        self.paths = list_classes(self.root, IMG_EXTENSIONS + ARRAY_EXTENSIONS, cache)
        # Files beside the class folders have no class: left out, and said so (`left_out_note`).
        self.loose = sorted(e.name for e in os.scandir(self.root)
                            if not e.is_dir() and e.name.lower().endswith(IMG_EXTENSIONS + ARRAY_EXTENSIONS))
        self.classes = self.paths.classes
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = self.paths.labels
        self.arrays = holds_arrays(self.paths, root)
        if self.arrays:
            self.loader = partial(read_array, in_chans=in_chans)  # picklable for workers
            check_channels(self.paths[0], in_chans)
            if getattr(transform, "image_only", None):
                print(f"note: {transform.image_only} applies to RGB images only: the .npy arrays of {root} get "
                      f"crop, flip and random erasing without it")
        elif in_chans not in STATS:
            raise SettingError(f"`in_chans` {in_chans} needs .npy arrays (C, H, W), but {root} holds images: pass "
                               f"`in_chans` 3 (RGB) or 1 (grayscale), or convert them")
        else:
            self.loader = partial(load_image, mode="RGB" if in_chans == 3 else "L")
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
        return Labelled(image, label, skipped)


class SplitSubset(Subset):
    """A part of a SkippingImageFolder (a held-out split, or the rest of it): an unreadable file
    is replaced by the next file of the same part, never by one of another part (a training
    image in validation). Items and `skipped` counts as the folder's own."""

    def __getitem__(self, index):
        folder = self.dataset
        (image, label), skipped = read_or_skip(lambda i: folder.read(self.indices[i]), index, len(self),
                                               lambda i: folder.paths[self.indices[i]], folder.strict)
        return Labelled(image, label, skipped)

    def __getitems__(self, indices):
        return [self[i] for i in indices]


def left_out_note(folder):
    """One line about the files of a SkippingImageFolder's root that no class folder holds (they
    have no label, so they are left out), or None."""
    if not folder.loose:
        return None
    n, first = len(folder.loose), folder.loose[0]
    return (f"note: {n} file{'s' * (n > 1)} directly in {folder.root} ({first}{', ...' * (n > 1)}) {'are' if n > 1 else 'is'} "
            f"left out: a file's class is the folder it is in; move {'them' if n > 1 else 'it'} into a class folder")


def image_folder(root, split, transform, in_chans=3, strict=False, cache=None):
    """`root/split` as an ImageFolder (or `root` itself when it has no `split` folder and
    split is "val", so `fcmae eval --data DIR` also takes a bare class-folder tree). `cache`: a
    folder to keep the file listing in, None to list the folder every time."""
    root = Path(root)
    if not root.is_dir():
        raise SettingError(f"`data` {root} is not a directory: pass a folder holding train/ and val/ class folders")
    folder = root / split
    if not folder.is_dir():
        if split == "val" and any(p.is_dir() for p in root.iterdir()) and not (root / "train").is_dir():
            folder = root
        else:
            raise SettingError(f"`data` {root} has no {split}/ folder: expected {root}/{split}/<class>/<image>")
    try:
        return SkippingImageFolder(str(folder), transform, in_chans, strict, cache)
    except (FileNotFoundError, RuntimeError) as e:
        # e.g. an empty class folder: it would shift every label after it, so it is an error here
        raise SettingError(f"{folder}: {str(e).splitlines()[0]}: put images in one folder per class") from None


def check_classes(train, val):
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:3]
        raise SettingError(f"train/ has {len(train.classes)} classes and val/ {len(val.classes)}, differing in "
                           f"{', '.join(only) or 'order'}: both need the same class folders")


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
            raise SettingError(f"{list_file} holds out {len(missing)} file(s) no longer in {root} (e.g. {missing[0]}): "
                               f"put them back, or start over with `no_resume` or another `output`")
        held = sorted(index[p] for p in held_names)
        held_set = set(held)
        return [i for i in range(len(paths)) if i not in held_set], held
    counts = torch.bincount(torch.as_tensor(dataset.targets), minlength=len(dataset.classes))
    few = [name for name, n in zip(dataset.classes, counts.tolist()) if n < 2]
    if few:
        raise SettingError(f"{root}: class{'es' * (len(few) > 1)} {', '.join(few[:10])} "
                           f"{'have' if len(few) > 1 else 'has'} fewer than 2 images, too few to hold one out for "
                           f"validation: add images, add a val/ folder, or pass `val_split` 0")
    kept, held = stratified_split(dataset.targets, fraction, seed)
    return kept, held


def write_split(list_file, dataset, held):
    """The held-out files, one path (relative to the dataset root) a line, atomically."""
    root = Path(dataset.root)
    write_atomic(list_file, "".join(f"{Path(dataset.paths[i]).relative_to(root)}\n" for i in held))


def targets(dataset):
    """Labels of an ImageFolder or a Subset of one."""
    if isinstance(dataset, Subset):
        return [dataset.dataset.targets[i] for i in dataset.indices]
    return list(dataset.targets)


def labelled_sets(data, input_size, in_chans=3, val_split=0.1, max_train=None, seed=0):
    """`data` -> (train set, val set, class names), `Labelled` items through the eval transform
    (what kNN evaluation uses). Without val/ a stratified, seeded `val_split` of train/ is the
    val set; `max_train` caps the train set (stratified, seeded). Class folders of images or of
    `.npy` arrays (any `in_chans`)."""
    check_in_chans(in_chans, data)
    check_input_size(input_size)
    root = Path(data).expanduser()
    if not (root / "train").is_dir():
        raise SettingError(f"`data` {data}: no {root / 'train'} folder: pass a folder holding train/<class>/<image> "
                           f"(and val/<class>/<image>, or a stratified split of train/ is held out)")
    transform = eval_transform(input_size, in_chans)
    train = image_folder(root, "train", transform, in_chans)
    if (root / "val").is_dir():
        val = image_folder(root, "val", transform, in_chans)
        check_classes(train, val)
    else:
        kept, held = stratified_split(train.targets, val_split, seed)
        if not held:
            raise SettingError(f"{root}/train has no class with two or more images to hold out for validation: "
                               f"add images, or a val/ folder")
        train, val = SplitSubset(train, kept), SplitSubset(train, held)
    if max_train is not None and len(train) > max_train:
        labels = targets(train)
        kept, _ = stratified_split(labels, 1 - max_train / len(labels), seed)
        train = SplitSubset(train.dataset, [train.indices[i] for i in kept]) if isinstance(train, Subset) \
            else SplitSubset(train, kept)
    classes = (train.dataset if isinstance(train, Subset) else train).classes
    return train, val, classes
