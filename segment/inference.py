"""Class probabilities of a segmenter at an image's own size, as mmsegmentation's test pipeline
computes them: the image rescaled to the evaluation scale (keeping its aspect ratio), run whole or
in sliding windows, the logits resized back to the image's size and softmaxed; with several
`ratios` of the scale and `flip`, the probabilities of every pass averaged (test-time
augmentation, TTA_RATIOS)."""
import torch
import torch.nn.functional as F

from fcmae.masking import PATCH_SIZE
from fcmae.segment.transforms import rescale_size

SCALE = (2048, 512)  # ADE20K's evaluation scale (long, short), the training scale
TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
WINDOW = (512, 341)  # sliding window: (crop, stride)


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
