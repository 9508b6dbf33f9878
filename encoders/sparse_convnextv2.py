"""Sparse ConvNeXt V2: the FCMAE pre-training encoder.

Only visible positions are computed (submanifold convolution): a masked position never feeds a
visible one and stays empty. Three backends share one parameter set (the dense model's keys):

- "dense": dense convolutions with inputs and outputs zeroed at masked positions (the reference);
- "sparse": our fast path: depthwise conv dense, every pointwise step on visible rows only;
- "minkowski": MinkowskiEngine submanifold convolutions (optional install).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .convnextv2 import check_input, init_weights, make_trunk, size_config

BACKENDS = ("dense", "sparse", "minkowski")


def upsample_mask(mask, scale):
    """(N, h, w) -> (N, h*scale, w*scale) by repetition: a masked 32x32 patch covers a
    (32/stride)^2 block of every stage."""
    return mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def stage_visibility(mask):
    """Last-stage mask (N, H/32, W/32), 1 = masked -> visible (bool) per stage, strides 4..32."""
    visible = mask == 0
    return [upsample_mask(visible, 2 ** (3 - i)) for i in range(4)]


class VisibleRows:
    """The visible positions of one stage as rows of a (N*H*W, C) channels-last matrix.

    Computed once per stage and shared by its blocks (and by the downsampling into the next
    stage). Rows are grouped by sample in raster order; when every sample has the same visible
    count (always, for generated masks) per-sample reductions and broadcasts are views of a
    (N, P, C) tensor, with no index lists and no copies.
    """

    def __init__(self, visible):
        n, h, w = visible.shape
        self.shape = (n, h, w)
        self.index = visible.reshape(-1).nonzero().squeeze(1)  # (M,)
        self.batch = torch.div(self.index, h * w, rounding_mode="floor")  # (M,)
        counts = visible.reshape(n, -1).sum(1)
        self.per_sample = int(counts[0]) if bool((counts == counts[0]).all()) else None
        self._row_of = None

    @property
    def row_of(self):
        """(N*H*W,) position -> its row, -1 where masked (built on first use)."""
        if self._row_of is None:
            row_of = torch.full((self.shape[0] * self.shape[1] * self.shape[2],), -1,
                                dtype=torch.long, device=self.index.device)
            row_of[self.index] = torch.arange(self.index.numel(), device=self.index.device)
            self._row_of = row_of
        return self._row_of

    def gather(self, x):
        """(N, C, H, W) -> (M, C). No copy of x itself when x is channels-last in memory."""
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).index_select(0, self.index)

    def scatter(self, rows):
        """(M, C) -> (N, C, H, W), zero at masked positions, channels-last in memory."""
        n, h, w = self.shape
        out = rows.new_zeros(n * h * w, rows.shape[1]).index_copy_(0, self.index, rows)
        return out.view(n, h, w, -1).permute(0, 3, 1, 2)

    def per_sample_sum(self, rows):
        """(M, C) -> (N, C)."""
        if self.per_sample is not None:
            return rows.view(self.shape[0], self.per_sample, -1).sum(1)
        out = rows.new_zeros(self.shape[0], rows.shape[1])
        return out.index_add_(0, self.batch, rows)

    def per_sample_norm(self, rows):
        """(M, C) -> (N, C): per-sample, per-channel L2 norm over the sample's rows."""
        if self.per_sample is not None:
            return torch.linalg.vector_norm(rows.view(self.shape[0], self.per_sample, -1), dim=1)
        return self.per_sample_sum(rows * rows).sqrt()

    def scale_shift(self, rows, scale, shift):
        """rows * scale[sample] + shift, one fused pass: rows (M, C), scale (N, C), shift (C,)."""
        if self.per_sample is not None:
            n = self.shape[0]
            return torch.addcmul(shift, rows.view(n, self.per_sample, -1), scale.unsqueeze(1)).view(rows.shape)
        return torch.addcmul(shift, rows, scale.index_select(0, self.batch))

    def patches(self, x, k):
        """(N, C, H*k, W*k) dense (channels-first) -> (M, k*k*C): for each visible position its
        k x k input patch, ordered (row, col, channel). Gathers the visible patches only."""
        n, h, w = self.shape
        c = x.shape[1]
        # (N, C, h, k, w, k) -> (N, h, w, k, k, C) rows; only the visible rows are copied.
        rows = x.reshape(n, c, h, k, w, k).permute(0, 2, 4, 3, 5, 1).reshape(n * h * w, k, k, c)
        return rows.index_select(0, self.index).reshape(-1, k * k * c)

    def children_of(self, finer, k=2):
        """(M, k*k) rows of the finer stage `finer` (k times the resolution) covering each of
        this stage's visible positions, ordered (row, col). The finer stage's visibility is this
        one's repeated, so every child is a visible row."""
        n, h, w = self.shape
        pos = self.index
        b, rem = torch.div(pos, h * w, rounding_mode="floor"), pos % (h * w)
        y, x = torch.div(rem, w, rounding_mode="floor"), rem % w
        fh, fw = h * k, w * k
        off = torch.arange(k, device=pos.device)
        fy = (y * k).unsqueeze(1) + off  # (M, k)
        fx = (x * k).unsqueeze(1) + off
        fine = (b * fh * fw).view(-1, 1, 1) + fy.unsqueeze(2) * fw + fx.unsqueeze(1)  # (M, k, k)
        return finer.row_of[fine.reshape(-1, k * k)]


