"""`fcmae export`: weights in the public release's dense ConvNeXt V2 layout.

    fcmae export runs/base                     # -> runs/base/encoder.safetensors
    fcmae export runs/base/checkpoints/last.ckpt --output base.pth
    fcmae export runs/ft-base --ema            # a fine-tuning run -> the full classifier (EMA weights)

A pre-training checkpoint gives the encoder only (downsample_layers.*, stages.*), dense-converted;
a fine-tuning checkpoint (dense model as `model.*`, EMA as `model_ema.module.*`) gives the whole
classifier, norm.* and head.* included. The release's own checkpoints (MinkowskiEngine layout)
convert too. `.safetensors` (default) carries metadata: model size, in_chans, input size, steps and
the run's configuration (values JSON-encoded); `.pth` holds {"model": weights, "meta": metadata}, like the
release's files. timm's `convnextv2_<size>` loads either through its checkpoint filter.
"""
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import ArgumentParser
from safetensors.torch import save_file

from fcmae.encoders import SIZES
from fcmae.encoders.convert import to_dense_encoder
from fcmae.errors import UserError

DENSE_KEYS = ("downsample_layers.", "stages.", "norm.", "head.")


def build_parser():
    p = ArgumentParser(prog="fcmae export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=str, help="a run directory (its checkpoints/last.ckpt) or a checkpoint file")
    p.add_argument("--output", type=Optional[str], default=None,
                   help="file to write, .safetensors or .pth (default: <run dir>/encoder.safetensors, "
                        "or classifier.safetensors for fine-tuning runs)")
    p.add_argument("--ema", action="store_true", help="fine-tuning checkpoints: take the EMA weights")
    return p


def find_checkpoint(source):
    path = Path(source)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: pass a run directory holding checkpoints/last.ckpt, "
                        f"or a .ckpt/.pth file")
    return path


def dense_weights(checkpoint, ema=False, name="this checkpoint"):
    """A loaded checkpoint -> (dense state dict in the public layout, "encoder" | "classifier");
    `name`: the file, for messages."""
    state = checkpoint.get("state_dict", checkpoint)
    if any(k.startswith("model.encoder.") for k in state):  # our pre-training run
        if ema:
            raise UserError("--ema: pre-training checkpoints hold no EMA weights: drop --ema")
        return to_dense_encoder(state), "encoder"
    if any(k.startswith(("model.stages.", "model_ema.module.stages.")) for k in state):  # our fine-tuning run
        from fcmae.finetune.weights import classifier_state_dict  # also folds a linear probe's BatchNorm
        weights = {k: v for k, v in classifier_state_dict(state, ema).items() if k.startswith(DENSE_KEYS)}
    else:  # the release's files, or already-dense weights
        if ema and not isinstance(checkpoint.get("model_ema"), dict):
            raise UserError("--ema: this checkpoint holds no EMA weights (model_ema): drop --ema")
        weights = to_dense_encoder(checkpoint["model_ema"] if ema else checkpoint)
    if not weights:
        raise UserError(f"no ConvNeXt V2 weights found in {name}: pass an fcmae pre-training or "
                        "fine-tuning checkpoint, or a release checkpoint")
    return weights, "classifier" if "head.weight" in weights else "encoder"


def describe(weights):
    """(size name or 'custom', in_chans, depths, dims) read off the weights themselves."""
    dims = [weights[f"stages.{i}.0.dwconv.weight"].shape[0] for i in range(4)]
    depths = [len({m.group(1) for k in weights if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))}) for i in range(4)]
    name = next((n for n, (d, c) in SIZES.items() if (list(d), list(c)) == (depths, dims)), "custom")
    return name, weights["downsample_layers.0.0.weight"].shape[1], depths, dims


def metadata(checkpoint, weights, kind, ema):
    """safetensors metadata: strings as they are, everything else JSON-encoded."""
    hparams = checkpoint.get("hyper_parameters", {})
    config = hparams.get("config") or {k: v for k, v in hparams.items() if k != "config"}
    name, in_chans, depths, dims = describe(weights)
    meta = {"format": "pt", "layout": "convnextv2-dense", "kind": kind, "model": name, "depths": depths,
            "dims": dims, "in_chans": in_chans, "input_size": hparams.get("input_size", config.get("input_size")),
            "steps": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch"), "ema": ema, "config": config}
    if "head.weight" in weights:
        meta["num_classes"] = weights["head.weight"].shape[0]
    return {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()}


def write(weights, meta, path):
    """.safetensors with string metadata, or .pth as {"model", "meta"}; via a temporary file so an
    interrupted export never leaves a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    weights = {k: v.detach().contiguous() for k, v in weights.items()}
    if path.suffix == ".safetensors":
        save_file(weights, tmp, metadata=meta)
    else:
        torch.save({"model": weights, "meta": meta}, tmp)
    os.chmod(tmp, 0o644)  # safetensors creates files readable by the owner only
    os.replace(tmp, path)


def export(source, output=None, ema=False):
    """Checkpoint (or run directory) -> dense weights file; returns its path."""
    if output is not None and Path(output).suffix not in (".safetensors", ".pth", ".pt"):
        raise UserError(f"--output {output}: unknown format '{Path(output).suffix}': use .safetensors or .pth")
    ckpt_path = find_checkpoint(source)
    try:  # our checkpoints hold plain Python objects (hyperparameters) besides tensors
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read {ckpt_path} as a checkpoint ({str(e).splitlines()[0][:100]}): "
                        f"pass a .ckpt or .pth file") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{ckpt_path} holds a {type(checkpoint).__name__}, not a checkpoint: pass an fcmae "
                        f"pre-training or fine-tuning checkpoint, or a release checkpoint")
    weights, kind = dense_weights(checkpoint, ema, ckpt_path)
    if output is None:
        run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
        output = run_dir / f"{kind}.safetensors"
    output = Path(output)
    write(weights, metadata(checkpoint, weights, kind, ema), output)
    return output


def run(cfg):
    path = export(cfg.source, cfg.output, cfg.ema)
    print(f"wrote {path}")
