"""`fcmae export`: weights in the public release's dense ConvNeXt V2 layout.

    fcmae export runs/base                     # -> runs/base/encoder.safetensors
    fcmae export runs/base/checkpoints/last.ckpt --output base.pth
    fcmae export runs/ft-base --ema            # a fine-tuning run -> the full classifier (EMA weights)

A pre-training checkpoint gives the encoder only (downsample_layers.*, stages.*), dense-converted;
a fine-tuning checkpoint gives the whole classifier, norm.* and head.* included, and its class
names. The release's own checkpoints (MinkowskiEngine layout) convert too. `.safetensors`
(default) carries metadata: model size, in_chans, input size, steps and the run's configuration
(values JSON-encoded); `.pth` holds {"model": weights, "meta": metadata}, like the release's
files. timm's `convnextv2_<size>` loads either through its checkpoint filter. Reading and
writing are fcmae.checkpoints'.
"""
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentParser

from fcmae.checkpoints import read_weights, save_weights
from fcmae.errors import UserError


def build_parser():
    p = ArgumentParser(prog="fcmae export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=str, help="a run directory (its checkpoints/last.ckpt) or a checkpoint file")
    p.add_argument("--output", type=Optional[str], default=None,
                   help="file to write, .safetensors or .pth (default: <run dir>/encoder.safetensors, "
                        "or classifier.safetensors for fine-tuning runs)")
    p.add_argument("--ema", action="store_true", help="fine-tuning checkpoints: take the EMA weights")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a torch file that needs full unpickling: runs code from the file, so only for "
                        "files you trust")
    return p


def export(source, output=None, ema=False, trust=False):
    """Checkpoint (or run directory) -> dense weights file; returns its path."""
    if output is not None and Path(output).suffix not in (".safetensors", ".pth", ".pt"):
        raise UserError(f"--output {output}: unknown format '{Path(output).suffix}': use .safetensors or .pth")
    weights = read_weights(source, ema, trust)
    kind = "classifier" if weights.num_classes else "encoder"
    if output is None:
        path = weights.path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        output = run_dir / f"{kind}.safetensors"
    m = weights.meta
    meta = {"kind": kind, "input_size": m.get("input_size"), "crop_pct": m.get("crop_pct"), "steps": m.get("steps"),
            "epoch": m.get("epoch"), "ema": ema, "config": m.get("config") or {}}
    if weights.classes:
        meta["classes"] = weights.classes
    save_weights(output, weights.state, meta)
    return Path(output)


def run(cfg):
    path = export(cfg.source, cfg.output, cfg.ema, cfg.trust_checkpoint)
    print(f"wrote {path}")
