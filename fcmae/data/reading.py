"""Reading one sample file: images (decoded fully, converted to RGB or grayscale) and `.npy`
arrays (C, H, W), and what happens to a file that cannot be read.

Images are read as RGB or grayscale ("L"); grayscale, RGBA, palette, CMYK and 16-bit images are
converted (`convert_image`). `.npy` arrays (C, H, W) serve any channel count: uint8 arrays are
scaled to [0, 1], other dtypes are used as stored (`read_array`). A file that cannot be read
(corrupt, truncated, not an image, over Pillow's decompression-bomb limit) raises `BadFile`
naming it; `read_or_skip` replaces it by the next file that reads and counts how many it skipped,
or with `strict` stops with one line. Skipped files are named in a warning and listed in the file
that the environment variable FCMAE_SKIPPED_FILES names (a training run sets it to its
skipped_files.txt), so they are not lost when warnings are filtered. FCMAE_MAX_IMAGE_PIXELS=N
raises Pillow's pixel limit. Why these rules and what they cost: docs/internals.md.
"""
import io
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.io import ImageReadMode, decode_jpeg

from fcmae.errors import SettingError

ARRAY_EXTENSIONS = (".npy",)
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
# by the JPEG decoder itself (Image.draft): the largest reduction that keeps DRAFT_SIDE on both sides.
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
    `strict`: the first bad file is a SettingError instead."""
    for skipped in range(min(size, MAX_SKIP)):
        i = (index + skipped) % size
        try:
            return read(i), skipped
        except BadFile as e:
            if strict:
                raise SettingError(f"unreadable file {e}: fix or remove it, or drop `strict_data` to skip "
                                   f"bad files with a warning") from None
            note_skipped(e)
    raise SettingError(f"{min(size, MAX_SKIP)} files in a row from {path_of(index)} cannot be read: "
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


def holds_arrays(paths, where):
    """Whether the files of `paths` (a PathList) are .npy arrays rather than images; a folder
    mixing both is refused, naming it as `where`."""
    is_array = np.zeros(len(paths), bool)
    for extension in ARRAY_EXTENSIONS:
        is_array |= paths.has_suffix(extension)
    if is_array.any() and not is_array.all():
        raise SettingError(f"{where} mixes images and .npy arrays: keep one kind per data folder")
    return bool(len(paths)) and bool(is_array[0])


def check_channels(path, in_chans):
    """The first array of a folder against `in_chans`, up front: one line, not a skipped file each."""
    try:
        c = read_array(path).shape[0]
    except BadFile as e:
        raise SettingError(f"unreadable array {e}") from None
    if c != in_chans:
        raise SettingError(f"{path} has {c} channels but `in_chans` is {in_chans}: pass `in_chans` {c}")
