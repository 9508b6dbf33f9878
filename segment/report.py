"""Segmentation results you can look at: predictions.png (image | truth | prediction for a fixed
spread of val images, in one palette, with a legend of class names: fcmae.labelmaps), the
per-class IoU / accuracy table, and curves.png (fcmae.figures.plot_curves with segmentation's
panels, by step). Every file is written atomically (fcmae.files)."""
import numpy as np
import torch

from fcmae.figures import plot_curves, pyplot
from fcmae.files import save_figure
from fcmae.labelmaps import IGNORE, IGNORE_COLOUR, colorize, displayable

# curves.png of a segmentation run: metrics.jsonl rows by optimizer step
SEGMENTATION_PANELS = [("loss", [("train_loss", "train")]),
                       ("val (%)", [("mIoU", "mIoU"), ("mAcc", "mean accuracy"), ("aAcc", "pixel accuracy")]),
                       ("lr", [("lr", "head lr")])]


def plot_predictions(samples, classes, palette, path, title=None):
    """predictions.png: one row per (image (C, H, W) as read, truth (H, W), prediction (H, W)):
    image | truth | prediction in `palette`, and a legend naming the classes shown."""
    plt = pyplot()
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
    """`scores` (fcmae.segment.metrics; per-class values as tensors or lists) as text: IoU and
    accuracy per class ("-" for a class absent from truth and prediction), then mIoU, mean
    accuracy and pixel accuracy."""
    width = max(8, *(len(c) for c in classes))

    def cell(v):
        return f"{v:6.2f}" if v == v else "     -"  # NaN: no pixels of the class
    lines = [f"{'class':<{width}}     IoU     acc"]
    ious, accs = (torch.as_tensor(result[k]).tolist() for k in ("IoU", "Acc"))
    for name, iou, acc in zip(classes, ious, accs):
        lines.append(f"{name:<{width}}  {cell(iou)}  {cell(acc)}")
    lines.append(f"mIoU {result['mIoU']:.2f}, mean accuracy {result['mAcc']:.2f}, pixel accuracy {result['aAcc']:.2f} "
                 f"(classes absent from truth and prediction left out of the means)")
    return "\n".join(lines)


def plot_segmentation_curves(metrics, path):
    """curves.png from a segmentation run's metrics.jsonl: train loss, val mIoU / accuracies, lr, by step."""
    return plot_curves(metrics, path, SEGMENTATION_PANELS, x="step")
