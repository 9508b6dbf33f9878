"""Sparse ConvNeXt V2: the FCMAE pre-training encoder.

Only visible positions are computed (submanifold convolution): a masked position never feeds a
visible one and stays empty. The computation is the backend's (`backends.py`: dense, the
reference; sparse, our fast path; minkowski, MinkowskiEngine); all share this module's one
parameter set, in the dense model's keys.
"""
import torch.nn as nn

from fcmae.masking import PATCH_SIZE

from .backends import BACKENDS, Visibility, check_backend
from .convnextv2 import check_input, init_weights, make_trunk, size_config


class SparseConvNeXtV2(nn.Module):
    def __init__(self, model="atto", in_chans=3, drop_path_rate=0.0, backend="sparse"):
        super().__init__()
        depths, dims = size_config(model)
        self.depths, self.dims, self.in_chans = depths, dims, in_chans
        self.num_features = dims[-1]
        self.downsample_layers, self.stages = make_trunk(in_chans, depths, dims, drop_path_rate)
        self.apply(init_weights)
        self.backend = backend

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, name):
        """A name in `BACKENDS`; ValueError when unknown, ImportError (also a ValueError) when it
        cannot run here, e.g. MinkowskiEngine is not installed."""
        if name == "auto":
            raise ValueError("backend 'auto' must be resolved first: fcmae.encoders.resolve_backend(name, device)")
        check_backend(name)
        self._backend = name

    def forward(self, imgs, mask, visible_per_sample=None):
        """imgs (N, C, H, W), mask (N, H/32, W/32) with 1 = masked ->
        last-stage features (N, C_last, H/32, W/32), zero at masked positions.

        `visible_per_sample`: the number of visible patches of every sample when the caller knows
        it (masks from `random_mask` have `num_visible(L, ratio)`); then the sparse backend builds
        its rows with fixed shapes and no host-device sync. None: counted from the mask (one
        sync), and masks whose samples differ in count take the general path."""
        check_input(imgs, self.in_chans)
        n, _, h, w = imgs.shape
        grid = (n, h // PATCH_SIZE, w // PATCH_SIZE)
        if mask.shape != grid:
            raise ValueError(f"expected mask (N, H/{PATCH_SIZE}, W/{PATCH_SIZE}) = {grid}, got {tuple(mask.shape)}")
        return BACKENDS[self.backend].forward(self, imgs, Visibility(mask, visible_per_sample))
