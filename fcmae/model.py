"""FCMAE: a sparse ConvNeXt V2 encoder and the light decoder, trained to reconstruct the masked
32x32 patches."""
import torch.nn as nn

from fcmae.decoders import FCMAEDecoder
from fcmae.encoders import SparseConvNeXtV2
from fcmae.encoders.convnextv2 import match_grad_strides
from fcmae.loss import masked_patch_loss
from fcmae.masking import PATCH_SIZE, check_mask_ratio, num_visible, patchify, random_mask


class FCMAE(nn.Module):
    def __init__(self, model="atto", backend="dense", in_chans=3, img_size=224, mask_ratio=0.6,
                 norm_pix_loss=True, decoder_depth=1, decoder_dim=512, drop_path_rate=0.0):
        super().__init__()
        sides = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if any(s % PATCH_SIZE for s in sides):
            raise ValueError(f"img_size {img_size} must be a multiple of {PATCH_SIZE}")
        check_mask_ratio(mask_ratio, (sides[0] // PATCH_SIZE) * (sides[1] // PATCH_SIZE))
        self.img_size, self.in_chans = sides, in_chans
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.encoder = SparseConvNeXtV2(model, in_chans, drop_path_rate, backend)
        self.decoder = FCMAEDecoder(self.encoder.num_features, decoder_dim, decoder_depth,
                                    PATCH_SIZE, in_chans)
        match_grad_strides(self)  # no gradient copies in DDP's buckets

    def forward(self, imgs, mask=None, visible_per_sample=None):
        """imgs (N, C, H, W) -> loss, pred (N, L, 32*32*C), mask (N, L) with 1 = masked.

        mask: (N, L) or (N, h, w), 1 = masked; None draws one (`random_mask`, `mask_ratio`).
        `visible_per_sample`: the visible count of every sample of a given mask when the caller
        knows it (a mask from `random_mask(..., mask_ratio)`: `num_visible(L, mask_ratio)`): the
        step then makes no host-device sync (`SparseConvNeXtV2.forward`)."""
        n, _, h, w = imgs.shape
        grid = (h // PATCH_SIZE, w // PATCH_SIZE)
        if mask is None:
            mask = random_mask(n, *grid, self.mask_ratio, device=imgs.device)
            visible_per_sample = num_visible(grid[0] * grid[1], self.mask_ratio)
        mask = mask.reshape(n, *grid).to(imgs.dtype)  # (N, h, w)
        features = self.encoder(imgs, mask, visible_per_sample)  # (N, C_last, h, w)
        pred = self.decoder(features, mask)  # (N, p*p*C, h, w)
        pred = pred.flatten(2).transpose(1, 2)  # (N, L, p*p*C)
        mask = mask.flatten(1)  # (N, L)
        loss = masked_patch_loss(pred, patchify(imgs), mask, self.norm_pix_loss)
        return loss, pred, mask
