"""`fcmae predict`: a trained classifier on new images, one CSV row per image.

    fcmae predict --checkpoint runs/my-ft/classifier.safetensors photos/ more/*.jpg --output preds.csv

The classifier may be any file `fcmae eval` takes (fcmae.Classifier reads it). Folders are walked
recursively for images and `.npy` arrays. CSV columns: path, class_1, prob_1, ..., class_K, prob_K,
error. A file that cannot be read gets a row with its error and empty predictions; the exit code
is 0 when every file was read, 1 when some were not (2: a mistake in the command, as for every
fcmae command).
"""
import csv
import io
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torchvision.datasets.folder import IMG_EXTENSIONS

from fcmae.classifier import Classifier
from fcmae.data.reading import ARRAY_EXTENSIONS
from fcmae.errors import UserError
from fcmae.files import write_atomic


def find_inputs(inputs):
    """Command-line inputs -> files: files as given, folders walked recursively (sorted) for
    images and .npy arrays. A missing input or an empty folder is a UserError."""
    extensions = tuple(IMG_EXTENSIONS) + ARRAY_EXTENSIONS
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(Path(d, f) for d, _, names in os.walk(path) for f in names if f.lower().endswith(extensions))
            if not found:
                raise UserError(f"{name}: no images or .npy files in this folder (looked recursively)")
            files += found
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise UserError(f"{name}: no such file or folder: pass image files, .npy files or folders of them")
    return files


def to_csv(predictions, topk):
    """CSV text: path, class_1, prob_1, ..., class_K, prob_K, error."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path"] + [f"{c}_{i}" for i in range(1, topk + 1) for c in ("class", "prob")] + ["error"])
    for p in predictions:
        cells = [v for name, prob in p.top for v in (name, f"{prob:.6f}")]
        writer.writerow([p.path] + cells + [""] * (2 * topk - len(cells)) + [p.error or ""])
    return text.getvalue()


def build_parser():
    p = ArgumentParser(description="Predict classes of images or .npy arrays with a trained classifier: one CSV row "
                                   "per file (path, class_1, prob_1, ..., error). Exit code 0: every file was "
                                   "read; 1: some could not be (their rows say why).")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("inputs", nargs="+", help="image files, .npy files, or folders of them (walked recursively)")
    p.add_argument("--checkpoint", type=Optional[str], default=None,
                   help="classifier*.safetensors, a fine-tuning last.ckpt (or run folder), or a release "
                        "fine-tuned checkpoint")
    p.add_argument("--output", type=str, default="predictions.csv", help="the CSV file to write")
    p.add_argument("--topk", type=int, default=5, help="classes per row (at most the classifier's)")
    p.add_argument("--ema", action="store_true", help="the EMA weights of a fine-tuning checkpoint")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", type=Optional[str], default=None, help="cpu, cuda, cuda:1, ... (default: a GPU if any)")
    p.add_argument("--workers", type=int, default=4, help="loader processes")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a torch file that needs full unpickling: runs code from the file, so only for "
                        "files you trust")
    return p


def predict(cfg):
    """The command: returns the predictions (and writes the CSV)."""
    if not cfg.checkpoint:
        raise UserError("fcmae predict needs --checkpoint FILE (a classifier) and images or folders to predict")
    for name in ("topk", "batch_size"):
        if cfg[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} {cfg[name]}: must be at least 1")
    if cfg.workers < 0:
        raise UserError(f"--workers {cfg.workers}: must be 0 or more")
    if Path(cfg.output).is_dir():
        raise UserError(f"--output {cfg.output} is a folder: pass the path of the CSV file to write")
    if cfg.device is not None:
        try:
            torch.empty(0, device=cfg.device)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f"--device {cfg.device}: {str(e).splitlines()[0]}: pass cpu or an available GPU") from None
    files = find_inputs(cfg.inputs)
    clf = Classifier.load(cfg.checkpoint, cfg.ema, cfg.device, cfg.trust_checkpoint)
    print(f"{clf.source}; {len(files)} files", file=sys.stderr)
    predictions = clf.predict(files, cfg.topk, cfg.batch_size, cfg.workers)
    write_atomic(cfg.output, to_csv(predictions, min(cfg.topk, len(clf.classes))))
    failed = [p for p in predictions if p.error]
    print(f"wrote {cfg.output}: {len(predictions) - len(failed)} files predicted"
          + (f", {len(failed)} could not be read (see the error column)" if failed else ""), file=sys.stderr)
    return predictions


def run(cfg):
    predictions = predict(cfg)
    return 1 if any(p.error for p in predictions) else 0
