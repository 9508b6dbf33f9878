"""Helpers for backends that compute on rows: the visible positions of a stage as a (M, C) matrix.

Shared by the sparse and MinkowskiEngine backends (`sparse_backend.py`, `minkowski.py`); they
import it, it imports neither.
"""
import torch
import torch.nn.functional as F


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
