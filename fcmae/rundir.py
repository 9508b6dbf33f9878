"""Every path of a run directory, and its metrics.jsonl: the one place their names are spelled.

    OUTPUT/config.yaml                  the resolved configuration the run printed
    OUTPUT/metrics.jsonl                one JSON object a line: {"step", "epoch", <metric>: value, ...}
    OUTPUT/skipped_files.txt            unreadable files the loaders skipped, one a line
    OUTPUT/val_split.txt                the held-out files of a fine-tuning run without val/
    OUTPUT/tensorboard/                 TensorBoard logs
    OUTPUT/reconstructions/step*.png    pre-training's reconstruction grids
    OUTPUT/checkpoints/last.ckpt        kept current: what a rerun of the command resumes from
    OUTPUT/checkpoints/step*.ckpt       pre-training's periodic checkpoints
    OUTPUT/checkpoints/best.ckpt        fine-tuning's best validation weights
    OUTPUT/encoder.safetensors          pre-training's export
    OUTPUT/classifier.safetensors       fine-tuning's last weights; classifier_ema / classifier_best
    OUTPUT/confusion.png, curves.png    fine-tuning's report
"""
import json
from pathlib import Path

import yaml

from fcmae.files import append_line, atomic_write

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SKIPPED_FILES = "skipped_files.txt"
VAL_SPLIT = "val_split.txt"
TENSORBOARD = "tensorboard"
RECONSTRUCTIONS = "reconstructions"
RECONSTRUCTION = "step{step:07d}.png"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
BEST = "best.ckpt"
PERIODIC = "step{step:07d}"  # Lightning's ModelCheckpoint filename: it adds .ckpt
EXPORT = "{kind}.safetensors"  # kind: encoder or classifier (or classifier_ema, classifier_best)
CONFUSION = "confusion.png"
CURVES = "curves.png"


class RunDir:
    """The paths of the run directory `root` (which need not exist yet)."""

    def __init__(self, root):
        self.root = Path(root)

    def __fspath__(self):
        return str(self.root)

    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    last = property(lambda self: self.checkpoints / LAST)
    best = property(lambda self: self.checkpoints / BEST)
    config = property(lambda self: self.root / CONFIG)
    metrics = property(lambda self: self.root / METRICS)
    skipped_files = property(lambda self: self.root / SKIPPED_FILES)
    val_split = property(lambda self: self.root / VAL_SPLIT)
    reconstructions = property(lambda self: self.root / RECONSTRUCTIONS)
    tensorboard = property(lambda self: self.root / TENSORBOARD)
    confusion = property(lambda self: self.root / CONFUSION)
    curves = property(lambda self: self.root / CURVES)

    def export(self, kind="encoder"):
        """OUTPUT/<kind>.safetensors: encoder, classifier, classifier_ema, classifier_best."""
        return self.root / EXPORT.format(kind=kind)


def checkpoint_in(path):
    """A run directory -> its checkpoints/last.ckpt; a file stays itself."""
    path = Path(path)
    return RunDir(path).last if path.is_dir() else path


def run_dir_of(checkpoint):
    """The run directory a checkpoint file belongs to (the folder above checkpoints/), else its folder."""
    folder = Path(checkpoint).parent
    return folder.parent if folder.name == CHECKPOINTS else folder


def is_last(checkpoint):
    """Whether a path names a run's last.ckpt (whose run directory, not file, names the run)."""
    return Path(checkpoint).name == LAST


def write_config(run_dir, resolved):
    """OUTPUT/config.yaml, atomically (a crash leaves the previous one or none)."""
    atomic_write(RunDir(run_dir).config, lambda tmp: tmp.write_text(yaml.safe_dump(resolved, sort_keys=False)))


def append_metrics(path, step, epoch, metrics):
    """One row of metrics.jsonl: {"step", "epoch", **metrics}; earlier rows are never rewritten."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    append_line(path, json.dumps({"step": step, "epoch": epoch, **metrics}))


def read_scalars(folder, tag=None):
    """[(step, value)] of scalar `tag` in the TensorBoard event files of `folder` (a run's
    tensorboard/), in step order; tag None: of every tag. A damaged file gives what it holds."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    found = {}
    for events in sorted(Path(folder).glob("events.out.tfevents.*")):
        try:
            for event in EventFileLoader(str(events)).Load():
                for value in event.summary.value:
                    if tag is None or value.tag == tag:
                        found[event.step, value.tag] = value.simple_value if value.HasField("simple_value") \
                            else float(value.tensor.float_val[0]) if value.tensor.float_val else None
        except Exception:  # noqa: BLE001 (a log cut short: what was read stands)
            continue
    return sorted((step, v) for (step, _), v in found.items() if v is not None)


def read_metrics(path):
    """The rows of a metrics.jsonl, the last one per epoch (a resumed run may repeat an epoch)."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]
