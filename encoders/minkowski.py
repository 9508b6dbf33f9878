"""The `minkowski` backend: the sparse encoder run on MinkowskiEngine sparse tensors.

Convolutions are MinkowskiEngine's submanifold ones (ChannelwiseConvolution for the 7x7 depthwise
conv, Convolution for the 2x2 stride-2 downsampling), one module per shape, built once; their
kernels are our dense parameters, reshaped on every call, so this backend shares the parameter set
of the others. Blocks run through their own forward on the sparse tensor's feature matrix
(`MinkowskiRows`, a row layout); GRN normalizes per sample (the release's MinkowskiGRN normalizes
over the whole batch), with its sums of squares in float32.

Mixed precision: MinkowskiEngine's kernels take float32 (or float64) features and kernels of one
type only, so under bf16/fp16 autocast its convolutions run in float32 (autocast off, features
and kernel cast up) and their output is cast back to the features' type; everything else follows
autocast as in the other backends.
"""
import torch

from .convert import downsample_to_minkowski, dwconv_to_minkowski
from .grn import statistics_dtype
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

    def __init__(self):
        self._convolutions = {}

    def convolution(self, ME, kind, channels, kernel_size):
        """One MinkowskiEngine convolution module per (kind, channels, kernel size), built on first
        use: its kernel is set from our dense parameters on every call (`_convolve`)."""
        key = (kind, channels, kernel_size)
        if key not in self._convolutions:
            if kind == "depthwise":
                conv = ME.MinkowskiChannelwiseConvolution(channels, kernel_size=kernel_size, dimension=2)
            else:
                c_in, c_out = channels
                conv = ME.MinkowskiConvolution(c_in, c_out, kernel_size=kernel_size, stride=kernel_size, dimension=2)
            del conv.kernel  # a plain attribute from here on, set per call
            self._convolutions[key] = conv
        return self._convolutions[key]

    def forward(self, encoder, imgs, visible):
        """imgs (N, C, H, W), visible: a `backends.Visibility` -> (N, C_last, H/32, W/32)."""
        ME = require_minkowski()
        visible = visible.stages()
        n = imgs.shape[0]
        stem_conv, stem_norm = encoder.downsample_layers[0]
        dense = stem_conv(imgs)  # (N, C0, H/4, W/4)
        coords = visible[0].nonzero().int().contiguous()  # (M, 3): sample, row, column on the stride-4 grid
        feats = dense.permute(0, 2, 3, 1)[visible[0]]  # (M, C0), same order as coords
        # A coordinate manager of our own: ME's default one sets the process's OpenMP threads (torch's
        # too) to min(cores, 20), overriding `torch.set_num_threads`.
        manager = ME.CoordinateManager(D=2, num_threads=torch.get_num_threads(), coordinate_map_type=(
            ME.CoordinateMapType.GPU if coords.is_cuda else ME.CoordinateMapType.CPU))
        x = ME.SparseTensor(layer_norm_rows(feats, stem_norm), coordinates=coords, coordinate_manager=manager)
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                norm, conv = encoder.downsample_layers[i]
                x = self._downsample(ME, _replace(ME, x, layer_norm_rows(x.F, norm)), conv)
            layout, feats = MinkowskiRows(self, ME, x, n), x.F
            for block in stage:
                feats = block(feats, layout)  # (M_i, C_i)
            x = _replace(ME, x, feats)
        return _to_dense(x, n, visible[3].shape[1:], stride=8)

    def _downsample(self, ME, x, conv2d):
        w = conv2d.weight  # (C_out, C_in, 2, 2)
        conv = self.convolution(ME, "downsample", (w.shape[1], w.shape[0]), 2)
        feats, y = _convolve(ME, conv, downsample_to_minkowski(w), x)
        return _replace(ME, y, feats + conv2d.bias.to(feats.dtype))


class MinkowskiRows:
    """The row layout (`rows.py`) of a sparse tensor's points: its features are the rows."""

    def __init__(self, backend, ME, x, n):
        self.backend, self.ME, self.x, self.n = backend, ME, x, n
        self.batch = x.C[:, 0].long()  # (M,) each point's sample

    def depthwise(self, conv, feats):
        w = conv.weight  # (C, 1, 7, 7)
        module = self.backend.convolution(self.ME, "depthwise", w.shape[0], w.shape[-1])
        out, _ = _convolve(self.ME, module, dwconv_to_minkowski(w), _replace(self.ME, self.x, feats))
        return out + conv.bias.to(out.dtype)

    def by_sample(self, rows):
        return None  # points are not grouped by sample in equal numbers

    def per_sample_norm(self, rows):
        """(M, C) -> (N, C), the squares summed in float32 (a bf16 running sum stalls)."""
        squares = rows.to(statistics_dtype(rows)).square()
        return squares.new_zeros(self.n, rows.shape[1]).index_add_(0, self.batch, squares).sqrt()

    def scale_shift(self, rows, scale, shift):
        scale, shift = scale.to(rows.dtype), shift.to(rows.dtype)
        return torch.addcmul(shift, rows, scale.index_select(0, self.batch))

    def drop_path(self, x, drop_prob, training):
        return drop_path_rows(x, self.batch, self.n, drop_prob, training)


def _convolve(ME, conv, kernel, x):
    """Run a MinkowskiEngine conv module with the given kernel in float32, whatever autocast says
    (its kernels need features and kernel of one float type); the output features come back in
    the input's type."""
    dtype = x.F.dtype
    with torch.autocast(x.F.device.type, enabled=False):
        conv.kernel = kernel.float().contiguous()
        y = conv(x if dtype == torch.float32 else _replace(ME, x, x.F.float()))
    del conv.kernel  # the module keeps no reference to this step's tensors
    return y.F.to(dtype), y


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
