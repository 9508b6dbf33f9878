"""The segmenter: the dense ConvNeXt V2 encoder's four stages -> UperNet -> class logits, and an
auxiliary FCN head on the third stage that only training uses (the ADE20K setup of the ConvNeXt
papers).

UperNet is segmentation_models_pytorch's decoder: a LayerNorm on each stage output, pyramid
pooling (scales 1, 2, 3, 6) on the last stage, FPN fusion of all four at 1/4 resolution,
`channels` wide. State-dict keys: `encoder.*` (the public dense layout, without the pooled
classifier's norm and head), `decoder.*`, `classifier.*`, `aux_head.*`.

Training needs two or more images per BatchNorm (per device, or per step over all devices with
SyncBatchNorm): the 1x1-pooled pyramid branch has one value per channel and image.
"""
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.base.initialization import initialize_decoder
from segmentation_models_pytorch.base.modules import Conv2dReLU
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

from fcmae.encoders import ConvNeXtV2
from fcmae.encoders.convnextv2 import match_grad_strides

CHANNELS = 512  # UperNet's width in the ConvNeXt ADE20K setup
AUX_CHANNELS = 256  # the auxiliary FCN head's
DROPOUT = 0.1  # before each classifier


def classifier(channels, num_classes, dropout=DROPOUT):
    """Dropout, then a 1x1 conv to class logits, weights N(0, 0.01) (mmseg's `cls_seg`)."""
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout), conv)


class FCNHead(nn.Sequential):
    """mmseg's FCNHead with one conv and no input concat: 3x3 conv-BN-ReLU to `channels`, then
    `classifier`. (N, in_channels, h, w) -> (N, num_classes, h, w)."""

    def __init__(self, in_channels, num_classes, channels=AUX_CHANNELS, dropout=DROPOUT):
        super().__init__(Conv2dReLU(in_channels, channels, kernel_size=3, padding=1, use_norm="batchnorm"),
                         classifier(channels, num_classes, dropout))


class UperNetSegmenter(nn.Module):
    def __init__(self, model="atto", num_classes=150, in_chans=3, drop_path=0.0, channels=CHANNELS,
                 aux_channels=AUX_CHANNELS, dropout=DROPOUT):
        """`model`: a ConvNeXt V2 size name or {"depths": [...], "dims": [...]}; `drop_path`: the
        encoder's stochastic depth rate (linear in depth, as in classification)."""
        super().__init__()
        self.encoder = ConvNeXtV2(model, in_chans, num_classes=0, drop_path_rate=drop_path)
        self.encoder.norm = nn.Identity()  # the pooled classifier's LayerNorm: no part of dense prediction
        dims = self.encoder.dims
        # smp counts features from full resolution: two leading entries (1/1, 1/2) it skips.
        self.decoder = UPerNetDecoder(encoder_channels=(in_chans, 0, *dims), encoder_depth=5,
                                      decoder_channels=channels)
        self.classifier = classifier(channels, num_classes, dropout)
        self.aux_head = FCNHead(dims[2], num_classes, aux_channels, dropout)
        initialize_decoder(self.decoder)
        initialize_decoder(self.aux_head[0])
        for part in (self.decoder, self.classifier, self.aux_head):
            match_grad_strides(part)  # 1x1 kernels: no gradient copies in DDP's buckets (the encoder's own)
        self.arch, self.num_classes, self.in_chans = model, num_classes, in_chans
        self.channels, self.aux_channels = channels, aux_channels

    def forward_with_aux(self, x):
        """(N, in_chans, H, W), sides multiples of 32 -> (logits (N, K, H/4, W/4), auxiliary logits
        (N, K, H/16, W/16)), before upsampling: the loss resizes both to the labels."""
        stages = self.encoder.forward_stages(x)  # [(N, C0, H/4, W/4), ..., (N, C3, H/32, W/32)]
        logits = self.classifier(self.decoder([None, None, *stages]))  # (N, K, H/4, W/4)
        return logits, self.aux_head(stages[2])

    def forward(self, x):
        """(N, in_chans, H, W), sides multiples of 32 -> logits (N, K, H, W) (bilinear from 1/4)."""
        stages = self.encoder.forward_stages(x)
        logits = self.classifier(self.decoder([None, None, *stages]))  # (N, K, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
