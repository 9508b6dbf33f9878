"""Pre-training data: unlabeled images (or arrays) -> augmented views and their FCMAE masks.

Sources (`find_source`):
- `demo`: a small procedural image set built in, so a run needs no download;
- `DATA/train/<class>/<file>`: the ImageNet-1K layout (train/ only, labels ignored);
- `DATA/<class>/<file>`: class folders without train/;
- `DATA/<file>`: a flat folder, e.g. your own unlabeled images.
- WebDataset shards (a folder with index.json, a pattern, URLs): fcmae/shards.py.

Files: images (jpg, png, tif, ...) read as RGB (`--in-chans 3`) or grayscale (`--in-chans 1`);
or `.npy` arrays (C, H, W) for any channel count: float arrays are used as stored (standardize
your bands beforehand), uint8 arrays are scaled to [0, 1]. More than 3 channels needs `.npy`.
Grayscale, RGBA, palette, CMYK and 16-bit images are converted (`convert_image`).

A file that cannot be read (corrupt, truncated, not an image, unreadable, over Pillow's
decompression-bomb limit) is skipped with a warning naming it: the next file stands in for it
(`read_or_skip`), and every sample carries how many files it skipped, so the training loop can
count them per epoch (`SkippedFiles`), whichever process loaded them. The names also go to the
file named by the environment variable FCMAE_SKIPPED_FILES (a training run sets it to
OUTPUT/skipped_files.txt), so they are not lost when warnings are filtered out. With `strict` the
first bad file is an error instead.

Very large JPEGs are decoded at a reduced scale (`DRAFT_SIDE`); other formats at full size.
Pillow refuses images of more than 2 x Image.MAX_IMAGE_PIXELS pixels (about 179 megapixels) as
decompression bombs: they are bad files here. FCMAE_MAX_IMAGE_PIXELS=N raises the limit (a
300-megapixel RGB PNG takes 900 MB in each loader process).

Every sample is addressed by a key `epoch * len(source) + index`, and its augmentation and mask
are drawn from a generator seeded by (seed, key), so a resumed run can see exactly the views and
masks the interrupted run would have seen (fcmae/datamodule.py serves them in that order).
"""
import io
import math
import os
import random
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2

from fcmae.errors import UserError
from fcmae.filelist import PathList, cached_listing, is_dir
from fcmae.masking import PATCH_SIZE, random_mask

ARRAY_EXTENSIONS = (".npy",)
DEMO_IMAGES = 1024  # procedural images in `--data demo`
MAX_SKIP = 100  # this many unreadable files in a row is not a stray bad file but a broken dataset
# A truncated file is a bad file: skipped (or fatal with strict), never half an image padded with
# gray. Pillow's default, set here explicitly because any imported library may flip it globally.
ImageFile.LOAD_TRUNCATED_IMAGES = False
if os.environ.get("FCMAE_MAX_IMAGE_PIXELS"):
    Image.MAX_IMAGE_PIXELS = int(os.environ["FCMAE_MAX_IMAGE_PIXELS"])
# What Pillow raises for a file it cannot read; the bomb warning is raised too when warnings are
# errors (between 1x and 2x MAX_IMAGE_PIXELS), the bomb error always above 2x.
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning)
SKIPPED_FILES_ENV = "FCMAE_SKIPPED_FILES"
# A JPEG with a shorter side of 2 x DRAFT_SIDE pixels or more is decoded at 1/2, 1/4 or 1/8 scale
# by the JPEG decoder itself (Image.draft): the largest reduction that keeps DRAFT_SIDE on both
# sides. A 100-megapixel photo takes 75 MB or less instead of 300 MB, and crops of it resized to
# training sizes lose nothing.
DRAFT_SIDE = 2048


# ----------------------------------------------------------------------------- reading files

class BadFile(Exception):
    """A sample file that cannot be read; the message names it."""


class BadFileWarning(UserWarning):
    pass


def convert_image(img, mode="RGB"):
    """A PIL image of any mode -> `mode` ("RGB" or "L"), with the values kept right where
    Pillow's `convert` alone would not: 16-bit images (I;16*, and I as Pillow opens 16-bit files)
    are scaled to 8 bits rather than clipped at 255; transparent pixels (RGBA, LA, palette or
    colour-key transparency) are composited on white rather than showing whatever colour they
    hide. CMYK goes through Pillow's conversion (no ICC colour management, like other loaders)."""
    if img.mode.startswith("I"):
        wide = np.asarray(img, dtype=np.float64).clip(0, 65535)
        img = Image.fromarray(np.rint(wide / 257).astype(np.uint8))  # 65535 -> 255
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert(mode)


