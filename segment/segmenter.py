"""`fcmae.Segmenter`: a trained segmenter on new images -> one label map per image, at its own size.

    from fcmae import Segmenter
    seg = Segmenter.load("runs/seg/segmenter.safetensors")
    for p in seg.predict(["a.jpg", "b.png"]):
        print(p.path, p.error or seg.fractions(p.labels))
        seg.overlay(p.path, p.labels).save("a_overlay.png")

The file is a segmentation export or a segmentation Lightning checkpoint (fcmae.segment.export);
its metadata give the classes, palette, evaluation scale, normalization and in_chans. Inputs are
read as `fcmae.Classifier` reads them (fcmae.classifier.Inputs): image files converted to RGB or
grayscale, `.npy` arrays (C, H, W), PIL images, tensors (read as arrays: uint8 scaled to [0, 1],
float as given); then normalized as the model's training images were (arrays of a model trained
on arrays are used as stored), rescaled to the evaluation scale, and their logits resized back.
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from fcmae.classifier import Inputs
from fcmae.data.reading import BadFile
from fcmae.data.transforms import ToFloat
from fcmae.segment import report
from fcmae.segment.export import build_segmenter, read_segmenter
from fcmae.segment.inference import TTA_RATIOS, infer


@dataclass
class Segmentation:
    """One input's result. `path`: the file (None for an image or tensor given in memory);
    `labels`: (H, W) uint8 at the input's own size (None when it could not be read); `error`:
    why it could not be read, or None."""
    path: Optional[str]
    labels: Optional[torch.Tensor] = None
    error: Optional[str] = None


class Segmenter:
    def __init__(self, model, meta, device="cpu", window=None, tta=False, source=None):
        """`model`: an UperNetSegmenter; `meta`: its file's metadata (fcmae.segment.export);
        `window`: (crop, stride) for sliding-window inference, None for the whole image; `tta`:
        multi-scale (TTA_RATIOS) + flip."""
        self.model = model.eval().to(device)
        self.device, self.window, self.tta, self.source = torch.device(device), window, tta, source
        self.classes = list(meta.get("classes") or map(str, range(model.num_classes)))
        self.palette = meta.get("palette") or report.default_palette(model.num_classes)
        self.scale = tuple(meta.get("scale") or (4 * meta["input_size"], meta["input_size"]))
        norm = meta.get("normalization")
        self.norm = None if norm is None else (tuple(norm["mean"]), tuple(norm["std"]))
        self.in_chans, self.meta = model.in_chans, meta
        self.inputs = Inputs([], None, model.in_chans, None)  # the classifier's reader of paths, PIL images, tensors

    @classmethod
    def load(cls, path, device=None, trust=False, window=None, tta=False):
        """A segmenter from a segmentation export or checkpoint; `device`: default the GPU if
        there is one; `trust`: unpickle fully (runs code from the file: only files you trust)."""
        state, meta = read_segmenter(path, trust)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(build_segmenter(state, meta), meta, device, window, tta, source=str(path))

    def read(self, item):
        """An input -> (C, H, W) float32, normalized as in training; BadFile if it cannot be read."""
        image = self.inputs.read(item)  # PIL image (RGB or L) or float tensor (C, H, W)
        if isinstance(image, Image.Image):
            image = pil_to_tensor(image)  # uint8 (C, H, W)
        return ToFloat(self.norm)(image)

    @torch.no_grad()
    def predict(self, inputs):
        """inputs: a path, PIL image or (C, H, W) tensor, or a list of them. Returns one
        `Segmentation` per input, in order (one, for one input); an input that cannot be read has
        `.error` set and no labels (nothing is raised for it)."""
        single = isinstance(inputs, (str, os.PathLike, Image.Image)) or (torch.is_tensor(inputs) and inputs.ndim != 4)
        items = [inputs] if single else list(inputs)
        ratios, flip = (TTA_RATIOS, True) if self.tta else ((1.0,), False)
        out = []
        for item in items:
            path = None if isinstance(item, (Image.Image, torch.Tensor)) else str(item)
            try:
                x = self.read(item)[None].to(self.device)  # (1, C, H, W)
            except BadFile as e:
                out.append(Segmentation(path, error=str(e)))
                continue
            probs = infer(self.model, x, scale=self.scale, ratios=ratios, flip=flip, window=self.window)
            out.append(Segmentation(path, probs[0].argmax(0).to(torch.uint8).cpu()))
        return out[0] if single else out

    def label_image(self, labels):
        """The label map as a palette PNG image (pixel value = label)."""
        return report.label_image(labels, self.palette)

    def overlay(self, item, labels, alpha=0.5):
        """The input (path, PIL image or tensor) with its label map blended in: an RGB PIL image."""
        image = self.inputs.read(item)
        if isinstance(image, Image.Image):
            image = pil_to_tensor(image)  # uint8 (C, H, W)
        return report.overlay(image, labels, self.palette, alpha)

    def fractions(self, labels):
        """{class name: share of the pixels}, in class order."""
        return dict(zip(self.classes, report.class_fractions(labels, len(self.classes)).tolist()))
