"""Against the real MinkowskiEngine: the kernel orderings of docs/checkpoints.md, and a clear error without it."""
import builtins

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, minkowski

from fcmae.encoders import SparseConvNeXtV2
from fcmae.encoders.convert import (downsample_from_minkowski, downsample_to_minkowski, dwconv_from_minkowski,
                                    dwconv_to_minkowski)

pytestmark = pytest.mark.minkowski


def sparse_input(ME, dense, keep):
    """Dense (1, C, H, W) and a visible map (H, W) -> ME sparse tensor of the visible positions."""
    coords = torch.nonzero(keep).int()
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1).contiguous()
    feats = dense[0].permute(1, 2, 0)[keep]
    return ME.SparseTensor(feats, coordinates=coords)


def at_coords(x, stride):
    c = x.C.long()
    return c[:, 1] // stride, c[:, 2] // stride


def test_channelwise_kernel_order_matches_dense_depthwise():
    ME = minkowski()
    torch.manual_seed(0)
    c, w = 6, torch.randn(6, 1, 7, 7)
    keep = torch.rand(12, 10) > 0.4
    dense = torch.randn(1, c, 12, 10) * keep
    conv = ME.MinkowskiChannelwiseConvolution(c, kernel_size=7, dimension=2)
    assert conv.kernel.shape == (49, c)  # the release's layout
    with torch.no_grad():
        conv.kernel.copy_(dwconv_to_minkowski(w))
        out = conv(sparse_input(ME, dense, keep))
        expected = F.conv2d(dense, w, padding=3, groups=c)[0].permute(1, 2, 0)[at_coords(out, 1)]
    assert (out.F - expected).abs().max() < 1e-5
    assert torch.equal(dwconv_from_minkowski(dwconv_to_minkowski(w)), w)


def test_downsample_kernel_order_matches_dense_conv():
    ME = minkowski()
    torch.manual_seed(0)
    w = torch.randn(5, 3, 2, 2)
    keep = (torch.rand(4, 6) > 0.5).repeat_interleave(2, 0).repeat_interleave(2, 1)  # aligned blocks
    dense = torch.randn(1, 3, 8, 12) * keep
    conv = ME.MinkowskiConvolution(3, 5, kernel_size=2, stride=2, dimension=2)
    assert conv.kernel.shape == (4, 3, 5)
    with torch.no_grad():
        conv.kernel.copy_(downsample_to_minkowski(w))
        out = conv(sparse_input(ME, dense, keep))
        expected = F.conv2d(dense, w, stride=2)[0].permute(1, 2, 0)[at_coords(out, 2)]
    assert (out.F - expected).abs().max() < 1e-5
    assert torch.equal(downsample_from_minkowski(downsample_to_minkowski(w)), w)


def test_clear_error_without_minkowski(monkeypatch):
    real_import = builtins.__import__

    def no_minkowski(name, *args, **kwargs):
        if name.startswith("MinkowskiEngine"):
            raise ImportError("No module named 'MinkowskiEngine'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minkowski)
    with pytest.raises(ImportError, match="scripts/install_minkowski.sh"):
        SparseConvNeXtV2(TINY, backend="minkowski")
