"""Label maps as people look at them (fcmae/labelmaps.py): one palette, IGNORE black, arrays shown
stretched; palette PNGs written atomically (fcmae.files.save_image)."""
import numpy as np
import torch
from PIL import Image

from fcmae.files import save_image
from fcmae.labelmaps import IGNORE, colorize, default_palette, displayable, label_image


def test_palette_is_distinct_and_ignore_is_black():
    palette = default_palette(150)
    assert len({tuple(c) for c in palette}) == 150 and all(0 <= v <= 255 for c in palette for v in c)
    labels = torch.tensor([[0, 1], [2, IGNORE]])
    rgb = colorize(labels, palette[:3])
    assert rgb.dtype == np.uint8 and rgb[0, 1].tolist() == palette[1] and rgb[1, 1].tolist() == [0, 0, 0]


def test_arrays_are_shown_stretched():
    array = torch.stack([torch.linspace(-3, 5, 12).view(3, 4)] * 4)  # 4 channels, values outside [0, 1]
    shown = displayable(array)
    assert shown.shape == (3, 4, 3) and shown.min() == 0 and shown.max() == 255
    gray = displayable(torch.full((1, 2, 2), 7, dtype=torch.uint8))
    assert gray.shape == (2, 2, 3) and (gray == 7).all()


def test_save_image_writes_a_png_atomically(tmp_path):
    labels = torch.tensor([[0, 1], [2, IGNORE]], dtype=torch.uint8)
    path = save_image(label_image(labels, default_palette(3)), tmp_path / "out" / "x.png")
    with Image.open(path) as img:
        assert img.mode == "P" and np.array(img).tolist() == labels.tolist()  # pixel values are the labels
        assert img.getpalette()[3:6] == default_palette(3)[1] and img.getpalette()[3 * IGNORE:3 * IGNORE + 3] == [0, 0, 0]
    assert not (tmp_path / "out" / "x.png.tmp").exists()
