"""Segmentation results you can look at: label maps in one palette (a palette PNG, an overlay on
the image), predictions.png (image | truth | prediction for a fixed spread of val images, with a
legend of class names), the per-class IoU / accuracy table, and curves.png (fine-tuning's plot
with segmentation's panels). Every file is written atomically (fcmae.files)."""
import colorsys
import io

import numpy as np
import torch
from PIL import Image

from fcmae.files import save_figure, write_atomic
from fcmae.finetune.report import _figure, plot_curves
from fcmae.segment.data import IGNORE

IGNORE_COLOUR = (0, 0, 0)
# curves.png of a segmentation run: metrics.jsonl rows by optimizer step
SEGMENTATION_PANELS = [("loss", [("train_loss", "train")]),
                       ("val (%)", [("mIoU", "mIoU"), ("mAcc", "mean accuracy"), ("aAcc", "pixel accuracy")]),
                       ("lr", [("lr", "head lr")])]


def default_palette(num_classes):
    """num_classes distinct colours [[r, g, b], ...]: hues a golden-ratio turn apart, alternating
    saturation and brightness, so neighbouring labels differ."""
    return [[round(255 * c) for c in colorsys.hsv_to_rgb((0.61803 * i) % 1, 0.9 - 0.35 * (i % 2),
                                                        0.95 - 0.3 * (i // 2 % 2))] for i in range(num_classes)]


def colorize(labels, palette):
    """labels (H, W) -> uint8 (H, W, 3) in `palette`, IGNORE (and labels without a colour) black."""
    table = np.zeros((256, 3), np.uint8)
    table[:len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    table[IGNORE] = IGNORE_COLOUR
    return table[np.asarray(labels, np.int64).clip(0, 255)]


def label_image(labels, palette):
    """labels (H, W) -> a palette ("P") PIL image: pixel values are the labels, shown in `palette`."""
    img = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    colours = np.zeros((256, 3), np.uint8)
    colours[:len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    colours[IGNORE] = IGNORE_COLOUR
    img.putpalette(colours.flatten().tolist())
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


def save_image(img, path):
    """A PIL image as a PNG at `path`, atomically; returns the path."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return write_atomic(path, buf.getvalue())


def plot_predictions(samples, classes, palette, path, title=None):
    """predictions.png: one row per (image (C, H, W) as read, truth (H, W), prediction (H, W)):
    image | truth | prediction in `palette`, and a legend naming the classes shown."""
    plt = _figure()
    from matplotlib.patches import Patch
    fig, axes = plt.subplots(len(samples), 3, figsize=(10.5, 3.4 * len(samples)), squeeze=False)
    shown = set()
    for row, (image, truth, prediction) in zip(axes, samples):
        for ax, picture, name in zip(row, (displayable(image), colorize(truth, palette), colorize(prediction, palette)),
                                     ("image", "truth", "prediction")):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.axis("off")
        shown |= set(torch.as_tensor(truth).unique().tolist()) | set(torch.as_tensor(prediction).unique().tolist())
    labels = sorted(c for c in shown if c < len(classes))
    handles = [Patch(color=np.asarray(palette[c]) / 255, label=classes[c]) for c in labels]
    if IGNORE in shown:
        handles.append(Patch(color=np.asarray(IGNORE_COLOUR) / 255, label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0))
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03 + 0.02 * (len(handles) // 6), 1, 1))
    path = save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def per_class_table(result, classes):
    """`scores` (fcmae.segment.metrics) as text: IoU and accuracy per class ("-" for a class
    absent from truth and prediction), then mIoU, mean accuracy and pixel accuracy."""
    width = max(8, *(len(c) for c in classes))

    def cell(v):
        return f"{v:6.2f}" if v == v else "     -"  # NaN: no pixels of the class
    lines = [f"{'class':<{width}}     IoU     acc"]
    for name, iou, acc in zip(classes, result["IoU"].tolist(), result["Acc"].tolist()):
        lines.append(f"{name:<{width}}  {cell(iou)}  {cell(acc)}")
    lines.append(f"mIoU {result['mIoU']:.2f}, mean accuracy {result['mAcc']:.2f}, pixel accuracy {result['aAcc']:.2f} "
                 f"(classes absent from truth and prediction left out of the means)")
    return "\n".join(lines)


def plot_segmentation_curves(metrics, path):
    """curves.png from a segmentation run's metrics.jsonl: train loss, val mIoU / accuracies, lr, by step."""
    return plot_curves(metrics, path, SEGMENTATION_PANELS, x="step")
