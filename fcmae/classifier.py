"""`fcmae.Classifier`: a trained classifier on new images (what `fcmae predict` runs).

The classifier may be any file `fcmae eval` takes: a fine-tuning last.ckpt (or its run folder),
classifier*.safetensors, or a release fine-tuned checkpoint (its classes are named by index). Each
input is read with the eval transform the classifier was trained with (input size and crop from
the file): images, or `.npy` arrays (C, H, W; read as in training: uint8 scaled to [0, 1], float
as stored, not normalized). An input that cannot be read gets a `Prediction` with its error.

    from fcmae import Classifier
    clf = Classifier.load("runs/my-ft/classifier.safetensors")
    for p in clf.predict(["a.jpg", "b.png"]):
        print(p.path, p.top[0], p.error)
"""
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fcmae.checkpoints import read_weights
from fcmae.data.reading import ARRAY_EXTENSIONS, BadFile, convert_image, load_image, read_array
from fcmae.data.transforms import STATS, eval_transform
from fcmae.encoders import ConvNeXtV2
from fcmae.errors import UserError


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
