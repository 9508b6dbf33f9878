"""The segmentation export: the whole segmenter in one weights file, written by the one weights
writer (fcmae.checkpoints.save_weights: .safetensors, or .pth for the release's format; atomic).

Tensors: the encoder in the public dense layout (`downsample_layers.*`, `stages.*`, as an encoder
export holds it: fcmae.checkpoints.read_weights reads the file as one, so it serves as pre-trained
weights anywhere), then the head under the segmenter's module names: `decoder.*` (UperNet),
`classifier.*`, `aux_head.*`.

Metadata (JSON values): what save_weights records (layout "convnextv2-dense", model, depths,
dims, in_chans), and TASK under "task", "num_classes", "classes" (names, label order), "palette"
([[r, g, b], ...], one per class), "input_size" (the training crop), "scale" ([long, short], the
evaluation scale), "normalization" ({"mean", "std"} of uint8 images, or null: arrays as stored),
"reduce_zero_label", "head" ({"name": "upernet", "channels", "aux_channels"}), and the caller's
own (steps, scores). A segmentation Lightning checkpoint keeps the same values as its
hyper_parameters, so `read_segmenter` reads both.
"""
from pathlib import Path

from fcmae.checkpoints import ENCODER_KEYS, architecture, load, parse_value, safetensors_metadata, save_weights
from fcmae.segment.model import UperNetSegmenter

TASK = "segmentation"


def export_state(model_state):
    """A segmenter's state dict (encoder.*, decoder.*, ...) -> the export's tensors."""
    return {k.removeprefix("encoder."): v for k, v in model_state.items()}


def model_state(export):
    """The export's tensors -> the segmenter's state dict."""
    return {("encoder." + k if k.startswith(ENCODER_KEYS) else k): v for k, v in export.items()}


def segmenter_meta(model, classes, palette, input_size, scale, norm, reduce_zero_label=False):
    """The metadata every segmentation file carries (the module docstring lists it)."""
    return {"task": TASK, "num_classes": model.num_classes, "classes": list(classes),
            "palette": [list(map(int, c)) for c in palette], "input_size": input_size, "scale": list(scale),
            "normalization": None if norm is None else {"mean": list(norm[0]), "std": list(norm[1])},
            "reduce_zero_label": bool(reduce_zero_label),
            "head": {"name": "upernet", "channels": model.channels, "aux_channels": model.aux_channels}}


def write_segmenter(path, model, meta, **extra):
    """`model` (UperNetSegmenter) with `meta` (`segmenter_meta`) and `extra` values -> `path`; returns it."""
    save_weights(path, export_state(model.state_dict()), {**meta, "kind": "segmenter", **extra})
    return Path(path)


def read_segmenter(path, trust=False):
    """(segmenter state dict, metadata) of a segmentation export or a segmentation Lightning
    checkpoint (its `model.*` and hyper_parameters). Anything else is a ValueError saying what
    the file is not. Reading runs no code from the file (fcmae.checkpoints.load)."""
    path = Path(path)
    obj = load(path, trust)
    if isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint of the segmentation module
        state = {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        meta = dict(obj.get("hyper_parameters") or {})
    elif path.suffix == ".safetensors":
        state, meta = model_state(obj), safetensors_metadata(path)
    else:  # .pth: {"model": tensors, "meta": JSON strings}
        state = model_state(obj.get("model") or {})
        meta = {k: parse_value(v) if isinstance(v, str) else v for k, v in (obj.get("meta") or {}).items()}
    if meta.get("task") != TASK or not any(k.startswith("decoder.") for k in state):
        raise ValueError(f"{path} holds no segmenter (no {TASK} head): pass a segmentation export or checkpoint")
    return state, meta


def build_segmenter(state, meta):
    """The UperNetSegmenter that `state` fits, loaded (strictly) and in eval mode."""
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    size, in_chans, _ = architecture(encoder)
    head = meta.get("head") or {}
    model = UperNetSegmenter(size, meta["num_classes"], in_chans, channels=head.get("channels", 512),
                             aux_channels=head.get("aux_channels", 256))
    model.load_state_dict(state)
    return model.eval()
