"""Unlabelled sources for pre-training: what `data` names (the built-in demo images, or a folder)
as a dataset of (sample, files skipped), sample a PIL image or a (C, H, W) tensor.

A folder is read as `DATA/train/<class>/<file>` (the ImageNet-1K layout: train/ only, labels
ignored), `DATA/<class>/<file>`, or any tree of files (`DATA/<file>` beside `DATA/<sub>/.../<file>`:
all of them), images or `.npy` arrays, one kind per folder (fcmae/data/reading.py reads each file). WebDataset shards are fcmae/data/shards.py's.
"""
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from fcmae.data.filelist import PathList, cached_listing, is_dir
from fcmae.data.reading import (ARRAY_EXTENSIONS, BadFile, check_channels, holds_arrays, load_image, read_array,
                                read_image, read_or_skip, reason)
from fcmae.errors import SettingError

DEMO_IMAGES = 1024  # procedural images in the demo source


class DemoImages(Dataset):
    """Procedural images: a colour gradient with a few filled shapes and stripes.

    Cheap to draw, different per index, and structured enough that the reconstruction loss
    falls within minutes. Image i is a pure function of i.
    """

    def __init__(self, num=DEMO_IMAGES, size=128, in_chans=3):
        self.num, self.size, self.mode = num, size, "L" if in_chans == 1 else "RGB"

    def __len__(self):
        return self.num

    def __getitem__(self, index):
        rng = np.random.default_rng(index)
        s = self.size
        # background: a linear gradient between two colours at a random angle
        a = rng.uniform(0, 2 * math.pi)
        ramp = np.cos(a) * np.linspace(0, 1, s)[None, :] + np.sin(a) * np.linspace(0, 1, s)[:, None]
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)  # (s, s) in [0, 1]
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = Image.fromarray((c0 + ramp[..., None] * (c1 - c0)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(2, 6)):
            x0, y0 = rng.integers(-s // 4, s, 2)
            w, h = rng.integers(s // 6, s // 2, 2)
            box, colour = [int(x0), int(y0), int(x0 + w), int(y0 + h)], tuple(int(c) for c in rng.integers(0, 256, 3))
            kind = rng.integers(3)
            if kind == 0:
                draw.ellipse(box, fill=colour)
            elif kind == 1:
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
        period = int(rng.integers(6, 16))  # stripes across one band of the image
        y = int(rng.integers(0, s - s // 4))
        for x in range(0, s, period):
            draw.line([(x, y), (x + s // 8, y + s // 4)], fill=(255, 255, 255), width=2)
        return img.convert(self.mode), 0  # (sample, files skipped): never any here


class FileSamples(Dataset):
    """Image files (PIL, RGB or L) or .npy arrays (C, H, W tensors), one sample per file:
    index -> (sample, files skipped to find a readable one). `paths`: a `PathList` (or any
    sequence of paths, stored as one), so forked loader workers share it (fcmae/data/filelist.py)."""

    def __init__(self, paths, in_chans, strict=False):
        self.paths = paths if isinstance(paths, PathList) else PathList.from_paths(paths)
        self.in_chans, self.strict = in_chans, strict
        self.arrays = self.paths[0].suffix.lower() in ARRAY_EXTENSIONS

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        path = self.paths[index]
        mode = "L" if self.in_chans == 1 else "RGB"
        if self.arrays:
            return read_array(path, self.in_chans)
        if path.suffix.lower() in (".jpg", ".jpeg"):  # most datasets: the faster decoder
            try:
                data = path.read_bytes()
            except OSError as e:
                raise BadFile(f"{path} ({reason(e)})") from e
            return read_image(data, mode, path)
        return load_image(path, mode)

    def __getitem__(self, index):
        return read_or_skip(self.read, index, len(self), self.paths.__getitem__, self.strict)


def list_files(root, cache=None):
    """The sample files of a folder (a PathList): with class folders only, the files under each
    (labelled by class, as torchvision's ImageFolder); otherwise every file of the folder tree,
    its top level and all its subfolders (unlabelled): `photos/*.jpg` beside `photos/thumbs/*.jpg`
    is read whole. `cache`: a folder to keep the listing in (fcmae.data.filelist.cached_listing)."""
    extensions = IMG_EXTENSIONS + ARRAY_EXTENSIONS

    def scan(listing):
        # Not only regular files: a broken symlink is listed too, to be skipped with a warning by name.
        def sample(name):
            return suffix(name) in extensions

        if any(not is_dir(e) and sample(e.name) for e in listing.read_dir("") or ()):
            listing.add_tree("", sample)
            return
        try:
            _, class_to_idx = find_classes(listing.root)
        except FileNotFoundError:
            return  # no class folders
        # Labels are not used: an empty class folder is harmless here (allow_empty).
        listing.add_classes(class_to_idx, extensions, allow_empty=True)
    return cached_listing(root, f"samples-tree:{','.join(extensions)}", scan, cache)


def suffix(name):
    """Path(name).suffix.lower(), without building a Path for each of millions of names."""
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


def find_source(data, in_chans, input_size, strict=False, cache=None):
    """`data` ("demo" or a folder) -> (dataset of (PIL image or tensor, files skipped), whether its
    samples are .npy arrays). `cache`: a folder to keep the file listing in, None to list it every time."""
    if data == "demo":
        if in_chans not in (1, 3):
            raise SettingError(f"`data` demo makes RGB or grayscale images, not {in_chans} channels: "
                               f"use `in_chans` 1 or 3, or point `data` at .npy arrays")
        return DemoImages(size=input_size * 4 // 3, in_chans=in_chans), False
    root = Path(data).expanduser()
    if not root.is_dir():
        raise SettingError(f"data folder '{data}' does not exist: pass `data` DIR (DIR/train/<class>/<image>, "
                           f"or a folder of images) or `data` demo")
    if (root / "train").is_dir():
        root = root / "train"  # ImageNet-1K: pre-training reads train/ only
    elif (root / "val").is_dir():  # an ImageNet-style root without train/: do not train on val/
        raise SettingError(f"'{data}' has val/ but no train/ folder: pre-training expected "
                           f"{root / 'train'}/<class>/<image>")
    paths = list_files(root, cache)
    if not len(paths):
        raise SettingError(f"no images or .npy files in '{root}': expected DIR/train/<class>/<image>, "
                           f"DIR/<class>/<image> or images directly in DIR")
    arrays = holds_arrays(paths, f"'{data}'")
    if not arrays and in_chans not in (1, 3):
        raise SettingError(f"`in_chans` {in_chans} needs .npy arrays (C, H, W), one per sample, but '{data}' holds "
                           f"images: convert them, or use `in_chans` 3 (RGB) or 1 (grayscale)")
    if arrays:
        check_channels(paths[0], in_chans)
    return FileSamples(paths, in_chans, strict), arrays
