"""FCMAE masks: the one home of the patch size (and of the input sizes it allows), of drawing a
mask, of its ratio's validation and of its upsampling to the encoder's stages; patchify/unpatchify.

A mask lives on the encoder's last stage: one entry per PATCH_SIZE x PATCH_SIZE image patch,
1 = masked. The earlier stages see it repeated (`upsample_mask`, `stage_visibility`). This module
imports no model code: the encoders import it, never the reverse.
"""
import torch

from fcmae.errors import SettingError

__all__ = ["PATCH_SIZE", "check_input_size", "check_mask_ratio", "num_visible", "patchify", "random_mask",
           "stage_visibility", "unpatchify", "upsample_mask"]

PATCH_SIZE = 32  # the encoder's total stride (stem 4 x three 2x downsamplings): one mask entry per last-stage position
STAGE_STRIDES = (4, 8, 16, 32)


def num_visible(num_patches, mask_ratio):
    return int(num_patches * (1 - mask_ratio))


def check_input_size(size, suggest=None):
    """Raise SettingError (a ValueError) unless an image side of `size` pixels is a positive
    multiple of PATCH_SIZE, the encoder's total stride. The fix it names: `suggest`, else the
    nearest multiple."""
    if size < PATCH_SIZE or size % PATCH_SIZE:
        nearest = max(PATCH_SIZE, round(size / PATCH_SIZE) * PATCH_SIZE)
        fix = f"pass e.g. {suggest}" if suggest else f"use e.g. {nearest}"
        raise SettingError(f"`input_size` {size} is not a multiple of {PATCH_SIZE}: {fix}")


def check_mask_ratio(ratio, num_patches, *, training=True, image=None):
    """Raise SettingError (a ValueError, one line) unless `ratio` leaves a visible patch of
    `num_patches` and, for `training`, masks one too (the loss is over the masked patches):
    0 < ratio < 1 there, 0 <= ratio < 1 otherwise. `image` (e.g. "a 64px crop") says where."""
    low_ok = ratio > 0 if training else ratio >= 0
    if not (low_ok and ratio < 1):
        interval = "(0, 1)" if training else "[0, 1)"
        raise SettingError(f"`mask_ratio` {ratio} is outside {interval}: pass the fraction of patches to mask, e.g. "
                           f"0.6 (the paper's); it must be in {interval} so that some patches are masked and some "
                           f"visible")
    if num_visible(num_patches, ratio) < 1:
        where = f" in {image}" if image else ""
        raise SettingError(f"`mask_ratio` {ratio} leaves no visible patch of the {num_patches}{where}: "
                           f"use a lower ratio or larger images")


def random_mask(n, h, w, mask_ratio, device=None, generator=None):
    """(N, h, w) with exactly int(h*w*(1 - ratio)) zeros (visible) per sample, 1 = masked."""
    num_patches = h * w
    check_mask_ratio(mask_ratio, num_patches, training=False)
    keep = num_visible(num_patches, mask_ratio)
    noise = torch.rand(n, num_patches, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # each position's rank among its sample's noise
    return (ranks >= keep).float().view(n, h, w)


def upsample_mask(mask, scale):
    """(N, h, w) -> (N, h*scale, w*scale) by repetition: a masked patch covers a
    (PATCH_SIZE/stride)^2 block of every stage."""
    return mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def stage_visibility(mask):
    """Last-stage mask (N, H/32, W/32), 1 = masked -> visible (bool) per stage, strides 4..32."""
    visible = mask == 0
    return [upsample_mask(visible, PATCH_SIZE // stride) for stride in STAGE_STRIDES]


def patchify(imgs, p=PATCH_SIZE):
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order, pixels ordered (row, col, chan)."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x, h, w, c, p=PATCH_SIZE):
    """(N, L, p*p*C) -> (N, C, H, W) for an image of H x W = h*p x w*p."""
    n = x.shape[0]
    x = x.reshape(n, h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, h * p, w * p)
