"""The light FCMAE decoder: 1x1 projection, mask token at masked positions, ConvNeXt V2 blocks,
1x1 head to the pixels of one patch per position."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from fcmae.encoders.convnextv2 import Block, init_weights
from fcmae.masking import PATCH_SIZE


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution (an nn.Conv2d: same parameters and keys) computed as a matrix product
    over channels-last rows: torch runs a 1x1 conv on channels-first maps through its slow generic
    kernel on CPU. (N, C_in, H, W) -> (N, C_out, H, W), channels-last in memory."""

    def __init__(self, in_dim, out_dim):
        super().__init__(in_dim, out_dim, kernel_size=1)

    def forward(self, x):
        out = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)  # (N, H, W, C_out)
        return out.permute(0, 3, 1, 2)


class FCMAEDecoder(nn.Module):
    def __init__(self, in_dim, decoder_dim=512, decoder_depth=1, patch_size=PATCH_SIZE, in_chans=3):
        super().__init__()
        self.proj = PointwiseConv2d(in_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.blocks = nn.Sequential(*[Block(decoder_dim) for _ in range(decoder_depth)])
        self.pred = PointwiseConv2d(decoder_dim, patch_size * patch_size * in_chans)
        self.apply(init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x, mask):
        """x (N, C_enc, h, w) encoder features, mask (N, h, w) 1 = masked -> (N, p*p*C_in, h, w),
        channels-last in memory (so that the model's (N, L, p*p*C_in) view of it is contiguous)."""
        x = self.proj(x)
        m = mask.unsqueeze(1).to(x.dtype)  # (N, 1, h, w)
        x = x * (1 - m) + self.mask_token * m
        return self.pred(self.blocks(x))
