"""The 7x7 depthwise convolution of the ConvNeXt V2 block, with its backward computed another way.

`DepthwiseConv2d` is an `nn.Conv2d` (same parameters, same state-dict keys) whose forward and
backward are ours, on dense maps (`forward`) and on the visible rows of a stage (`forward_rows`).

Why. oneDNN, PyTorch's CPU convolution library, computes a depthwise kernel's weight gradient
10-50x slower than its forward (docs/performance.md). That gradient is, per sample and channel,
the correlation of the input map with the output gradient, summed over the batch: one depthwise
convolution over the N*C (channel, sample) maps of a single image, whose kernels are the output
gradients and whose output is the k x k weight gradient ("batch and channels swapped"). It runs
on the fast forward kernel. The input gradient is the forward convolution with the kernel
flipped, again the fast kernel. Both give the same numbers up to summation order.

On CUDA the default stays torch's own backward (cuDNN) on channels-last maps (`BACKWARD`):
whether the swapped form pays there is for `scripts/gpu_check.py` (part `depthwise`) to measure. Dense maps are
made channels-last (cuDNN's and oneDNN's fast depthwise layout; torch's own CUDA kernel for
channels-first maps has a slow backward).

Precision: under autocast the convolution runs in the autocast type like `nn.Conv2d` (input,
kernel and bias cast to it); the weight gradient's sum over the batch is taken in float32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .grn import statistics_dtype

# How the backward runs, per device type: "swapped" (the forward kernel, see above) or "native"
# (torch's own convolution backward, channels-last). Measured on CPU; CUDA not yet measured.
BACKWARD = {"cpu": "swapped", "cuda": "native"}


def backward_method(device):
    return BACKWARD.get(device.type, "native")


def compute_dtype(x):
    """The type a convolution of x runs in: the autocast type when autocast is on for x's device."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


def conv(x, weight, bias=None):
    """Stride-1 'same' depthwise convolution: x (N, C, H, W), weight (C, 1, k, k)."""
    return F.conv2d(x, weight, bias, 1, weight.shape[-1] // 2, 1, weight.shape[0])


def input_grad(g, weight):
    """Input gradient of `conv` for output gradient g (N, C, H, W): the flipped kernel's forward."""
    return conv(g, weight.flip(2, 3))


def weight_grad(x, g, weight, method="swapped"):
    """Weight gradient (C, 1, k, k) of `conv(x, weight)` for output gradient g, both (N, C, H, W).

    swapped: x and g as the N*C maps of one image (channel-major copies), g the kernels; the
    depthwise conv over them gives each (channel, sample)'s k x k gradient, summed over samples in
    float32."""
    n, c, h, w = x.shape
    k = weight.shape[-1]
    if method == "native":
        return torch.ops.aten.convolution_backward(
            g, x, weight, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], c, [False, True, False])[1]
    maps = x.transpose(0, 1).reshape(1, c * n, h, w)  # (1, C*N, H, W), channel-major copy
    kernels = g.transpose(0, 1).reshape(c * n, 1, h, w)
    return weight_grad_channel_major(maps, kernels, n, k).to(weight.dtype)


def weight_grad_channel_major(maps, kernels, n, k):
    """maps (1, C*N, H, W), kernels (C*N, 1, H, W), (channel, sample)-ordered -> (C, 1, k, k),
    summed over samples in float32 (float64 for float64)."""
    per_map = F.conv2d(maps, kernels, None, 1, k // 2, 1, kernels.shape[0])  # (1, C*N, k, k)
    return per_map.view(-1, n, k, k).sum(1, keepdim=True, dtype=statistics_dtype(per_map))


class _DenseDepthwise(torch.autograd.Function):
    """`conv` with our backward; x, weight, bias in one floating type."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's fast layout for depthwise
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return conv(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous(memory_format=torch.channels_last)
        method = backward_method(g.device)
        gx = input_grad(g, weight) if ctx.needs_input_grad[0] else None
        gw = weight_grad(x, g, weight, method) if ctx.needs_input_grad[1] else None
        gb = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3), dtype=statistics_dtype(g)).to(g.dtype)
        return gx, gw, gb


class _RowsDepthwise(torch.autograd.Function):
    """Rows (M, C) -> rows (M, C) of a row layout: scatter, `conv`, gather. Only the rows are kept
    for backward; the maps are rebuilt from them."""

    @staticmethod
    def forward(ctx, x, weight, bias, layout):
        ctx.save_for_backward(x, weight)
        ctx.layout, ctx.has_bias = layout, bias is not None
        return layout.gather(conv(layout.scatter(x), weight, bias))

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layout = ctx.layout
        n, c = layout.shape[0], x.shape[1]
        method = backward_method(g.device)
        g_map = layout.scatter(g)  # (N, C, H, W), channels-last
        gx = layout.gather(input_grad(g_map, weight)) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1] and method == "native":
            gw = weight_grad(layout.scatter(x), g_map, weight, method)
        elif ctx.needs_input_grad[1]:
            h, w = layout.shape[1:]
            maps = layout.scatter_channel_major(x).view(1, c * n, h, w)
            kernels = layout.scatter_channel_major(g).view(c * n, 1, h, w)
            gw = weight_grad_channel_major(maps, kernels, n, weight.shape[-1]).to(weight.dtype)
        gb = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0, dtype=statistics_dtype(g)).to(g.dtype)
        return gx, gw, gb, None


def _cast(x, weight, bias):
    dtype = compute_dtype(x)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


class DepthwiseConv2d(nn.Conv2d):
    """k x k depthwise convolution, stride 1, 'same' padding: nn.Conv2d(dim, dim, k, padding=k//2,
    groups=dim) with our backward (module docstring)."""

    def __init__(self, dim, kernel_size=7):
        super().__init__(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x):
        """(N, C, H, W) -> (N, C, H, W), channels-last in memory."""
        return _DenseDepthwise.apply(*_cast(x, self.weight, self.bias))

    def forward_rows(self, x, layout):
        """x (M, C): the rows of a layout with `shape` (N, H, W), `scatter` (M, C) -> (N, C, H, W)
        channels-last, zero elsewhere, `gather` its inverse on the rows, and
        `scatter_channel_major` (M, C) -> (C, N*H*W) (`rows.VisibleRows`) -> (M, C)."""
        return _RowsDepthwise.apply(*_cast(x, self.weight, self.bias), layout)
