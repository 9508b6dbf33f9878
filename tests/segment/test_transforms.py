"""The ADE20K training pipeline (rescale, class-balanced crop, flip, photometric distortion,
normalize, pad) keeps image and mask aligned, and each step does what mmsegmentation's does."""
import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.data.transforms import normalization
from fcmae.data.views import seeded
from fcmae.labelmaps import IGNORE
from fcmae.segment.transforms import EvalTransform, TrainTransform, crop_box, photometric_distortion
from fcmae.segmenter import rescale_size


def test_rescale_keeps_the_ratio_within_long_and_short_sides():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)  # ADE20K's typical image: the short side binds
    assert rescale_size(256, 2000, (2048, 512)) == (262, 2048)  # a panorama: the long side binds
    assert rescale_size(100, 150, (1024, 256)) == (256, 384)  # upscaled
    assert rescale_size(100, 150, (256, 1024)) == (256, 384)  # (long, short) in either order


def blocks(size=96, seed=0):
    """An image whose every pixel tells its label: label = 40 + 50 * label in every channel, 4 labels in blocks."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.repeat(rng.integers(0, 4, (6, 6)), size // 6, 0), size // 6, 1).astype(np.uint8)
    image = torch.from_numpy(40 + 50 * labels).expand(3, -1, -1).contiguous()
    return image, torch.from_numpy(labels)


@pytest.mark.parametrize("seed", range(4))
def test_image_and_mask_stay_aligned_and_are_padded_to_the_crop(seed):
    image, mask = blocks()
    gray = image[:1]  # one channel: no photometric distortion, so the pixel values still tell the labels
    transform = TrainTransform(crop_size=64, scale=(256, 64), norm=None)
    with seeded(seed):
        x, y = transform(gray, mask)
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and y.shape == (64, 64) and y.dtype == torch.int64
    inside = y != IGNORE
    assert (x[0][~inside] == 0).all()  # padding: image 0, mask IGNORE
    told = ((x[0] * 255 - 40) / 50).round().long()  # each pixel's label from its value (bilinear edges aside)
    agree = (told[inside] == y[inside]).float().mean()
    assert agree > 0.9, agree


def test_rescale_ratio_and_padding_follow_the_scale():
    image, mask = blocks(96)
    sizes = set()
    for seed in range(30):
        with seeded(seed):
            _, y = TrainTransform(crop_size=512, scale=(256, 64), norm=None)(image[:1], mask)
        sizes.add(int((y != IGNORE).any(0).sum()))  # the rescaled width inside a 512 crop
    assert min(sizes) >= 32 - 1 and max(sizes) <= 128 + 1 and max(sizes) - min(sizes) > 40  # 64 x U(0.5, 2.0)


def test_crop_avoids_a_single_class_covering_most_of_it():
    mask = torch.zeros(100, 100, dtype=torch.uint8)
    mask[:, 80:] = 1  # class 1 in a strip: a 50 px crop is balanced (< 75% class 0) only with left >= 43
    balanced = []
    for seed in range(40):
        with seeded(seed):
            top, left = crop_box(mask, 50, cat_max_ratio=0.75)
        balanced.append(bool((mask[top:top + 50, left:left + 50] == 0).float().mean() < 0.75))
    assert sum(balanced) >= 24  # up to 10 tries: about 33 of 40; one plain random crop: about 6
    ignored = torch.full((100, 100), IGNORE, dtype=torch.uint8)
    ignored[:, :60] = 0  # one class and IGNORE: never balanced, the last try is taken
    with seeded(0):
        top, left = crop_box(ignored, 50)
    assert 0 <= top <= 50 and 0 <= left <= 50


def test_photometric_steps_by_hand(monkeypatch):
    import fcmae.segment.transforms as t
    image = torch.tensor([10, 100, 250], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2).contiguous()
    # every coin heads, contrast first; brightness +16, contrast x1.5, saturation x1, hue 0
    coins = iter([True, True, True, True, True, True])
    values = iter([16.0, 1.5, 1.0])
    monkeypatch.setattr(t, "coin", lambda: next(coins))
    monkeypatch.setattr(t, "uniform", lambda low, high: next(values))
    monkeypatch.setattr(t.torch, "randint", lambda low, high, size: torch.tensor(0))
    out = t.photometric_distortion(image)
    expected = torch.tensor([39, 174, 255])  # (x + 16) clipped, then x 1.5 truncated and clipped
    hsv_round_trip = np.array(Image.fromarray(expected.to(torch.uint8).view(1, 1, 3).numpy()).convert("HSV")
                              .convert("RGB"))[0, 0]
    assert out[:, 0, 0].tolist() == hsv_round_trip.tolist()  # saturation x1, hue 0: only HSV's rounding
    assert np.abs(hsv_round_trip.astype(int) - expected.numpy()).max() <= 2
    coins = iter([False, False, False, False, False])  # every step off
    assert torch.equal(t.photometric_distortion(image), image)


def test_saturation_and_hue_act_in_hsv():
    red = torch.tensor([200, 50, 50], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4).contiguous()
    hsv = np.array(Image.fromarray(red.permute(1, 2, 0).numpy()).convert("HSV"))[0, 0]
    for seed in range(30):
        with seeded(seed):
            out = photometric_distortion(red)
        h, s, v = np.array(Image.fromarray(out.permute(1, 2, 0).numpy()).convert("HSV"))[0, 0].astype(int)
        hue_shift = min((h - int(hsv[0])) % 256, (int(hsv[0]) - h) % 256)
        assert hue_shift <= round(18 * 256 / 180) + 1  # at most 36 degrees


def test_rgb_images_are_normalized_with_the_projects_statistics():
    image = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    x, _ = EvalTransform(normalization(3, False))(image, torch.zeros(64, 64, dtype=torch.uint8))
    mean, std = normalization(3, False)
    torch.testing.assert_close(x[:, 0, 0], (128 / 255 - torch.tensor(mean)) / torch.tensor(std))
    array = torch.rand(5, 8, 8)
    x, _ = EvalTransform(None)(array, torch.zeros(8, 8, dtype=torch.uint8))
    assert torch.equal(x, array)  # arrays as stored
