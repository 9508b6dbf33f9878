"""Inference at an image's own size: whole image (padded to the encoder's stride), sliding windows
on mmsegmentation's grid, multi-scale + flip averaging probabilities."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TINY

from fcmae.segment.inference import infer, slide, whole
from fcmae.segment.model import UperNetSegmenter


class Pointwise(nn.Module):
    """A 1x1 conv as a 'segmenter': each pixel's logits depend on that pixel only, so windows,
    padding and flips change nothing. Records the input sizes it is given."""

    def __init__(self, in_chans=3, num_classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.num_classes, self.sizes = nn.Conv2d(in_chans, num_classes, 1), num_classes, []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.conv(x)


def test_whole_pads_to_multiples_of_32_and_crops_back():
    model = Pointwise()
    x = torch.randn(1, 3, 50, 70)
    out = whole(model, x)
    assert model.sizes == [(64, 96)] and out.shape == (1, 4, 50, 70)
    torch.testing.assert_close(out, model.conv(x))


def test_sliding_windows_cover_the_image_on_mmsegmentations_grid():
    model = Pointwise()
    x = torch.randn(1, 3, 100, 200)
    out = slide(model, x, crop=64, stride=43)
    rows, cols = (100 - 64 + 42) // 43 + 1, (200 - 64 + 42) // 43 + 1  # 2 and 5 windows
    assert len(model.sizes) == rows * cols and set(model.sizes) == {(64, 64)}
    torch.testing.assert_close(out, model.conv(x), atol=1e-6, rtol=1e-5)  # overlaps averaged: the same values
    model.sizes = []
    small = slide(model, torch.randn(1, 3, 40, 50), crop=64, stride=43)  # smaller than one window
    assert model.sizes == [(64, 64)] and small.shape == (1, 4, 40, 50)


def test_a_real_segmenter_whole_equals_its_forward_when_no_padding_is_needed():
    model = UperNetSegmenter(TINY, 3, channels=16, aux_channels=8).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(whole(model, x), model(x), rtol=0, atol=0)
        probs = infer(model, x, scale=(96, 64))  # already at the scale: no resize
        torch.testing.assert_close(probs, model(x).softmax(1))
        windows = infer(model, x, scale=(96, 64), window=(64, 32))
        assert windows.shape == (1, 3, 64, 96) and torch.allclose(windows.sum(1), torch.ones(1, 64, 96))


def test_probabilities_come_back_at_the_image_size_after_rescaling():
    model = Pointwise()
    x = torch.randn(1, 3, 30, 45)
    probs = infer(model, x, scale=(256, 64))  # short side 30 -> 64
    assert model.sizes == [(64, 96)] and probs.shape == (1, 4, 30, 45)
    assert torch.allclose(probs.sum(1), torch.ones(1, 30, 45))
    assert infer(model, x, size=(60, 90), scale=(256, 64)).shape == (1, 4, 60, 90)  # the label's size


def test_multi_scale_and_flip_average_every_pass():
    model = Pointwise()
    x = torch.randn(1, 3, 64, 64)
    ratios = (0.5, 1.0, 1.5)
    probs = infer(model, x, scale=(256, 64), ratios=ratios, flip=True)
    assert sorted(model.sizes) == sorted([(32, 32)] * 2 + [(64, 64)] * 2 + [(96, 96)] * 2)
    expected = sum(F.interpolate(model.conv(F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
                                            if s != 64 else x), size=(64, 64), mode="bilinear",
                                 align_corners=False).softmax(1) for s in (32, 64, 96)) / 3
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)  # a pointwise model is flip-equivariant


def test_flip_is_undone_before_averaging():
    class LeftBiased(Pointwise):
        def forward(self, x):  # favours class 0 on the left half of whatever it sees
            logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
            logits[:, 0, :, : x.shape[-1] // 2] = 5.0
            return logits
    model = LeftBiased(num_classes=2)
    model.num_classes = 2
    probs = infer(model, torch.zeros(1, 3, 32, 64), scale=(64, 32), flip=True)
    # the mirrored pass favours the right half; undone and averaged: both halves alike
    torch.testing.assert_close(probs[0, 0, :, :32], probs[0, 0, :, 32:].flip(-1))
    assert probs[0, 0, 0, 0] == pytest.approx((torch.tensor([5.0, 0.0]).softmax(0)[0] + 0.5) / 2)
