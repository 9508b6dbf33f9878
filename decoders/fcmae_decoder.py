"""The light FCMAE decoder: 1x1 projection, mask token at masked positions, ConvNeXt V2 blocks,
1x1 head to the pixels of one patch per position."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from fcmae.encoders.convnextv2 import Block, init_weights
from fcmae.masking import PATCH_SIZE


class FCMAEDecoder(nn.Module):
    def __init__(self, in_dim, decoder_dim=512, decoder_depth=1, patch_size=PATCH_SIZE, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.blocks = nn.Sequential(*[Block(decoder_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_dim, patch_size * patch_size * in_chans, kernel_size=1)
        self.apply(init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x, mask):
        """x (N, C_enc, h, w) encoder features, mask (N, h, w) 1 = masked -> (N, p*p*C_in, h, w),
        channels-last in memory (so that the model's (N, L, p*p*C_in) view of it is contiguous)."""
        x = self.proj(x)
        m = mask.unsqueeze(1).to(x.dtype)  # (N, 1, h, w)
        x = x * (1 - m) + self.mask_token * m
        x = self.blocks(x)  # (N, D, h, w), channels-last from the blocks' depthwise conv on
        # The 1x1 head as a matrix product on the channels-last rows: torch runs a 1x1 conv on
        # channels-first maps through its slow generic kernel on CPU.
        out = F.linear(x.permute(0, 2, 3, 1), self.pred.weight.flatten(1), self.pred.bias)  # (N, h, w, p*p*C)
        return out.permute(0, 3, 1, 2)
