"""FCMAE masks: random at the last stage (one entry per 32x32 image patch), upsampled to the
earlier stages by repetition (`fcmae.encoders.upsample_mask`); patchify/unpatchify."""
import torch

from fcmae.encoders.sparse_convnextv2 import upsample_mask

__all__ = ["PATCH_SIZE", "num_visible", "patchify", "random_mask", "unpatchify", "upsample_mask"]

PATCH_SIZE = 32  # the encoder's total stride: one mask entry per last-stage position


def num_visible(num_patches, mask_ratio):
    return int(num_patches * (1 - mask_ratio))


def random_mask(n, h, w, mask_ratio, device=None, generator=None):
    """(N, h, w) with exactly int(h*w*(1 - ratio)) zeros (visible) per sample, 1 = masked."""
    num_patches = h * w
    keep = num_visible(num_patches, mask_ratio)
    if not 0 <= mask_ratio < 1 or keep < 1:
        raise ValueError(f"mask ratio {mask_ratio} leaves no visible patch of {num_patches}: use a ratio in [0, 1)")
    noise = torch.rand(n, num_patches, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # each position's rank among its sample's noise
    return (ranks >= keep).float().view(n, h, w)


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
