"""ConvNeXt V2 (dense): the classifier used for fine-tuning and export.

State-dict keys follow the public release's dense layout (`downsample_layers.*`, `stages.S.B.*`,
`norm.*`, `head.*`, GRN `gamma`/`beta` of shape (1, 1, 1, C)), so exported weights load into the
release's code and, through timm's own filter, into timm's `convnextv2_*` models.
"""
import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d, trunc_normal_

from fcmae.masking import PATCH_SIZE

from .depthwise import DepthwiseConv2d
from .grn import GRN

# name: (depths, dims)
SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def size_config(model):
    """(depths, dims) for a size name, or for a dict {"depths": ..., "dims": ...} (custom sizes)."""
    if isinstance(model, dict):
        return tuple(model["depths"]), tuple(model["dims"])
    if model not in SIZES:
        raise ValueError(f"unknown model '{model}': choose one of {', '.join(SIZES)}")
    return SIZES[model]


def match_grad_strides(module):
    """Give every parameter's gradient the parameter's own strides (`grad_like`); returns module."""
    for p in module.parameters():
        if p.requires_grad and any(s == 1 for s in p.shape):
            p.register_hook(grad_like(p))
    return module


def grad_like(param):
    """A gradient hook that gives `param`'s gradient `param`'s strides when both are contiguous
    (then only the strides of size-1 dimensions can differ: the bytes are the same). Convolution
    kernels with a size-1 dimension (the depthwise (C, 1, 7, 7), the decoder's 1x1) get gradients
    with channels-last strides from channels-last input or from oneDNN's multi-threaded kernels;
    DDP compares strides exactly, warns ("Grad strides do not match bucket view strides") and
    copies such gradients into its buckets element by element."""
    def hook(grad):
        if grad.stride() != param.stride() and grad.is_contiguous() and param.is_contiguous():
            return grad.as_strided(param.shape, param.stride())  # a view: no copy
        return grad
    return hook


class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear(C, 4C) -> GELU -> GRN -> Linear(4C, C) -> drop path -> + x.

    One forward for every backend (so that a wrapper of the block, such as an FSDP unit, sees
    each use of its parameters): on a dense map, or on the visible rows of a row layout."""

    def __init__(self, dim, drop_path=0.0):
        super().__init__()
        self.dwconv = DepthwiseConv2d(dim, kernel_size=7)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def mlp(self, x, grn):
        """The pointwise part on channels-last features (..., C); `grn` applies the GRN."""
        return self.pwconv2(grn(self.act(self.pwconv1(self.norm(x)))))

    def forward(self, x, where=None):
        """Dense: x (N, C, H, W) and `where` None or the visibility (N, H, W, 1), the dense-masked
        reference (masked positions are zero on input and output and do not enter GRN's norm)
        -> (N, C, H, W). Rows: x (M, C) and `where` their row layout (`rows.py`) -> (M, C)."""
        if where is not None and not torch.is_tensor(where):
            return self.forward_rows(x, where)
        visible = where
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        if visible is None:  # every position counts: GRN as one function over (N, H*W, 4C)
            y = self.mlp(y, lambda t: self.grn.grouped(t.flatten(1, 2)).view(t.shape))
        else:
            y = self.mlp(y, lambda t: self.grn(t, visible))
        y = x + self.drop_path(y.permute(0, 3, 1, 2))
        if visible is not None:
            y = y * visible.permute(0, 3, 1, 2)
        return y

    def forward_rows(self, x, layout):
        """x (M, C): the visible rows of a stage, `layout` their row layout -> (M, C)."""
        y = layout.depthwise(self.dwconv, x)
        y = self.mlp(y, lambda t: self._grn_rows(t, layout))
        return x + layout.drop_path(y, getattr(self.drop_path, "drop_prob", 0.0), self.training)

    def _grn_rows(self, x, layout):
        by_sample = layout.by_sample(x)  # (N, P, 4C) when every sample has P rows, else None
        if by_sample is not None:
            return self.grn.grouped(by_sample).view(x.shape)
        return self.grn.forward_rows(x, layout)


def make_trunk(in_chans, depths, dims, drop_path_rate):
    """The stem, downsampling layers and stages shared by the dense and sparse encoders."""
    downsample_layers = nn.ModuleList([nn.Sequential(
        nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))])
    for i in range(3):
        downsample_layers.append(nn.Sequential(
            LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear in depth
    stages, start = nn.ModuleList(), 0
    for depth, dim in zip(depths, dims):
        stages.append(nn.Sequential(*[Block(dim, rates[start + j]) for j in range(depth)]))
        start += depth
    return downsample_layers, stages


def init_weights(module):
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConvNeXtV2(nn.Module):
    def __init__(self, model="atto", in_chans=3, num_classes=1000, drop_path_rate=0.0,
                 head_init_scale=1.0):
        super().__init__()
        depths, dims = size_config(model)
        self.depths, self.dims, self.in_chans = depths, dims, in_chans
        self.num_features = dims[-1]
        self.downsample_layers, self.stages = make_trunk(in_chans, depths, dims, drop_path_rate)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        if num_classes > 0:
            self.head.weight.data.mul_(head_init_scale)
            self.head.bias.data.mul_(head_init_scale)
        match_grad_strides(self)  # no gradient copies in DDP's buckets

    def forward_features(self, x):
        """(N, in_chans, H, W) -> last-stage feature map (N, C_last, H/32, W/32)."""
        check_input(x, self.in_chans)
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward_stages(self, x):
        """(N, in_chans, H, W) -> the four stage outputs, finest first, as dense heads take them
        (UperNet, FPN, detection necks): [(N, C0, H/4, W/4), (N, C1, H/8, W/8), (N, C2, H/16, W/16),
        (N, C3, H/32, W/32)], C = dims, un-normalized (the last is `forward_features`)."""
        check_input(x, self.in_chans)
        stages = []
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
            stages.append(x)
        return stages

    def forward_head(self, x, pre_logits=False):
        x = self.norm(x.mean(dim=(-2, -1)))  # global average pool -> (N, C_last)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def check_input(x, in_chans):
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected images (N, {in_chans}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % PATCH_SIZE or x.shape[3] % PATCH_SIZE:
        raise ValueError(f"image sides must be multiples of {PATCH_SIZE}, got {x.shape[2]}x{x.shape[3]}")


def _register(name):
    def create(**kwargs):
        return ConvNeXtV2(name, **kwargs)
    create.__name__ = f"convnextv2_{name}"
    create.__doc__ = f"ConvNeXt V2-{name}: depths {SIZES[name][0]}, dims {SIZES[name][1]}."
    return create


MODELS = {f"convnextv2_{name}": _register(name) for name in SIZES}


def create_model(name, **kwargs):
    """`create_model("atto")` or `create_model("convnextv2_atto", num_classes=10)`."""
    return ConvNeXtV2(name.removeprefix("convnextv2_") if isinstance(name, str) else name, **kwargs)
