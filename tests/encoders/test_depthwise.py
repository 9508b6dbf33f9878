"""The depthwise convolution with our backward (encoders/depthwise.py) equals torch's own: float64
gradcheck, float32 against nn.functional.conv2d's autograd, dense maps and rows, both backward
methods, and the kernel types autocast uses."""
import pytest
import torch
import torch.nn.functional as F

from fcmae.encoders import depthwise
from fcmae.encoders.depthwise import DepthwiseConv2d
from fcmae.encoders.rows import stage_rows
from fcmae.masking import random_mask


def reference(x, conv):
    return F.conv2d(x, conv.weight, conv.bias, 1, conv.padding, 1, conv.groups)


def grads_of(fn, x, conv, weights):
    conv.zero_grad()
    x = x.detach().clone().requires_grad_()
    (fn(x) * weights).sum().backward()
    return x.grad, conv.weight.grad.clone(), conv.bias.grad.clone()


def assert_relative(actual, expected, rtol, what):
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert scale > 0 and diff <= rtol * scale, f"{what}: max |diff| {diff:.3g} > {rtol:g} x {scale:.3g}"


@pytest.mark.parametrize("method", ["swapped", "native"])
def test_gradcheck_float64(method, monkeypatch):
    monkeypatch.setitem(depthwise.BACKWARD, "cpu", method)
    torch.manual_seed(0)
    conv = DepthwiseConv2d(3, kernel_size=3).double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: depthwise._DenseDepthwise.apply(x, w, b),
                                    (x, conv.weight, conv.bias))


@pytest.mark.parametrize("method", ["swapped", "native"])
@pytest.mark.parametrize("shape", [(2, 8, 14, 14), (3, 16, 7, 9), (1, 4, 28, 28)])
def test_dense_matches_torch(method, shape, monkeypatch):
    monkeypatch.setitem(depthwise.BACKWARD, "cpu", method)
    torch.manual_seed(0)
    conv = DepthwiseConv2d(shape[1])
    x, weights = torch.randn(shape), torch.randn(shape)
    assert_relative(conv(x), reference(x, conv), 1e-6, "output")
    ours_all = grads_of(conv, x, conv, weights)
    theirs_all = grads_of(lambda t: reference(t, conv), x, conv, weights)
    for ours, theirs, what in zip(ours_all, theirs_all, ["input", "weight", "bias"]):
        assert ours.shape == theirs.shape
        assert_relative(ours, theirs, 1e-5, f"{method}: gradient of the {what}")


@pytest.mark.parametrize("method", ["swapped", "native"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_rows_match_dense_masked(method, per_sample, monkeypatch):
    """On rows: the dense conv of the zero-filled map at the visible positions, and its gradients."""
    monkeypatch.setitem(depthwise.BACKWARD, "cpu", method)
    torch.manual_seed(0)
    mask = random_mask(3, 2, 3, 0.5, generator=torch.Generator().manual_seed(0))  # 3 visible of 6 each
    layout = stage_rows(mask, 3 if per_sample else None)[1]  # stride 8: 4x4 positions per patch
    conv = DepthwiseConv2d(8)
    n, h, w = layout.shape
    dense_x = torch.randn(n, 8, h, w)
    rows = layout.gather(dense_x.contiguous(memory_format=torch.channels_last))  # (M, 8)
    weights = torch.randn(rows.shape)

    got = grads_of(lambda r: conv.forward_rows(r, layout), rows, conv, weights)
    want = grads_of(lambda r: layout.gather(reference(layout.scatter(r), conv)), rows, conv, weights)
    expected = layout.gather(reference(layout.scatter(rows), conv))
    assert_relative(conv.forward_rows(rows, layout), expected, 1e-6, "output")
    for ours, theirs, what in zip(got, want, ["input", "weight", "bias"]):
        assert_relative(ours, theirs, 1e-5, f"{method}: gradient of the {what}")


def test_autocast_types():
    """Under bf16 autocast the conv runs in bf16 like nn.Conv2d; parameter gradients are float32."""
    torch.manual_seed(0)
    conv = DepthwiseConv2d(8)
    x = torch.randn(2, 8, 14, 14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        ref = reference(x, conv)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_relative(out.float(), ref.float(), 2 ** -7, "bf16 output")
    out.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and conv.bias.grad.dtype == torch.float32


def test_is_a_conv2d_with_the_same_state_dict():
    conv = DepthwiseConv2d(8)
    plain = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
    assert isinstance(conv, torch.nn.Conv2d)
    assert {k: v.shape for k, v in conv.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
