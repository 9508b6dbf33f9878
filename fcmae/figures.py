"""What every task's figures share: matplotlib without a display (`pyplot`) and curves.png, a run's
metrics.jsonl drawn one panel per quantity (`plot_curves`). Files go through fcmae.files.save_figure
(atomic)."""
from fcmae.files import save_figure
from fcmae.rundir import read_metrics


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported when first drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(metrics, path, panels, x="epoch"):
    """curves.png from metrics.jsonl: one panel per entry of `panels`, (y label, [(metrics.jsonl
    key, line label), ...]), each line against `x` ("epoch" or "step"; the last row per value,
    rundir.read_metrics). A key no row has is left out. Returns the path."""
    plt = pyplot()
    rows = read_metrics(metrics, x)
    xs = [r[x] for r in rows]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels):
        for key, name in keys:
            values = series(key)
            if any(v == v for v in values):  # not all NaN
                ax.plot(xs, values, marker="o", markersize=3, label=name)
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    path = save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path
