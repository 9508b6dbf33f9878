"""The segmentation pipelines, on (image (C, H, W), mask (H, W)) pairs.

Training (`TrainTransform`) is the ADE20K pipeline of the ConvNeXt papers (mmsegmentation's):
rescale to `scale` x a ratio drawn from `ratio_range`, keeping the aspect ratio; a random crop of
`crop_size` in which one class covers at most `cat_max_ratio` of the labelled pixels (up to 10
tries); a horizontal flip; for RGB images the photometric distortion; normalization; padding to
`crop_size` (image 0, mask IGNORE). Evaluation (`EvalTransform`) only normalizes: the image keeps
its size, and inference (fcmae.segmenter.infer) rescales it to the evaluation scale and the logits back.

Images are uint8 (normalized with fcmae.data.transforms' STATS) or float arrays (used as stored, no
photometric distortion). Random draws come from torch's global generator, which the loader seeds
per item (fcmae.data.modules.SeededItems).
"""
import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from fcmae.data.transforms import ToFloat
from fcmae.labelmaps import IGNORE
from fcmae.segmenter import rescale_size


def uniform(low, high):
    return low + (high - low) * float(torch.rand(()))


def coin():
    return bool(torch.rand(()) < 0.5)


def crop_box(mask, crop_size, cat_max_ratio=0.75, tries=10):
    """(top, left) of a random crop_size x crop_size window of `mask` (H, W) in which no class
    covers cat_max_ratio or more of the labelled pixels, IGNORE aside (the last try if none does)."""
    h, w = mask.shape
    for _ in range(tries):
        top = int(torch.randint(0, max(h - crop_size, 0) + 1, ()))
        left = int(torch.randint(0, max(w - crop_size, 0) + 1, ()))
        if cat_max_ratio >= 1:
            break
        labels, counts = mask[top:top + crop_size, left:left + crop_size].unique(return_counts=True)
        counts = counts[labels != IGNORE]
        if len(counts) > 1 and counts.max() < cat_max_ratio * counts.sum():
            break
    return top, left


def photometric_distortion(image, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
    """mmsegmentation's PhotoMetricDistortion on a uint8 RGB image (3, H, W): each step with
    probability 1/2, clipped to uint8 after each: add U(-brightness, brightness); multiply by
    U(contrast) before or after (at random) scaling HSV saturation by U(saturation) and shifting
    the hue by an integer in [-hue, hue] of 180 (OpenCV's hue units: 18 = 36 degrees)."""
    def convert(x, alpha=1.0, beta=0.0):
        return (x.float() * alpha + beta).clamp_(0, 255).to(torch.uint8)

    if coin():
        image = convert(image, beta=uniform(-brightness, brightness))
    contrast_first = coin()
    if contrast_first and coin():
        image = convert(image, alpha=uniform(*contrast))
    scale = uniform(*saturation) if coin() else None
    shift = int(torch.randint(-hue, hue + 1, ())) if coin() else None
    if scale is not None or shift is not None:
        hsv = np.array(Image.fromarray(image.permute(1, 2, 0).numpy()).convert("HSV"))  # (H, W, 3), H in 0..255
        if scale is not None:
            hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * scale, 0, 255).astype(np.uint8)
        if shift is not None:
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(shift * 256 / 180)) % 256
        image = torch.from_numpy(np.array(Image.fromarray(hsv, "HSV").convert("RGB"))).permute(2, 0, 1).contiguous()
    if not contrast_first and coin():
        image = convert(image, alpha=uniform(*contrast))
    return image


class TrainTransform:
    """(image (C, H, W) uint8 or float, mask (H, W) uint8) -> (image (C, S, S) float32, mask
    (S, S) int64), S = crop_size. `scale`: (long, short), default (4 S, S), ADE20K's 2048 x 512 at
    S = 512; `norm`: (mean, std) for uint8 images, None for arrays (fcmae.data.transforms.normalization)."""

    def __init__(self, crop_size=512, scale=None, ratio_range=(0.5, 2.0), cat_max_ratio=0.75, norm=None):
        self.crop_size, self.scale = crop_size, tuple(scale or (4 * crop_size, crop_size))
        self.ratio_range, self.cat_max_ratio = tuple(ratio_range), cat_max_ratio
        self.to_float = ToFloat(norm)

    def __call__(self, image, mask):
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask[None])  # mask (1, H, W)
        ratio = uniform(*self.ratio_range)
        size = rescale_size(*image.shape[-2:], (self.scale[0] * ratio, self.scale[1] * ratio))
        image = F.resize(image, list(size), InterpolationMode.BILINEAR, antialias=False)
        mask = F.resize(mask, list(size))  # nearest for masks
        s = self.crop_size
        top, left = crop_box(mask[0], s, self.cat_max_ratio)
        h, w = min(s, size[0]), min(s, size[1])  # a side shorter than the crop is padded below
        image, mask = F.crop(image, top, left, h, w), F.crop(mask, top, left, h, w)
        if coin():
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        if image.dtype == torch.uint8 and image.shape[0] == 3:
            image = photometric_distortion(image.as_subclass(torch.Tensor))
        image = self.to_float(image)
        pad = [0, 0, s - image.shape[-1], s - image.shape[-2]]  # left, top, right, bottom
        image = F.pad(image, pad, fill=0)
        mask = F.pad(mask.as_subclass(torch.Tensor), pad, fill=IGNORE)
        return image, mask[0].long()


class EvalTransform:
    """(image, mask) -> (image (C, H, W) float32 normalized as in training, mask (H, W) int64),
    both at the file's own size."""

    def __init__(self, norm=None):
        self.to_float = ToFloat(norm)

    def __call__(self, image, mask):
        return self.to_float(image), mask.long()