def load_image(path, mode="RGB", name=None):
    """Read and decode one image file (a path or a file object) fully (a very large JPEG at a
    reduced scale: DRAFT_SIDE), or raise BadFile naming it (`name`, default the path)."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG" and min(img.size) >= 2 * DRAFT_SIDE:
                img.draft(img.mode, (DRAFT_SIDE, DRAFT_SIDE))
            img.load()  # decode now: a truncated or corrupt file fails here, not in a transform
            return convert_image(img, mode)
    except PIL_ERRORS as e:
        raise BadFile(f"{name or path} ({reason(e)})") from e


def read_image(data, mode="RGB", name="image"):
    """Image file bytes -> the image, decoded fully: a uint8 tensor (C, H, W) for a JPEG already
    in `mode` (torchvision's decode_jpeg: the same pixels as Pillow, faster, and no PIL-to-tensor
    copy after it), else a PIL image converted as `load_image` does. BadFile names it."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            fast = img.format == "JPEG" and img.mode == mode and min(img.size) < 2 * DRAFT_SIDE
    except PIL_ERRORS as e:
        raise BadFile(f"{name} ({reason(e)})") from e
    if not fast:
        return load_image(io.BytesIO(data), mode, name)
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           mode=ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY)
    except RuntimeError as e:  # corrupt or truncated
        raise BadFile(f"{name} ({reason(e)})") from e


def reason(e):
    # Without object addresses ("<_io.BytesIO object at 0x7f...>"): the same file, the same words.
    text = re.sub(r" at 0x[0-9a-f]+>", ">", str(e).splitlines()[0][:160]) if str(e) else ""
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def read_or_skip(read, index, size, path_of, strict=False):
    """(read(i), files skipped) for the first i = index, index + 1, ... (mod size) that reads:
    a bad file is replaced by the next one, the same one in every process and on every rerun.
    `strict`: the first bad file is a UserError instead."""
    for skipped in range(min(size, MAX_SKIP)):
        i = (index + skipped) % size
        try:
            return read(i), skipped
        except BadFile as e:
            if strict:
                raise UserError(f"unreadable file {e}: fix or remove it, or drop --strict-data to skip "
                                f"bad files with a warning") from None
            note_skipped(e)
    raise UserError(f"{min(size, MAX_SKIP)} files in a row from {path_of(index)} cannot be read: "
                    f"check the data folder (the warnings name them)")


_noted = set()  # files this process has written to the skipped-files list


def note_skipped(e, what="file"):
    """Name a skipped file (BadFile `e`): a warning, and a line in the file FCMAE_SKIPPED_FILES
    names, if set. Once per file and process (Python's warning registry drops repeats of a message
    too). Appending a short line with O_APPEND is one write: lines of several loader processes do
    not interleave."""
    warnings.warn(f"skipping unreadable {what} {e}", BadFileWarning, stacklevel=3)
    path = os.environ.get(SKIPPED_FILES_ENV)
    if path and str(e) not in _noted:
        _noted.add(str(e))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{e}\n".encode(errors="surrogateescape"))
            finally:
                os.close(fd)
        except OSError:  # e.g. a full disk: the list is a courtesy, not worth stopping the run for
            pass


