"""Results you can look at: a confusion matrix and per-class accuracy (printed as a table, saved
as a PNG with the class names on its axes) and the run's curves from metrics.jsonl (train and
val loss, val top-1 of the raw weights and the EMA, lr, per epoch). Written by `fcmae finetune`
at the end of a run and by `fcmae eval`."""
import torch

from fcmae.files import save_figure
from fcmae.rundir import read_metrics


def confusion_update(cm, logits, y):
    """Add a batch to `cm` (K, K): rows are the true classes, columns the predictions."""
    k = cm.shape[0]
    cm += torch.bincount(y * k + logits.argmax(1), minlength=k * k).reshape(k, k).to(cm)


@torch.no_grad()
def confusion_matrix(model, loader, num_classes, device):
    """(K, K) int64 confusion matrix of `model` over a loader of (image, label, ...) batches."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for batch in loader:
        x, y = batch[0].to(device), batch[1]
        confusion_update(cm, model(x).float().cpu(), y)  # x: (B, C, H, W) -> logits (B, K)
    return cm


def per_class_table(cm, classes):
    """Per-class accuracy, then the confusion matrix (at most 20 classes shown), as text."""
    cm = cm.cpu()
    counts = cm.sum(1)
    width = max(8, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  images  top-1"]
    for name, n, hit in zip(classes, counts.tolist(), cm.diag().tolist()):
        lines.append(f"{name:<{width}}  {n:>6}  {100 * hit / n:5.1f}" if n else f"{name:<{width}}  {0:>6}    -")
    total = int(counts.sum())
    if total:
        lines.append(f"{'all':<{width}}  {total:>6}  {100 * int(cm.diag().sum()) / total:5.1f}")
    if len(classes) <= 20:
        cell = max(5, len(str(int(cm.max()))) + 1)
        lines.append("confusion (rows: true class, columns: predicted, in class order)")
        for name, row in zip(classes, cm.tolist()):
            lines.append(f"{name:<{width}}  " + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def _figure():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_confusion(cm, classes, path, title="confusion matrix"):
    """The confusion matrix as a PNG: rows normalized per true class, counts in the cells."""
    plt = _figure()
    cm = cm.cpu()
    k = len(classes)
    rates = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    side = min(24, 2 + 0.5 * k)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=90 if k > 6 else 0)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    path = save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(metrics, path):
    """curves.png from metrics.jsonl: losses, val top-1 (raw and EMA), lr, per epoch."""
    plt = _figure()
    rows = read_metrics(metrics)
    epochs = [r["epoch"] for r in rows]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("loss", [("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)")]),
              ("val top-1 (%)", [("top1", "raw"), ("ema_top1", "EMA")]),
              ("lr", [("lr", "head lr")])]
    for ax, (label, keys) in zip(axes, panels):
        for key, name in keys:
            values = series(key)
            if any(v == v for v in values):  # not all NaN
                ax.plot(epochs, values, marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    path = save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path
