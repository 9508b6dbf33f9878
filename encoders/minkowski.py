"""The `minkowski` backend: the sparse encoder run on MinkowskiEngine sparse tensors.

Convolutions are MinkowskiEngine's submanifold ones (ChannelwiseConvolution for the 7x7 depthwise
conv, Convolution for the 2x2 stride-2 downsampling); their kernels are our dense parameters,
reshaped on the fly, so this backend shares the parameter set of the others. Pointwise layers act
on the sparse tensor's feature matrix; GRN normalizes per sample (the release's MinkowskiGRN
normalizes over the whole batch).

Mixed precision: MinkowskiEngine's kernels take float32 (or float64) features and kernels of one
type only, so under bf16/fp16 autocast its convolutions run in float32 (autocast off, features
and kernel cast up) and their output is cast back to the features' type; everything else follows
autocast as in the other backends.
"""
import torch

from .convert import downsample_to_minkowski, dwconv_to_minkowski
from .rows import drop_path_rows, layer_norm_rows

INSTALL_HINT = "install it with `bash scripts/install_minkowski.sh`, or choose --backend sparse"


def require_minkowski():
    """The MinkowskiEngine module; ImportError with the install hint when it is missing."""
    try:
        import MinkowskiEngine as ME
    except ImportError as e:
        raise ImportError(f"backend 'minkowski' needs MinkowskiEngine, which is not installed: {INSTALL_HINT}") from e
    return ME


class MinkowskiBackend:
    name = "minkowski"

    def unavailable(self, device=None):
        try:
            ME = require_minkowski()
        except ImportError as e:
            return str(e)
        device_type = getattr(device, "type", str(device).split(":")[0]) if device is not None else None
        if device_type == "cuda" and not ME.is_cuda_available():
            return ("backend 'minkowski' on CUDA needs a MinkowskiEngine built with CUDA; the installed one is "
                    "CPU-only: rebuild it with `bash scripts/install_minkowski.sh` on a CUDA machine, "
                    "or choose --backend sparse")
        return None

    def forward(self, encoder, imgs, visible):
        """imgs (N, C, H, W), visible: per-stage bool maps -> (N, C_last, H/32, W/32)."""
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


class _SampleGroups:
    """Per-sample reductions over a sparse tensor's points (the interface GRN.forward_rows uses)."""

    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def per_sample_norm(self, rows):
        return rows.new_zeros(self.n, rows.shape[1]).index_add_(0, self.batch, rows * rows).sqrt()

    def scale_shift(self, rows, scale, shift):
        return torch.addcmul(shift, rows, scale.index_select(0, self.batch))


def _convolve(ME, conv, kernel, x):
    """Run a MinkowskiEngine conv module with the given kernel in float32, whatever autocast says
    (its kernels need features and kernel of one float type); the output features come back in
    the input's type."""
    dtype = x.F.dtype
    del conv.kernel
    with torch.autocast(x.F.device.type, enabled=False):
        conv.kernel = kernel.float().contiguous()
        y = conv(x if dtype == torch.float32 else _replace(ME, x, x.F.float()))
    return y.F.to(dtype), y


def _depthwise(ME, x, block):
    w = block.dwconv.weight  # (C, 1, 7, 7)
    conv = ME.MinkowskiChannelwiseConvolution(w.shape[0], kernel_size=w.shape[-1], dimension=2)
    feats, _ = _convolve(ME, conv, dwconv_to_minkowski(w), x)
    return feats + block.dwconv.bias


def _downsample(ME, x, conv2d):
    w = conv2d.weight  # (C_out, C_in, 2, 2)
    conv = ME.MinkowskiConvolution(w.shape[1], w.shape[0], kernel_size=2, stride=2, dimension=2)
    feats, y = _convolve(ME, conv, downsample_to_minkowski(w), x)
    return _replace(ME, y, feats + conv2d.bias)


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


MINKOWSKI = MinkowskiBackend()
