"""`fcmae.Segmenter`: a trained segmenter on new images -> one label map per image, at its own
size; and `infer`, the inference every segmentation evaluation runs (training's validation,
`fcmae eval`, `fcmae predict`).

    from fcmae import Segmenter
    seg = Segmenter.load("runs/seg/segmenter.safetensors")
    for p in seg.predict(["a.jpg", "b.png"]):
        print(p.path, p.error or seg.fractions(p.labels))
        seg.overlay(p.path, p.labels).save("a_overlay.png")

The file is a segmentation export or a segmentation Lightning checkpoint (or its run folder):
fcmae.checkpoints.read_segmenter; its metadata give the classes, palette, evaluation scale,
normalization and in_chans. Inputs are read as `fcmae.Classifier` reads them
(fcmae.data.reading.read_input: image files converted to RGB or grayscale, `.npy` arrays
(C, H, W), PIL images, tensors read as arrays: uint8 scaled to [0, 1], float as given), then
normalized as the model's training images were (arrays of a model trained on arrays are used as
stored).

Inference is mmsegmentation's test pipeline: the image rescaled to the evaluation scale (keeping
its aspect ratio, `rescale_size`), run whole or in sliding windows, the logits resized back to
the image's size and softmaxed; with several `ratios` of the scale and `flip`, the probabilities
of every pass averaged (test-time augmentation, TTA_RATIOS).
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from fcmae import labelmaps
from fcmae.checkpoints import architecture, read_segmenter
from fcmae.data.reading import BadFile, read_input
from fcmae.data.transforms import ToFloat
from fcmae.decoders.upernet import UperNetSegmenter
from fcmae.masking import PATCH_SIZE

SCALE = (2048, 512)  # ADE20K's evaluation scale (long, short), the training scale
TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
WINDOW = (512, 341)  # sliding window: (crop, stride)


# ----------------------------------------------------------------------------- inference

def rescale_size(height, width, scale):
    """(h, w) of an image rescaled to fit `scale` = (long, short) keeping its aspect ratio: the
    largest size whose long side is at most `long` and short side at most `short` (mmcv's rule)."""
    long, short = max(scale), min(scale)
    factor = min(long / max(height, width), short / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def whole(model, x):
    """x (N, C, h, w) -> logits (N, K, h, w): padded (bottom, right, zeros) to multiples of the
    encoder's stride for the forward pass, cropped back after."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % PATCH_SIZE, -w % PATCH_SIZE
    logits = model(F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x)
    return logits[..., :h, :w]


def slide(model, x, crop, stride):
    """x (N, C, h, w) -> logits (N, K, h, w) averaged over crop x crop windows every `stride`
    pixels, the last row and column of windows flush with the border (mmsegmentation's grid)."""
    n, _, h, w = x.shape
    rows, cols = (max(side - crop + stride - 1, 0) // stride + 1 for side in (h, w))
    logits = x.new_zeros(n, model.num_classes, h, w)
    count = x.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride + crop, h), min(c * stride + crop, w)
            top, left = max(bottom - crop, 0), max(right - crop, 0)
            logits[..., top:bottom, left:right] += whole(model, x[..., top:bottom, left:right])
            count[..., top:bottom, left:right] += 1
    return logits / count


@torch.no_grad()
def infer(model, image, size=None, scale=SCALE, ratios=(1.0,), flip=False, window=None):
    """image (N, C, H, W), normalized, at its own size -> class probabilities (N, K, *size),
    default size (H, W). Each pass runs at rescale_size(H, W, scale x ratio), whole or in sliding
    `window` = (crop, stride); with `flip` each ratio also runs mirrored."""
    height, width = image.shape[-2:]
    size = tuple(size or (height, width))
    probs = 0
    for ratio in ratios:
        hw = rescale_size(height, width, (scale[0] * ratio, scale[1] * ratio))
        x = image if hw == (height, width) else F.interpolate(image, size=hw, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            view = x.flip(-1) if flipped else x
            logits = whole(model, view) if window is None else slide(model, view, *window)
            logits = logits.flip(-1) if flipped else logits  # (N, K, h, w)
            probs = probs + F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).softmax(1)
    return probs / (len(ratios) * (2 if flip else 1))


def build_segmenter(state, meta):
    """The UperNetSegmenter that `state` (read_segmenter's) fits, loaded strictly, in eval mode."""
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    size, in_chans, _ = architecture(encoder)
    head = meta.get("head") or {}
    model = UperNetSegmenter(size, meta["num_classes"], in_chans, channels=head.get("channels", 512),
                             aux_channels=head.get("aux_channels", 256))
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------- the API

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
        """`model`: an UperNetSegmenter; `meta`: its file's metadata (fcmae.checkpoints.
        segmenter_meta); `window`: (crop, stride) for sliding-window inference, None for the whole
        image; `tta`: multi-scale (TTA_RATIOS) + flip."""
        self.model = model.eval().to(device)
        self.device, self.window, self.tta, self.source = torch.device(device), window, tta, source
        self.classes = list(meta.get("classes") or map(str, range(model.num_classes)))
        self.palette = meta.get("palette") or labelmaps.default_palette(model.num_classes)
        self.scale = tuple(meta.get("scale") or (4 * meta["input_size"], meta["input_size"]))
        norm = meta.get("normalization")
        self.norm = None if norm is None else (tuple(norm["mean"]), tuple(norm["std"]))
        self.in_chans, self.meta = model.in_chans, meta

    @classmethod
    def load(cls, path, device=None, trust=False, window=None, tta=False):
        """A segmenter from a segmentation export or checkpoint (or its run folder); `device`:
        default the GPU if there is one; `trust`: unpickle fully (runs code from the file: only
        files you trust)."""
        state, meta = read_segmenter(path, trust)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(build_segmenter(state, meta), meta, device, window, tta, source=str(path))

    def image(self, item):
        """An input as read: uint8 (C, H, W) for images, float (C, H, W) for arrays and tensors;
        BadFile if it cannot be read."""
        image = read_input(item, self.in_chans, "segmenter")  # PIL image (RGB or L) or float tensor
        return pil_to_tensor(image) if isinstance(image, Image.Image) else image

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
                x = ToFloat(self.norm)(self.image(item))[None].to(self.device)  # (1, C, H, W)
            except BadFile as e:
                out.append(Segmentation(path, error=str(e)))
                continue
            probs = infer(self.model, x, scale=self.scale, ratios=ratios, flip=flip, window=self.window)
            out.append(Segmentation(path, probs[0].argmax(0).to(torch.uint8).cpu()))
        return out[0] if single else out

    def label_image(self, labels):
        """The label map as a palette PNG image (pixel value = label)."""
        return labelmaps.label_image(labels, self.palette)

    def overlay(self, item, labels, alpha=0.5):
        """The input (path, PIL image or tensor) with its label map blended in: an RGB PIL image."""
        return labelmaps.overlay(self.image(item), labels, self.palette, alpha)

    def fractions(self, labels):
        """{class name: share of the pixels}, in class order."""
        return dict(zip(self.classes, labelmaps.class_fractions(labels, len(self.classes)).tolist()))
