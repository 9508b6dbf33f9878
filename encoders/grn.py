"""Global Response Normalization (GRN, ConvNeXt V2), and GRN as one autograd function.

GRN scales each channel of a sample by its L2 norm over the sample's positions relative to the
mean norm over channels: x + gamma * x * G / mean_c(G) + beta, G = ||x||_2 per (sample, channel).
Its statistics are float32 whatever x's type (a sample's norm sums thousands of squares; a bf16
running sum stalls past a few hundred).

`grouped_grn(x, ...)`, for the common case where every sample's positions form one (N, P, C)
block (dense maps; rows with equal visible counts), computes GRN with a hand-written backward:
three passes over the (N, P, C) activations forward and five backward (in one buffer), where
autograd's composition of the norm, its division and the affine part makes about twice as many
and a slow CPU norm kernel. It keeps x for backward, as autograd does.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class GRN(nn.Module):
    """Global Response Normalization on channels-last input (N, H, W, C).

    G is the per-sample, per-channel L2 norm over spatial positions. With `visible` (N, H, W, 1),
    masked positions are zeroed first, so the norm runs over visible positions only, exactly as
    the sparse backends compute it.
    """

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x, visible=None):
        if visible is not None:
            x = x * visible
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True, dtype=statistics_dtype(x))  # (N, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return self.gamma * (x * nx) + self.beta + x

    def forward_rows(self, x, layout):
        """x: (M, C) visible rows of the batch; `layout` locates them per sample (a row layout,
        `rows.py`: `per_sample_norm` (M, C) -> (N, C) float32, `scale_shift`)."""
        gx = layout.per_sample_norm(x)  # (N, C) float32
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        # gamma * (x * nx) + beta + x == x * (gamma * nx + 1) + beta: one fused pass over x.
        scale = torch.addcmul(torch.ones_like(nx), self.gamma.view(1, -1).to(nx.dtype), nx)  # (N, C)
        return layout.scale_shift(x, scale, self.beta.view(-1))

    def grouped(self, x):
        """x (N, P, C): every sample's P positions at once (dense maps, rows with equal visible
        counts) -> (N, P, C), by `grouped_grn`."""
        return grouped_grn(x, self.gamma, self.beta, self.eps)


def statistics_dtype(x):
    """float32 for bf16/fp16 (and float32) activations; float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def grouped_grn(x, gamma, beta, eps=1e-6):
    """GRN of x (N, P, C), per sample over its P positions; gamma and beta with C entries ->
    (N, P, C) in x's type."""
    return _GroupedGRN.apply(x, gamma.reshape(-1), beta.reshape(-1), eps)


class _GroupedGRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        # Squares in x's type, summed in float32, then sqrt: several times faster on CPU than
        # linalg.vector_norm over dim 1 (a bf16 square is off by 2^-9 at most, the sum is exact).
        gx = (x * x).sum(1, keepdim=True, dtype=statistics_dtype(x)).sqrt()  # (N, 1, C)
        denom = gx.mean(dim=-1, keepdim=True) + eps  # (N, 1, 1)
        scale = 1 + gamma.to(gx.dtype) * (gx / denom)  # (N, 1, C): out = x * scale + beta
        ctx.save_for_backward(x, gamma, gx, denom)
        return torch.addcmul(beta.to(x.dtype), x, scale.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        x, gamma, gx, denom = ctx.saved_tensors
        nx = gx / denom  # (N, 1, C)
        gamma32 = gamma.to(gx.dtype)
        work = g * x  # one (N, P, C) buffer, reused for dx below
        s = work.sum(1, keepdim=True, dtype=gx.dtype)  # (N, 1, C): d loss / d scale
        d_gamma = (s * nx).sum((0, 1))
        d_beta = g.sum((0, 1), dtype=gx.dtype)
        d_nx = s * gamma32
        # nx_c = G_c / (mean_j G_j + eps) -> dG_j = d_nx_j / denom - sum_c d_nx_c G_c / (C denom^2)
        d_gx = d_nx / denom - (d_nx * gx).sum(-1, keepdim=True) / (gx.shape[-1] * denom * denom)
        coef = torch.where(gx > 0, d_gx / gx, torch.zeros_like(gx))  # dG/dx = x / G (0 where G = 0)
        dx = torch.mul(x, coef.to(x.dtype), out=work)
        dx.addcmul_(g, (1 + gamma32 * nx).to(g.dtype))  # dx = x * coef + g * scale
        return dx, d_gamma.to(gamma.dtype), d_beta.to(gamma.dtype), None
