"""The `minkowski` backend: the sparse encoder run on MinkowskiEngine sparse tensors.

Convolutions are MinkowskiEngine's submanifold ones (ChannelwiseConvolution for the 7x7 depthwise
conv, Convolution for the 2x2 stride-2 downsampling); their kernels are our dense parameters,
reshaped on the fly, so this backend shares the parameter set of the others. Pointwise layers act
on the sparse tensor's feature matrix; GRN normalizes per sample (the release's MinkowskiGRN
normalizes over the whole batch: facts.md).
"""

import torch

from .convert import downsample_to_minkowski, dwconv_to_minkowski
from .sparse_convnextv2 import drop_path_rows, layer_norm_rows

INSTALL_HINT = "install it with `bash scripts/install_minkowski.sh`, or choose --backend sparse"


def require_minkowski():
    try:
        import MinkowskiEngine as ME  # noqa: F401
    except ImportError as e:
        raise ImportError(f"backend 'minkowski' needs MinkowskiEngine, which is not installed: {INSTALL_HINT}") from e
    return ME


class _SampleGroups:
    """Per-sample reductions over a sparse tensor's points (the interface GRN.forward_rows uses)."""

    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def per_sample_norm(self, rows):
        return rows.new_zeros(self.n, rows.shape[1]).index_add_(0, self.batch, rows * rows).sqrt()

    def scale_shift(self, rows, scale, shift):
        return torch.addcmul(shift, rows, scale.index_select(0, self.batch))


def _with_kernel(conv, kernel):
    """A MinkowskiEngine conv module whose kernel is the given tensor rather than its own."""
    del conv.kernel
    conv.kernel = kernel.contiguous()
    return conv


def _depthwise(ME, x, block):
    w = block.dwconv.weight  # (C, 1, 7, 7)
    conv = ME.MinkowskiChannelwiseConvolution(w.shape[0], kernel_size=w.shape[-1], dimension=2)
    y = _with_kernel(conv, dwconv_to_minkowski(w))(x)
    return y.F + block.dwconv.bias


def _downsample(ME, x, conv2d):
    w = conv2d.weight  # (C_out, C_in, 2, 2)
    conv = ME.MinkowskiConvolution(w.shape[1], w.shape[0], kernel_size=2, stride=2, dimension=2)
    y = _with_kernel(conv, downsample_to_minkowski(w))(x)
    return ME.SparseTensor(y.F + conv2d.bias, coordinate_map_key=y.coordinate_map_key,
                           coordinate_manager=y.coordinate_manager)


def forward_minkowski(encoder, imgs, visible):
    ME = require_minkowski()
    n = imgs.shape[0]
    stem_conv, stem_norm = encoder.downsample_layers[0]
    dense = stem_conv(imgs)  # (N, C0, H/4, W/4)
    coords = visible[0].nonzero().int().contiguous()  # (M, 3): sample, row, column on the stride-4 grid
    feats = dense.permute(0, 2, 3, 1)[visible[0]]  # (M, C0), same order as coords
    x = ME.SparseTensor(layer_norm_rows(feats, stem_norm), coordinates=coords)
    for i, stage in enumerate(encoder.stages):
        if i > 0:
            norm, conv = encoder.downsample_layers[i]
            x = _downsample(ME, _replace(ME, x, layer_norm_rows(x.F, norm)), conv)
        groups = _SampleGroups(x.C[:, 0].long(), n)
        for block in stage:
            y = block.mlp(_depthwise(ME, x, block), lambda t: block.grn.forward_rows(t, groups))
            drop = getattr(block.drop_path, "drop_prob", 0.0)
            x = _replace(ME, x, x.F + drop_path_rows(y, groups.batch, n, drop, encoder.training))
    return _to_dense(x, n, visible[3].shape[1:], stride=8)


def _replace(ME, x, features):
    return ME.SparseTensor(features, coordinate_map_key=x.coordinate_map_key,
                           coordinate_manager=x.coordinate_manager)


def _to_dense(x, n, grid, stride):
    """Last-stage sparse tensor (coordinates on the stride-4 grid, tensor stride 8) ->
    (N, C, H/32, W/32), zero where nothing is active."""
    c = x.C.long()
    out = x.F.new_zeros(n, *grid, x.F.shape[1])
    out = out.index_put((c[:, 0], c[:, 1] // stride, c[:, 2] // stride), x.F)
    return out.permute(0, 3, 1, 2).contiguous()
