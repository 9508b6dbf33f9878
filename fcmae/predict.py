"""`fcmae predict`: a trained classifier on new images, one CSV row per image.

    fcmae predict --checkpoint runs/my-ft/classifier.safetensors photos/ more/*.jpg --output preds.csv

The classifier may be any file `fcmae eval` takes: a fine-tuning last.ckpt (or its run folder),
classifier*.safetensors, or a release fine-tuned checkpoint (its classes are named by index). Each
input is read with the eval transform the classifier was trained with (input size and crop from
the file). Folders are walked recursively for images and `.npy` arrays (C, H, W; read as in
training: uint8 scaled to [0, 1], float as stored, not normalized).

CSV columns: path, class_1, prob_1, ..., class_K, prob_K, error. A file that cannot be read gets
a row with its error and empty predictions; the exit code is 0 when every file was read, 1 when
some were not (2: a mistake in the command, as for every fcmae command).

Python, the same code:

    from fcmae import Classifier
    clf = Classifier.load("runs/my-ft/classifier.safetensors")
    for p in clf.predict(["a.jpg", "b.png"]):
        print(p.path, p.top[0], p.error)
"""
import csv
import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from fcmae.checkpoints import read_weights
from fcmae.data import ARRAY_EXTENSIONS, BadFile, convert_image, load_image, read_array
from fcmae.encoders import ConvNeXtV2
from fcmae.errors import UserError
from fcmae.files import write_atomic
from fcmae.finetune.data import STATS, eval_transform


@dataclass
class Prediction:
    """One input's result. `path`: the file (None for an image or tensor given in memory);
    `top`: [(class name, probability), ...], best first (empty when the input could not be read);
    `error`: why it could not be read, or None."""
    path: Optional[str]
    top: list = field(default_factory=list)
    error: Optional[str] = None

    @property
    def label(self):
        """The best class name, or None."""
        return self.top[0][0] if self.top else None


class Inputs(Dataset):
    """Inputs (paths, PIL images, tensors) -> (transformed tensor, error message or "")."""

    def __init__(self, items, transform, in_chans, size):
        self.items, self.transform, self.in_chans, self.size = items, transform, in_chans, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            return self.transform(self.read(self.items[i])).float(), ""
        except BadFile as e:
            return torch.zeros(self.in_chans, self.size, self.size), str(e)

    def read(self, item):
        if isinstance(item, torch.Tensor):  # as a .npy array: uint8 -> [0, 1], float as given
            if item.ndim != 3 or item.shape[0] != self.in_chans:
                raise BadFile(f"tensor of shape {tuple(item.shape)} (expected ({self.in_chans}, H, W))")
            return item.float() / 255 if item.dtype == torch.uint8 else item.float()
        if isinstance(item, Image.Image):
            item.load()
            if self.in_chans not in STATS:
                raise BadFile(f"a PIL image, but the classifier takes {self.in_chans}-channel arrays")
            return convert_image(item, "RGB" if self.in_chans == 3 else "L")  # as image files are
        path = Path(item)
        if path.suffix.lower() in ARRAY_EXTENSIONS:
            return read_array(path, self.in_chans)
        if self.in_chans not in STATS:
            raise BadFile(f"{path} (an image, but the classifier takes {self.in_chans}-channel .npy arrays)")
        return load_image(path, "RGB" if self.in_chans == 3 else "L")


class Classifier:
    """A trained ConvNeXt V2 classifier with its class names and eval transform, for prediction.

    `Classifier.load(path)` reads any classifier file `fcmae eval` takes; `predict(inputs)` runs
    it. The CLI `fcmae predict` is a thin wrapper around these two."""

    def __init__(self, model, classes, transform, in_chans, input_size, device="cpu", source=None):
        self.model = model.eval().to(device)
        self.classes, self.transform = list(classes), transform
        self.in_chans, self.input_size, self.device, self.source = in_chans, input_size, torch.device(device), source

    @classmethod
    def load(cls, path, ema=False, device=None, trust=False, input_size=None, crop_pct=None):
        """A classifier from an fcmae fine-tuning last.ckpt (or its run folder; `ema`: its EMA
        weights), an fcmae classifier export, or a release fine-tuned checkpoint. The input size
        and crop are the file's (else 224 and 224/256) unless given; classes without stored names
        are named "0", "1", ... `device`: default the GPU if there is one. `trust`: unpickle fully
        (runs code from the file; only for files you trust). An encoder without a head is a
        one-line UserError."""
        weights = read_weights(path, ema, trust)
        if not weights.num_classes:
            raise UserError(f"{path} is an encoder without a classifier head: fine-tune it first "
                            f"(`fcmae finetune --pretrained {path}`) and predict with its classifier.safetensors")
        meta, args = weights.meta, weights.meta.get("args") or {}
        input_size = input_size or meta.get("input_size") or args.get("input_size") or 224
        if crop_pct is None:
            crop_pct = meta.get("crop_pct") or args.get("crop_pct")
        model = ConvNeXtV2(weights.model, weights.in_chans, weights.num_classes)
        model.load_state_dict(weights.state)
        classes = weights.classes or [str(i) for i in range(weights.num_classes)]
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, classes, eval_transform(input_size, weights.in_chans, crop_pct), weights.in_chans,
                   input_size, device, source=weights.summary())

    @torch.no_grad()
    def predict(self, inputs, topk=5, batch_size=64, workers=0):
        """inputs: a path, PIL image or (C, H, W) tensor, or a list of them (or an (N, C, H, W)
        tensor). Paths are image files
        or .npy arrays; a tensor is taken as an array (uint8 scaled to [0, 1], float as given, not
        normalized), a PIL image as an image file. Returns one `Prediction` per input, in order:
        `.top` = [(class name, probability), ...] of the `topk` most probable classes, best first;
        an input that cannot be read has `.error` set and no `.top` (nothing is raised for it)."""
        single = isinstance(inputs, (str, os.PathLike, Image.Image)) or (torch.is_tensor(inputs) and inputs.ndim != 4)
        items = [inputs] if single else list(inputs)  # a (N, C, H, W) tensor: N inputs
        topk = max(1, min(topk, len(self.classes)))
        dataset = Inputs(items, self.transform, self.in_chans, self.input_size)
        workers = min(workers, math.ceil(len(items) / batch_size))  # no idle processes for a few files
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                            pin_memory=self.device.type == "cuda")
        out = []
        for x, errors in loader:  # x (N, C, S, S)
            probs = self.model(x.to(self.device, non_blocking=True)).float().softmax(-1)  # (N, classes)
            p, idx = probs.topk(topk, dim=-1)  # (N, topk)
            for j, error in enumerate(errors):
                item = items[len(out)]
                path = None if isinstance(item, (Image.Image, torch.Tensor)) else str(item)
                top = [] if error else [(self.classes[c], float(q)) for c, q in zip(idx[j].tolist(), p[j])]
                out.append(Prediction(path, top, error or None))
        return out[0] if single else out


# ----------------------------------------------------------------------------- the command

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
