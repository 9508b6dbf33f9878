"""Label maps (H, W) of class indices, as people look at them: one palette for every picture of a
run (`default_palette`, or the palette a segmentation file carries), a palette PNG whose pixel
values are the labels (`label_image`), colours (`colorize`), an overlay on the image, and the
share of the pixels each class takes. IGNORE (255) marks pixels that are neither trained on nor
scored; it is drawn black and shows the image through an overlay."""
import colorsys

import numpy as np
import torch
from PIL import Image

IGNORE = 255  # the label of pixels that are neither trained on nor scored
IGNORE_COLOUR = (0, 0, 0)


def default_palette(num_classes):
    """num_classes distinct colours [[r, g, b], ...]: hues a golden-ratio turn apart, alternating
    saturation and brightness, so neighbouring labels differ."""
    return [[round(255 * c) for c in colorsys.hsv_to_rgb((0.61803 * i) % 1, 0.9 - 0.35 * (i % 2),
                                                        0.95 - 0.3 * (i // 2 % 2))] for i in range(num_classes)]


def colour_table(palette):
    """(256, 3) uint8: label -> colour, IGNORE (and labels without a colour) black."""
    table = np.zeros((256, 3), np.uint8)
    table[:len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    table[IGNORE] = IGNORE_COLOUR
    return table


def colorize(labels, palette):
    """labels (H, W) -> uint8 (H, W, 3) in `palette`, IGNORE (and labels without a colour) black."""
    return colour_table(palette)[np.asarray(labels, np.int64).clip(0, 255)]


def label_image(labels, palette):
    """labels (H, W) -> a palette ("P") PIL image: pixel values are the labels, shown in `palette`."""
    img = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    img.putpalette(colour_table(palette).flatten().tolist())
    return img


def displayable(image):
    """An image (C, H, W) as read (uint8, or a float array) -> uint8 (H, W, 3): RGB as is, one
    channel as gray, other arrays their first three channels (or first one), each stretched to
    its own min-max."""
    x = torch.as_tensor(image)
    if x.dtype != torch.uint8:
        x = x[:3] if x.shape[0] >= 3 else x[:1]
        low, high = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
        x = ((x - low) / (high - low).clamp(min=1e-12) * 255).round().to(torch.uint8)
    if x.shape[0] != 3:
        x = x[:1].expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy()


def overlay(image, labels, palette, alpha=0.5):
    """The image with its label map blended in (`alpha` of the colour; IGNORE shows the image), RGB PIL image."""
    rgb = displayable(image).astype(np.float32)
    colours = colorize(labels, palette).astype(np.float32)
    shown = (np.asarray(labels) != IGNORE)[..., None]
    blended = np.where(shown, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(blended.round().astype(np.uint8))


def class_fractions(labels, num_classes):
    """(K,) float64: the share of the image's pixels given each class."""
    counts = torch.bincount(torch.as_tensor(labels).flatten().long().clamp(max=IGNORE), minlength=IGNORE + 1)
    return counts[:num_classes].double() / max(1, torch.as_tensor(labels).numel())
