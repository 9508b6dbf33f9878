"""Pictures and tables: predictions.png, the per-class table, curves.png by step."""
import json

import numpy as np
import torch
from PIL import Image

from fcmae.labelmaps import IGNORE, default_palette
from fcmae.segment.metrics import scores
from fcmae.segment.report import per_class_table, plot_predictions, plot_segmentation_curves


def test_predictions_png_has_one_row_per_image(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(torch.from_numpy(rng.integers(0, 256, (3, 32, 48), dtype=np.uint8)),
                torch.randint(0, 3, (32, 48)), torch.randint(0, 3, (32, 48))) for _ in range(3)]
    samples[0][1][0] = IGNORE
    path = plot_predictions(samples, ["sky", "road", "car"], default_palette(3), tmp_path / "predictions.png",
                            title="best weights")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.height > img.width * 0.6  # three rows of image | truth | prediction


def test_per_class_table_lists_every_class():
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    text = per_class_table(scores(confusion), ["sky", "road", "car"])
    lines = text.splitlines()
    assert lines[0].split() == ["class", "IoU", "acc"]
    assert lines[1].split() == ["sky", "75.00", "75.00"] and lines[2].split() == ["road", "66.67", "100.00"]
    assert lines[3].split() == ["car", "-", "-"]  # absent from truth and prediction
    assert lines[4].startswith("mIoU 70.83, mean accuracy 87.50, pixel accuracy 83.33")


def test_curves_by_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "train_loss": 1.2, "lr": 1e-5}, {"step": 20, "train_loss": 0.8, "mIoU": 40.0, "mAcc": 50.0,
                                                          "aAcc": 80.0, "lr": 1e-4},
            {"step": 20, "train_loss": 0.7, "mIoU": 41.0, "mAcc": 51.0, "aAcc": 81.0, "lr": 1e-4}]  # resumed: last wins
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = plot_segmentation_curves(metrics, tmp_path / "curves.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 2 * img.height
