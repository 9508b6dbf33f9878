"""Segmentation scores, in percent, from a confusion matrix of pixels (rows: true class, columns:
predicted) that torchmetrics accumulates over batches and sums over DDP ranks when computed.
Pixels labelled IGNORE are not counted.

Per class c: IoU = TP / (TP + FP + FN), accuracy = TP / (TP + FN). mIoU averages the IoU over the
classes present in the truth or the prediction: a class absent from both has no IoU (NaN) and is
left out of the mean. Mean accuracy averages over the classes present in the truth. Pixel
accuracy: correct pixels / labelled pixels. (mmsegmentation's definitions.)
"""
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from fcmae.labelmaps import IGNORE


def confusion_metric(num_classes):
    """The torchmetrics metric: `update(predictions (N, H, W), labels (N, H, W))`, `compute()`
    -> (K, K) int64 summed over every batch and rank."""
    return MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE, validate_args=False)


def scores(confusion):
    """(K, K) confusion matrix -> {"mIoU", "mAcc", "aAcc": floats, "IoU", "Acc": (K,) float64
    tensors, NaN for a class without them}, in percent."""
    confusion = confusion.double()
    tp = confusion.diag()
    truth, predicted = confusion.sum(1), confusion.sum(0)  # (K,), (K,)
    union = truth + predicted - tp
    iou = torch.where(union > 0, tp / union, torch.nan) * 100
    acc = torch.where(truth > 0, tp / truth, torch.nan) * 100
    total = truth.sum()
    return {"mIoU": float(iou.nanmean()), "mAcc": float(acc.nanmean()),
            "aAcc": float(tp.sum() / total * 100) if total > 0 else float("nan"), "IoU": iou, "Acc": acc}