def drop_path_rows(x, batch, n, drop_prob, training):
    """Stochastic depth for rows (M, C) of n samples: drops whole samples, like timm's DropPath."""
    if drop_prob == 0.0 or not training:
        return x
    keep = x.new_empty(n).bernoulli_(1 - drop_prob).div_(1 - drop_prob)
    return x * keep.index_select(0, batch).unsqueeze(1)


def layer_norm_rows(x, norm):
    """A (channels-first) LayerNorm module applied to rows (M, C)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


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
        if name not in BACKENDS:
            raise ValueError(f"unknown backend '{name}': choose one of {', '.join(BACKENDS)}")
        if name == "minkowski":
            from .minkowski import require_minkowski
            require_minkowski()
        self._backend = name

    def forward(self, imgs, mask):
        """imgs (N, C, H, W), mask (N, H/32, W/32) with 1 = masked ->
        last-stage features (N, C_last, H/32, W/32), zero at masked positions."""
        check_input(imgs, self.in_chans)
        n, _, h, w = imgs.shape
        if mask.shape != (n, h // 32, w // 32):
            raise ValueError(f"expected mask (N, H/32, W/32) = {(n, h // 32, w // 32)}, got {tuple(mask.shape)}")
        visible = stage_visibility(mask)
        if self.backend == "dense":
            return self.forward_dense(imgs, visible)
        if self.backend == "sparse":
            return self.forward_sparse(imgs, visible)
        from .minkowski import forward_minkowski
        return forward_minkowski(self, imgs, visible)

    def forward_dense(self, imgs, visible):
        x = imgs
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            keep = visible[i].unsqueeze(-1).to(imgs.dtype)  # (N, h, w, 1)
            # Stem and downsampling see only their own (aligned) patches; zero what they
            # write at masked positions.
            x = downsample(x) * keep.permute(0, 3, 1, 2)
            for block in stage:
                x = block(x, keep)
        return x

    def forward_sparse(self, imgs, visible):
        """Visible rows only: the stem and the 2x2 downsampling are matrix products on the
        visible patches (a masked patch never feeds a visible one), every pointwise step runs on
        the visible rows of the stage; only the 7x7 depthwise conv runs dense, on a zero-filled
        channels-last map."""
        rows = [VisibleRows(v) for v in visible]
        stem_conv, stem_norm = self.downsample_layers[0]
        x = F.linear(rows[0].patches(imgs, 4), _conv_as_matrix(stem_conv.weight), stem_conv.bias)
        x = layer_norm_rows(x, stem_norm)  # (M0, C0)
        for i, stage in enumerate(self.stages):
            if i > 0:
                norm, conv = self.downsample_layers[i]
                x = layer_norm_rows(x, norm)
                children = rows[i].children_of(rows[i - 1])  # (M_i, 4)
                x = F.linear(x.index_select(0, children.reshape(-1)).view(children.shape[0], -1),
                             _conv_as_matrix(conv.weight), conv.bias)
            r = rows[i]
            for block in stage:
                y = r.gather(block.dwconv(r.scatter(x)))  # (M, C)
                y = block.mlp(y, lambda t: block.grn.forward_rows(t, r))
                x = x + drop_path_rows(y, r.batch, r.shape[0], getattr(block.drop_path, "drop_prob", 0.0), self.training)
        return rows[3].scatter(x).contiguous()


def _conv_as_matrix(weight):
    """A k x k stride-k conv weight (C_out, C_in, k, k) as a matrix over patches ordered
    (row, col, channel): (C_out, k*k*C_in)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


# The fastest backend per device type, from whole-step measurements with `fcmae bench` (README,
# Performance). CPU (2 cores, fp32, 224, mask 0.6): sparse is ahead of dense by 2x and more and
# ahead of minkowski (see the table). CUDA: not measured on this project's machines; sparse runs
# the depthwise conv through cuDNN and everything else as dense matmuls on the visible rows, while
# MinkowskiEngine's CUDA kernels are gather-scatter based, so sparse is the default there too until
# `fcmae bench --device cuda` says otherwise. Every entry is a backend that needs no extra install.
FASTEST = {"cpu": "sparse", "cuda": "sparse"}


def resolve_backend(backend, device="cpu"):
    """`auto` -> the fastest backend for the device type (`FASTEST`, measured by `fcmae bench`);
    any other name is returned unchanged."""
    if backend != "auto":
        return backend
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return FASTEST.get(device_type, "sparse")
