"""Row layouts: the visible positions of a stage as a (M, C) matrix, for backends that compute on
rows (`sparse_backend.py`, `minkowski.py`; they import this module, it imports neither).

A row layout is what `Block.forward(x, layout)` (`convnextv2.py`) needs to run a block on rows:
- `depthwise(conv, x)`: the block's 7x7 depthwise conv on rows (M, C) -> (M, C);
- `per_sample_norm(x)` (M, C) -> (N, C) float32 and `scale_shift(x, scale (N, C), shift (C,))` =
  x * scale[sample] + shift: GRN's per-sample statistics; `by_sample(x)`: the view (N, P, C)
  when every sample has P rows (then GRN runs as one function), else None;
- `drop_path(x, drop_prob, training)`: stochastic depth by sample.
`VisibleRows` is the sparse backend's; the MinkowskiEngine backend has its own.
"""
import torch
import torch.nn.functional as F

from fcmae.masking import PATCH_SIZE, STAGE_STRIDES

from .grn import statistics_dtype


def morton_order(f, device=None):
    """(f*f,) raster indices of an f x f block, f a power of 2, in Z order: the four positions of
    each 2x2 group are consecutive, ordered (row, col), and so on at every scale. Made on
    `device` (no host-to-device copy)."""
    quad = torch.arange(4, device=device)  # (row, col) = (0, 0), (0, 1), (1, 0), (1, 1)
    ys = xs = torch.zeros(1, dtype=torch.long, device=device)
    while ys.numel() < f * f:
        ys = (2 * ys.unsqueeze(1) + torch.div(quad, 2, rounding_mode="floor")).reshape(-1)
        xs = (2 * xs.unsqueeze(1) + quad % 2).reshape(-1)
    return ys * f + xs


def visible_patches(mask, per_sample=None):
    """Last-stage mask (N, h, w), 1 = masked -> (sample, position) (B,) of its visible patches,
    by sample, in raster order (position = row * w + col).

    `per_sample`: the number of visible patches of every sample, when the caller knows it (masks
    drawn by `random_mask` have int(L * (1 - ratio))): fixed shapes, no host-device sync. None:
    found with `nonzero` (one sync)."""
    n = mask.shape[0]
    flat = mask.reshape(n, -1)  # (N, L)
    if per_sample is None:
        sample, position = (flat == 0).nonzero(as_tuple=True)
        return sample, position
    position = torch.argsort(flat, dim=1, stable=True)[:, :per_sample]  # visible (0) first, in order
    sample = torch.arange(n, device=mask.device).unsqueeze(1).expand(n, per_sample)
    return sample.reshape(-1), position.reshape(-1)


def equal_count(mask):
    """The visible count shared by every sample of `mask` (N, h, w), or None when they differ (reads
    two numbers to the host, a sync: callers that know the count pass it instead)."""
    low, high = (int(c) for c in torch.aminmax((mask.reshape(mask.shape[0], -1) == 0).sum(1)))
    return low if low == high else None


