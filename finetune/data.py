"""Labeled data: an ImageFolder root with train/ and val/ (one folder per class, ImageNet's
layout), and the release's transforms built by timm. Images are converted as for pre-training
(`fcmae.data.convert_image`); an unreadable file is skipped with a warning naming it (the next
one stands in), and each item carries how many were skipped: (image, label, files skipped).

Class folders may hold `.npy` arrays (C, H, W) instead of images, for any channel count, read as
in pre-training (`fcmae.data.read_array`: uint8 scaled to [0, 1], float as stored, no
normalization). The transforms take both: a PIL image goes through timm's (normalized), a tensor
through the same geometry on tensors (crop, flip, random erasing; RandAugment is for RGB images
only)."""
import os
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import VisionDataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode, v2

from fcmae.data import ARRAY_EXTENSIONS, BadFile, load_image, read_array, read_or_skip, seeded
from fcmae.datamodule import ResumableSampler, resume_position
from fcmae.errors import UserError
from fcmae.filelist import list_classes
from fcmae.preemption import worker_init

# Grayscale data is normalized with the mean of ImageNet's channel statistics.
STATS = {3: (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
         1: ((sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,))}


def check_in_chans(in_chans, data=None):
    """Images give 3 or 1 channels; any other count needs .npy arrays (looked for in `data`, cheaply:
    the first file of its first class folder)."""
    if in_chans < 1:
        raise UserError(f"--in-chans {in_chans}: must be at least 1")
    if in_chans not in STATS and not (data and holds_arrays(data)):
        raise UserError(f"--in-chans {in_chans}: image folders give 3 (RGB) or 1 (grayscale) channels: pass 3 or 1, "
                        f"or use class folders of .npy arrays ({in_chans}, H, W)")


def holds_arrays(data):
    """Whether the first file of the first class folder of DATA/train (or DATA/val, or DATA) is .npy."""
    root = Path(data)
    for folder in (root / "train", root / "val", root):
        if folder.is_dir():
            classes = sorted(e.path for e in os.scandir(folder) if e.is_dir())
            if classes:
                files = sorted(e.name for e in os.scandir(classes[0]) if not e.is_dir())
                return bool(files) and Path(files[0]).suffix.lower() in ARRAY_EXTENSIONS
    return False


class ImageOrArray:
    """One transform for both kinds of sample: a tensor (an array) goes through `array`, anything
    else (a PIL image) through `image`. `image_only`: what `image` does that `array` leaves out."""

    def __init__(self, image, array, image_only=None):
        self.image, self.array, self.image_only = image, array, image_only

    def __call__(self, x):
        return self.array(x) if isinstance(x, torch.Tensor) else self.image(x)

    @property
    def transforms(self):
        """The image pipeline's steps (timm's Compose)."""
        return self.image.transforms

    def __repr__(self):
        return f"ImageOrArray(image={self.image}, array={self.array})"


def train_transform(input_size, in_chans=3, aa="rand-m9-mstd0.5-inc1", reprob=0.25):
    """RandomResizedCrop + flip + RandAugment + random erasing, bicubic (the release's recipe);
    aa None and reprob 0 leave crop + flip (MAE's linear-probe augmentation). Arrays (tensors):
    the same crop, flip and erasing, without RandAugment (its operations are defined on RGB images)."""
    arrays = v2.Compose([
        v2.RandomResizedCrop(input_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomErasing(p=reprob, value="random")])  # timm's re_mode="pixel": per-pixel normal noise
    if in_chans not in STATS:
        return ImageOrArray(None, arrays, f"--aa {aa}" if aa else None)
    mean, std = STATS[in_chans]
    transform = create_transform(input_size, is_training=True, color_jitter=None, auto_augment=aa or None,
                                 interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
                                 mean=mean, std=std)
    for t in transform.transforms:
        for op in getattr(t, "ops", ()):  # timm's RandAugment
            if op.aug_fn is timm_posterize:
                op.aug_fn = posterize
    return ImageOrArray(transform, arrays, f"--aa {aa}" if aa else None)


timm_posterize = auto_augment.posterize


def posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, except that keeping 0 bits gives a black image, as Pillow < 13 did:
    Pillow 13 raises instead, and "inc1" asks for 0 bits at magnitude 10 (9 + noise)."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_posterize(img, bits_to_keep, **kwargs)


def eval_transform(input_size, in_chans=3, crop_pct=None):
    """Resize to input_size / crop_pct and center-crop (crop_pct 224/256 below 384 px); from 384
    px up the release resizes straight to input_size, without cropping. Arrays (tensors): the same
    resize and crop on the tensor, no normalization."""
    if crop_pct is None:
        crop_pct = 224 / 256 if input_size < 384 else 1.0
    crop_mode = "squash" if crop_pct == 1.0 else "center"
    bicubic = dict(interpolation=InterpolationMode.BICUBIC, antialias=True)
    if crop_mode == "squash":
        arrays = v2.Resize((input_size, input_size), **bicubic)
    else:  # timm's: the shorter side to floor(input_size / crop_pct), then the center crop
        arrays = v2.Compose([v2.Resize(int(input_size / crop_pct), **bicubic), v2.CenterCrop(input_size)])
    if in_chans not in STATS:
        return ImageOrArray(None, arrays)
    mean, std = STATS[in_chans]
    return ImageOrArray(create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                                         crop_mode=crop_mode, mean=mean, std=std), arrays)


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
        self.classes = self.paths.classes
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = self.paths.labels
        is_array = self.paths.has_suffix(ARRAY_EXTENSIONS[0])
        if is_array.any() and not is_array.all():
            raise UserError(f"{root} mixes images and .npy arrays: keep one kind per data folder")
        self.arrays = bool(is_array.all())
        if self.arrays:
            self.loader = partial(read_array, in_chans=in_chans)  # picklable for workers
            check_channels(self.paths[0], in_chans)
            if getattr(transform, "image_only", None):
                print(f"note: {transform.image_only} applies to RGB images only: the .npy arrays of {root} get "
                      f"crop, flip and random erasing without it")
        elif in_chans not in STATS:
            raise UserError(f"--in-chans {in_chans} needs .npy arrays (C, H, W), but {root} holds images: pass "
                            f"--in-chans 3 (RGB) or 1 (grayscale), or convert them")
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
        return image, label, skipped


def check_channels(path, in_chans):
    """The first array of a folder against --in-chans: a one-line error (as pre-training's)."""
    try:
        c = read_array(path).shape[0]
    except BadFile as e:
        raise UserError(f"unreadable array {e}") from None
    if c != in_chans:
        raise UserError(f"{path} has {c} channels but --in-chans is {in_chans}: pass --in-chans {c}")


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


def loader(dataset, batch_size, workers, train, sampler=None, generator=None):
    # Full batches in training: Mixup/CutMix pair samples within a batch and needs it even.
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0, generator=generator,
                      worker_init_fn=worker_init)  # a scheduler's signal stops the run, not its workers