# ----------------------------------------------------------------------------- sources

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
    sequence of paths, stored as one), so forked loader workers share it (fcmae/filelist.py)."""

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


def read_array(path, in_chans=None, name=None):
    """.npy (C, H, W) (a path or a file object) -> tensor; uint8 -> float in [0, 1], other dtypes
    -> float32 as stored. A file that does not load, or is not (in_chans, H, W), is a BadFile."""
    name = name or path
    try:
        x = torch.from_numpy(np.load(path))  # allow_pickle=False: loading never runs code
    except (OSError, ValueError, EOFError) as e:
        raise BadFile(f"{name} ({reason(e)})") from e
    if x.ndim != 3 or (in_chans is not None and x.shape[0] != in_chans):
        raise BadFile(f"{name} (array of shape {tuple(x.shape)}, expected ({in_chans or 'C'}, H, W): "
                      f"save one sample per .npy file)")
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def list_files(root, cache=None):
    """The sample files of a folder (a PathList): the files directly in it, else those of its
    class folders. `cache`: a folder to keep the listing in (fcmae.filelist.cached_listing)."""
    extensions = IMG_EXTENSIONS + ARRAY_EXTENSIONS

    def scan(listing):
        # Not only regular files: a broken symlink is listed too, to be skipped with a warning by name.
        flat = sorted(e.name for e in listing.read_dir("") or () if not is_dir(e) and suffix(e.name) in extensions)
        if flat:
            for name in flat:
                listing.add(name)
            return
        try:
            _, class_to_idx = find_classes(listing.root)
        except FileNotFoundError:
            return  # no class folders
        # Labels are not used: an empty class folder is harmless here (allow_empty).
        listing.add_classes(class_to_idx, extensions, allow_empty=True)
    return cached_listing(root, f"samples:{','.join(extensions)}", scan, cache)


def suffix(name):
    """Path(name).suffix.lower(), without building a Path for each of millions of names."""
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


def find_source(data, in_chans, input_size, strict=False, cache=None):
    """`--data` -> (dataset of (PIL image or tensor, files skipped), whether its samples are .npy arrays).
    `cache`: a folder to keep the file listing in, None to list the folder every time."""
    if data == "demo":
        if in_chans not in (1, 3):
            raise UserError(f"--data demo makes RGB or grayscale images, not {in_chans} channels: "
                            f"use --in-chans 1 or 3, or point --data at .npy arrays")
        return DemoImages(size=input_size * 4 // 3, in_chans=in_chans), False
    root = Path(data).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder '{data}' does not exist: pass --data DIR (DIR/train/<class>/<image>, "
                        f"or a folder of images) or --data demo")
    if (root / "train").is_dir():
        root = root / "train"  # ImageNet-1K: pre-training reads train/ only
    elif (root / "val").is_dir():  # an ImageNet-style root without train/: do not train on val/
        raise UserError(f"'{data}' has val/ but no train/ folder: pre-training expected {root / 'train'}/<class>/<image>")
    paths = list_files(root, cache)
    if not len(paths):
        raise UserError(f"no images or .npy files in '{root}': expected DIR/train/<class>/<image>, "
                        f"DIR/<class>/<image> or images directly in DIR")
    is_array = np.zeros(len(paths), bool)
    for extension in ARRAY_EXTENSIONS:
        is_array |= paths.has_suffix(extension)
    if is_array.any() and not is_array.all():
        raise UserError(f"'{data}' mixes images and .npy arrays: keep one kind per data folder")
    arrays = bool(is_array[0])
    if not arrays and in_chans not in (1, 3):
        raise UserError(f"--in-chans {in_chans} needs .npy arrays (C, H, W), one per sample, but '{data}' holds "
                        f"images: convert them, or use --in-chans 3 (RGB) or 1 (grayscale)")
    if arrays:
        try:
            c = read_array(paths[0]).shape[0]
        except BadFile as e:
            raise UserError(f"unreadable array {e}") from None
        if c != in_chans:
            raise UserError(f"{paths[0]} has {c} channels but --in-chans is {in_chans}: pass --in-chans {c}")
    return FileSamples(paths, in_chans, strict), arrays


# ----------------------------------------------------------------------------- views and masks

def normalization(in_chans, arrays):
    """(mean, std) applied to the view, or None: arrays are used as stored."""
    if arrays:
        return None
    if in_chans == 1:  # grayscale: the channel average of ImageNet's statistics
        return (sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,)
    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def pretrain_transform(input_size, norm):
    """The paper's augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip, on
    the uint8 image (cropped and resized before any float copy of it), then to float and
    normalized in one pass (`ToFloat`)."""
    return v2.Compose([
        v2.ToImage(),  # PIL -> uint8 tensor; tensors (decoded JPEGs, arrays) pass through as images
        v2.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        ToFloat(norm)])


class ToFloat(torch.nn.Module):
    """uint8 (C, H, W) -> float32 (x / 255 - mean) / std, as v2.ToDtype(scale=True) + v2.Normalize
    give (up to float rounding) but with one float copy instead of three. Float tensors (arrays)
    pass through as they are, normalized if `norm`."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        x = x.as_subclass(torch.Tensor).to(torch.float32, copy=True)
        if self.norm is None:
            return x.div_(scale) if scale != 1 else x
        mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) * scale for v in self.norm)
        return x.sub_(mean).div_(std)


class MaskedViews(Dataset):
    """key -> (view (C, S, S), mask (S/32, S/32) with 1 = masked), both drawn from (seed, key);
    `item(key)` also gives the files skipped to find a readable sample (the training loader's)."""

    def __init__(self, source, transform, input_size, mask_ratio, seed):
        self.source, self.transform, self.seed = source, transform, seed
        self.grid, self.mask_ratio = input_size // PATCH_SIZE, mask_ratio

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        return self.item(key)[:2]

    def item(self, key):
        sample, skipped = self.source[key % len(self.source)]
        view, mask = augment(self.transform, sample, self.grid, self.mask_ratio, self.seed * 1_000_003 + key)
        return view, mask, skipped


def augment(transform, sample, grid, mask_ratio, seed):
    """(view, mask) of one sample, both drawn from RNGs seeded with `seed` (`seeded`):
    reproducible whichever process draws them."""
    with seeded(seed):
        view = transform(sample)
        mask = random_mask(1, grid, grid, mask_ratio)[0]
    return view, mask


@contextmanager
def seeded(seed):
    """Seed the global RNGs a transform may draw from (torch's CPU generator, numpy's, Python's
    `random`: timm's draw from all three) with `seed`, and give the caller's states back after,
    so that with 0 loader workers the training process's own random stream is untouched."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed would also queue a seed for every CUDA
        # device, recording a stack trace each time (measured: about a quarter of a loader
        # process's time per view).
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