def stage_rows(mask, per_sample=None):
    """The row layouts of the four stages for a last-stage mask (N, h, w): [VisibleRows] * 4.
    `per_sample` as in `visible_patches`; None counts (and handles unequal counts)."""
    if per_sample is None:
        per_sample = equal_count(mask)
        sample, position = visible_patches(mask)
    else:
        sample, position = visible_patches(mask, per_sample)
    return [VisibleRows(sample, position, tuple(mask.shape), PATCH_SIZE // s, per_sample) for s in STAGE_STRIDES]


class VisibleRows:
    """The visible positions of one stage as rows of a (M, C) matrix, M = B * f * f for the B
    visible patches of the batch and f = 32 / stride positions per patch side.

    Rows come by patch (patches by sample, then raster order) and, within a patch, in Z order
    (`morton_order`). So the 2x2 positions of this stage that one position of the next covers
    are 4 consecutive rows, (row, col) ordered: the next stage's downsampling input is the view
    (M/4, 4*C) (`children`), and a sample's rows are consecutive. Every index is arithmetic on
    the patch list: building a layout syncs nothing. With `per_sample` (visible patches of every
    sample, or None when they differ) a sample's rows are a view (`by_sample`: (N, P, C)), and
    per-sample statistics need no index lists.
    """

    def __init__(self, sample, position, grid, f, per_sample=None):
        """sample, position (B,): the visible patches (`visible_patches`); grid (N, h, w): the
        last-stage grid; f: positions per patch side at this stage."""
        n, h, w = grid
        self.shape = (n, h * f, w * f)  # (N, H, W) of this stage
        self.f, self.per_sample = f, per_sample
        self.patch_sample, self.patch_col = sample, position % w
        self.patch_row = torch.div(position, w, rounding_mode="floor")
        order = morton_order(f, position.device)
        y = self.patch_row.unsqueeze(1) * f + torch.div(order, f, rounding_mode="floor")  # (B, f*f)
        x = self.patch_col.unsqueeze(1) * f + order % f
        self.index = ((sample.unsqueeze(1) * (h * f) + y) * (w * f) + x).reshape(-1)  # (M,) into N*H*W
        self.sample = sample.unsqueeze(1).expand(-1, f * f).reshape(-1)  # (M,) each row's sample

    @property
    def rows_per_sample(self):
        return None if self.per_sample is None else self.per_sample * self.f * self.f

    def by_sample(self, rows):
        """(M, C) -> the view (N, P, C) when every sample has P rows, else None."""
        return None if self.per_sample is None else rows.view(self.shape[0], self.rows_per_sample, -1)

    def gather(self, x):
        """(N, C, H, W) -> (M, C). No copy of x itself when x is channels-last in memory."""
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).index_select(0, self.index)

    def scatter(self, rows):
        """(M, C) -> (N, C, H, W), zero at masked positions, channels-last in memory."""
        n, h, w = self.shape
        out = rows.new_zeros(n * h * w, rows.shape[1]).index_copy_(0, self.index, rows)
        return out.view(n, h, w, -1).permute(0, 3, 1, 2)

    def scatter_channel_major(self, rows):
        """(M, C) -> (C, N*H*W), zero at masked positions."""
        n, h, w = self.shape
        return rows.new_zeros(rows.shape[1], n * h * w).index_copy_(1, self.index, rows.t())

    def children(self, x):
        """Rows (M, C) of the previous (2x finer) stage -> (M', 4*C) for this stage's M' rows: each
        position's 2x2 children, (row, col, channel) ordered, as a 2x2 stride-2 conv reads them."""
        return x.reshape(-1, 4 * x.shape[1])

    def stem_patches(self, imgs, k):
        """imgs (N, C, H, W) -> (M, k*k*C): each visible position's k x k input patch, ordered
        (row, col, channel) as a k x k stride-k conv reads it; for the first stage (f * k = 32)."""
        n, c, height, width = imgs.shape
        side = self.f * k
        patches = imgs.view(n, c, height // side, side, width // side, side)
        x = patches[self.patch_sample, :, self.patch_row, :, self.patch_col, :]  # (B, C, side, side)
        # Rows in Z order: split the position's row and column into bits, most significant first,
        # and interleave them (row bit, column bit, ...); then the patch's (row, col, channel).
        bits = self.f.bit_length() - 1
        x = x.reshape(-1, c, *[2] * bits, k, *[2] * bits, k)
        row_bits, col_bits = range(2, 2 + bits), range(3 + bits, 3 + 2 * bits)
        interleaved = [d for pair in zip(row_bits, col_bits) for d in pair]
        return x.permute(0, *interleaved, 2 + bits, 3 + 2 * bits, 1).reshape(-1, k * k * c)

    def per_sample_sum(self, rows):
        """(M, C) -> (N, C), accumulated in float32. (Blocks take `by_sample` where it applies.)"""
        out = rows.new_zeros(self.shape[0], rows.shape[1], dtype=statistics_dtype(rows))
        return out.index_add_(0, self.sample, rows.to(out.dtype))

    def per_sample_norm(self, rows):
        """(M, C) -> (N, C) float32: per-sample, per-channel L2 norm over the sample's rows."""
        rows = rows.to(statistics_dtype(rows))
        return self.per_sample_sum(rows * rows).sqrt()

    def scale_shift(self, rows, scale, shift):
        """rows * scale[sample] + shift, one fused pass: rows (M, C), scale (N, C), shift (C,)."""
        scale, shift = scale.to(rows.dtype), shift.to(rows.dtype)
        return torch.addcmul(shift, rows, scale.index_select(0, self.sample))

    def depthwise(self, conv, x):
        """The block's depthwise conv (`depthwise.DepthwiseConv2d`) on rows (M, C) -> (M, C)."""
        return conv.forward_rows(x, self)

    def drop_path(self, x, drop_prob, training):
        """Stochastic depth for rows (M, C): drops whole samples, like timm's DropPath."""
        if drop_prob == 0.0 or not training:
            return x
        keep = x.new_empty(self.shape[0]).bernoulli_(1 - drop_prob).div_(1 - drop_prob)
        if self.per_sample is not None:
            return (x.view(self.shape[0], self.rows_per_sample, -1) * keep.view(-1, 1, 1)).view(x.shape)
        return x * keep.index_select(0, self.sample).unsqueeze(1)


def drop_path_rows(x, batch, n, drop_prob, training):
    """Stochastic depth for rows (M, C) of n samples, `batch` (M,) each row's sample."""
    if drop_prob == 0.0 or not training:
        return x
    keep = x.new_empty(n).bernoulli_(1 - drop_prob).div_(1 - drop_prob)
    return x * keep.index_select(0, batch).unsqueeze(1)


def layer_norm_rows(x, norm):
    """A (channels-first) LayerNorm module applied to rows (M, C)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