class SeededItems(Dataset):
    """Key `epoch * len(dataset) + index` -> dataset[index], its augmentation drawn from RNGs
    seeded by (seed, key) (`fcmae.data.seeded`): the same crop, flip, RandAugment and erasing
    for that image in that epoch in any process, so neither a resume nor the number of loader
    workers changes them."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        with seeded(self.seed * 1_000_003 + key):
            return self.dataset[key % len(self.dataset)]


class FinetuneData(L.LightningDataModule):
    """The fine-tuning loaders, sharded per rank here (the Trainer needs
    use_distributed_sampler=False). Training: each rank's share of a permutation per (seed,
    epoch) (`ResumableSampler`, as pre-training's) in full batches, items from `SeededItems`; a
    resumed run starts where the interrupted one stopped, inside its epoch, and sees the batches
    it would have seen. Validation: in order, each rank a share (padded to equal length)."""

    def __init__(self, train, val, batch_size, workers, seed=0):
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.workers, self.seed = batch_size, workers, seed

    def batches_per_epoch(self, world_size):
        """Full training batches one rank gets per epoch (drop_last)."""
        return len(self.train) // world_size // self.batch_size

    def train_dataloader(self):
        trainer = self.trainer
        sampler = ResumableSampler(len(self.train), trainer.world_size, trainer.global_rank, self.seed)
        epoch, batches_done = resume_position(trainer, self.batches_per_epoch(trainer.world_size))
        sampler.set_epoch(epoch)
        sampler.skip = batches_done * self.batch_size
        # It resumes inside the epoch itself; Lightning cannot see that and would warn.
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
        return loader(SeededItems(self.train, self.seed), self.batch_size, self.workers, train=True,
                      sampler=sampler, generator=self.generator())

    def val_dataloader(self):
        if self.val is None:  # --val-split 0: train on everything, no validation
            return []
        trainer = self.trainer
        sampler = None
        if trainer.world_size > 1:
            sampler = DistributedSampler(self.val, trainer.world_size, trainer.global_rank, shuffle=False)
        return loader(self.val, self.batch_size, self.workers, train=False, sampler=sampler, generator=self.generator())

    def generator(self):
        """A loader's own generator: each new iterator draws its workers' seed from it, not from
        the global RNG whose state the checkpoint keeps (FinetuneModule). With persistent workers
        a resumed run makes its iterators at other points than an uninterrupted one."""
        return torch.Generator().manual_seed(self.seed)


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
