"""Reading and writing weights and checkpoint files: every command goes through here.

Reading never runs code from the file. A `.safetensors` file holds only tensors and strings. A
torch file (`.pth`, `.pt`, `.ckpt`) is a pickle, and unpickling can call any function the file
names, so it is read with `torch.load(weights_only=True)`: tensors, containers and numbers only,
plus the types in SAFE_GLOBALS. That list is what real files need, found by listing the globals
each one pickles (`torch.serialization.get_unsafe_globals_in_checkpoint`):

- our Lightning checkpoints (`fcmae pretrain` and `fcmae finetune` last.ckpt, with the EMA, the
  timm scheduler's state, the callbacks' state and hyper_parameters): nothing. Lightning stores
  plain dicts, lists, numbers, strings and tensors; our hyper_parameters are plain values too (the
  same values are written to config.yaml with yaml.safe_dump, which takes nothing else);
- the public release's checkpoints ({"model", "optimizer", "epoch", "scaler", "args",
  "model_ema"}): `argparse.Namespace`, the training script's parsed arguments under "args".

A file that needs anything else is refused with one line before anything in it runs;
`--trust-checkpoint` (trust=True: full unpickling, which runs code from the file) is the only way
past it. Writes go to `<path>.tmp`, are fsynced, then renamed over `<path>`: a crash or a full
disk leaves the previous file whole (fcmae/files.py).
"""
import argparse
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fcmae.encoders import SIZES
from fcmae.encoders.convert import is_minkowski_layout, to_dense_encoder, unwrap
from fcmae.errors import SettingError, UserError
from fcmae.files import atomic_write
from fcmae.rundir import RunDir, checkpoint_in, run_dir_of

SAFE_GLOBALS = [argparse.Namespace]  # see the module docstring for why exactly these

ENCODER_KEYS = ("downsample_layers.", "stages.")
DENSE_KEYS = ENCODER_KEYS + ("norm.", "head.")
LAYOUT = "convnextv2-dense"  # the `layout` metadata of our exports

# Weights.kind -> the words we print.
KINDS = {
    "pretrain-checkpoint": "fcmae pre-training checkpoint",
    "finetune-checkpoint": "fcmae fine-tuning checkpoint",
    "encoder": "fcmae encoder export",
    "classifier": "fcmae classifier export",
    "release-pretrain": "release pre-training checkpoint (MinkowskiEngine layout)",
    "release-finetune": "release dense checkpoint",
    "dense": "dense weights (public or timm layout)",
}


# ----------------------------------------------------------------------------- reading

def load(path, trust=False, mmap=False):
    """The object stored in a .safetensors / .pth / .pt / .ckpt file, without running code from it
    (see the module docstring); trust=True unpickles fully. Returns a dict; anything else is a
    one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SettingError(f"no checkpoint at {path}: the file does not exist; pass a run directory or the path "
                           f"of a .safetensors, .pth or .ckpt file")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        with torch.serialization.safe_globals(SAFE_GLOBALS):  # trust: full unpickling, the list is moot
            obj = torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch names the first global the file would call beyond the allowed ones; any other
        # refusal (an unknown opcode) means the file is not a torch checkpoint at all.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found:
            raise unreadable(path, e) from None
        raise SettingError(f"{path} needs unsafe unpickling to load (it pickles {found[1]}), which can run code "
                           f"from the file: pass `trust_checkpoint` (runs code from the file) only if you trust "
                           f"where it came from, or use a .safetensors file") from None
    except (Exception, SafetensorError) as e:  # torch's and safetensors' errors for files of another format
        raise unreadable(path, e) from None
    if not isinstance(obj, dict):  # torch.save'd something else, e.g. a tensor or a whole model
        raise SettingError(f"{path} holds a {type(obj).__name__}, not a checkpoint (a dict of weights): "
                           f"pass a .safetensors, .pth or .ckpt file of ConvNeXt V2 weights")
    return obj


def unreadable(path, e):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
    first = next((line for line in lines if line.startswith("Unsupported")), lines[0])[:120]  # torch's real reason
    return UserError(f"cannot read {path} as a checkpoint ({type(e).__name__}: {first}): "
                     f"pass a .safetensors, .pth or .ckpt file")


def read_run_checkpoint(path, command, trust=False):
    """A Lightning checkpoint of `fcmae <command>` to resume from, memory-mapped: only what is
    looked at (the hyperparameters) is read here, however large the file."""
    path = Path(path)
    try:
        checkpoint = load(path, trust, mmap=True)
    except UserError as e:
        if "--trust-checkpoint" in str(e):
            raise
        raise SettingError(f"cannot read {path} ({str(e.__cause__ or e).splitlines()[0][:100]}): pass an fcmae "
                           f"{command} checkpoint to `resume`, or `no_resume` to start over") from None
    if "loops" not in checkpoint:
        raise SettingError(f"{path} is not a Lightning checkpoint of `fcmae {command}`: pass one to `resume` "
                           f"(<run>/checkpoints/last.ckpt), or `no_resume`")
    return checkpoint


@dataclass
class Weights:
    """Any weights file we accept, read into one description. `state`: the dense public-layout
    weights (downsample_layers.*, stages.*, and norm.*/head.* when present), the EMA's when read
    with ema=True. `model`: a size name, or {"depths": [...], "dims": [...]}."""
    path: Path
    kind: str
    model: Union[str, dict]
    in_chans: int
    num_classes: int  # 0: no head
    classes: Optional[list]
    state: dict
    meta: dict
    has_ema: bool

    @property
    def encoder(self):
        return {k: v for k, v in self.state.items() if k.startswith(ENCODER_KEYS)}

    def summary(self):
        """One line: kind, size, in_chans, classes, steps."""
        size = self.model if isinstance(self.model, str) else json.dumps(self.model)
        parts = [KINDS[self.kind], size, f"in_chans {self.in_chans}"]
        if self.num_classes:
            names = f" ({', '.join(self.classes[:5])}{', ...' if len(self.classes) > 5 else ''})" if self.classes else ""
            parts.append(f"{self.num_classes} classes{names}")
        else:
            parts.append("no head")
        if self.meta.get("steps") is not None:
            parts.append(f"step {self.meta['steps']}")
        if self.has_ema:
            parts.append("EMA weights inside")
        return f"{self.path}: {', '.join(parts)}"


def read_weights(path_or_run_dir, ema=False, trust=False):
    """Any weights we accept -> Weights: our pre-training and fine-tuning last.ckpt, our exports
    (.safetensors, .pth), the release's MinkowskiEngine-layout pre-training checkpoints and dense
    checkpoints (with or without model_ema), timm-layout dense weights. A run directory means
    its checkpoints/last.ckpt. ema=True takes the EMA weights (fine-tuning and release files)."""
    path = checkpoint_in(path_or_run_dir)
    obj = load(path, trust)
    meta = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    state_dict = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else None
    no_ema = f"`ema`: {path} holds no EMA weights: drop `ema`"
    has_ema, classes = False, None
    if state_dict is not None and any(k.startswith("model.encoder.") for k in state_dict):
        kind, state = "pretrain-checkpoint", to_dense_encoder(state_dict)
        if ema:
            raise SettingError(f"`ema`: {path} is a pre-training checkpoint, which holds no EMA weights: "
                               f"drop `ema`")
    elif state_dict is not None and any(k.startswith(("model.stages.", "model_ema.module.stages.")) for k in state_dict):
        kind = "finetune-checkpoint"
        has_ema = any(k.startswith("model_ema.module.") for k in state_dict)
        if ema and not has_ema:
            raise SettingError(f"`ema`: {path} holds no EMA weights (trained with `no_ema` or `linear_probe`): "
                               f"drop `ema`")
        state = classifier_state_dict(state_dict, ema)
    else:
        if isinstance(obj.get("meta"), dict):  # our .pth export: {"model": weights, "meta": metadata}
            meta = {k: parse_value(v) if isinstance(v, str) else v for k, v in obj["meta"].items()}
        has_ema = isinstance(obj.get("model_ema"), dict)
        if ema and not has_ema:
            raise SettingError(no_ema)
        source = obj["model_ema"] if ema else obj
        state = to_dense_encoder(source)
        if meta.get("layout") == LAYOUT:
            kind = "classifier" if "head.weight" in state else "encoder"
        elif is_minkowski_layout(unwrap(obj)):
            kind = "release-pretrain"
        elif isinstance(obj.get("args"), argparse.Namespace) or (isinstance(obj.get("model"), dict)
                                                                  and "head.weight" in state):
            kind = "release-finetune"
        else:
            kind = "dense"
    state = {k: v for k, v in state.items() if k.startswith(DENSE_KEYS)}
    if "downsample_layers.0.0.weight" not in state or not any(k.startswith("stages.") for k in state):
        raise SettingError(f"no ConvNeXt V2 weights found in {path}: pass an fcmae pre-training or fine-tuning "
                           f"checkpoint, an fcmae export, or a release checkpoint")
    if kind in ("pretrain-checkpoint", "finetune-checkpoint"):
        hparams = dict(obj.get("hyper_parameters") or {})
        config = hparams.get("config") or {k: v for k, v in hparams.items() if k != "config"}
        meta = {**hparams, "input_size": hparams.get("input_size", config.get("input_size")),
                "steps": obj.get("global_step"), "epoch": obj.get("epoch"), "config": config}
    elif isinstance(obj.get("args"), argparse.Namespace):  # the release's training arguments
        args = vars(obj["args"])
        meta = {"input_size": args.get("input_size"), "epoch": obj.get("epoch"), "args": args}
    model, in_chans, num_classes = architecture(state)
    classes = meta.get("classes")
    if classes is not None and len(classes) != num_classes:
        classes = None  # the head was replaced since: the names no longer belong to it
    return Weights(path, kind, model, in_chans, num_classes, list(classes) if classes else None, state, meta, has_ema)


def safetensors_metadata(path):
    """A .safetensors file's metadata, each value JSON-decoded where it is JSON."""
    with safe_open(str(path), "pt") as f:
        return {k: parse_value(v) for k, v in (f.metadata() or {}).items()}


def parse_value(value):
    try:
        return json.loads(value)
    except ValueError:
        return value  # a plain string


def fold_feature_norm(state, prefix="feature_bn."):
    """Fold the linear probe's BatchNorm1d(affine=False) into the head, in place, so the probe
    becomes a plain ConvNeXtV2 classifier: W' = W / sqrt(var + eps), b' = b - W' mean."""
    mean, var = state.pop(prefix + "running_mean"), state.pop(prefix + "running_var")
    state.pop(prefix + "num_batches_tracked", None)
    weight = state["head.weight"] / torch.sqrt(var + 1e-6)  # eps of the probe's BatchNorm1d
    state["head.bias"] = state["head.bias"] - weight @ mean
    state["head.weight"] = weight
    return state


def classifier_state_dict(state_dict, ema=False):
    """A fine-tuning Lightning checkpoint's state_dict (model.*, model_ema.module.*, and for the
    linear probe feature_bn.*) -> the classifier in the public dense layout."""
    prefix = "model_ema.module." if ema else "model."
    if not any(k.startswith(prefix) for k in state_dict):
        raise SettingError("the checkpoint has no EMA weights (trained with `no_ema`): drop `ema`"
                        if ema else "the checkpoint holds no fine-tuned classifier (model.* keys)")
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    bn = {("feature_bn." + k.split("feature_bn.", 1)[1]): v for k, v in state_dict.items() if "feature_bn." in k}
    if bn:
        out = fold_feature_norm({**out, **bn})
    return out


def size_name(depths, dims):
    """The SIZES name of these depths and dims, or None for a custom size."""
    return next((n for n, (d, c) in SIZES.items() if (list(d), list(c)) == (list(depths), list(dims))), None)


def architecture(state):
    """(model, in_chans, num_classes) of dense public-layout weights; `model` is a size name when
    the depths and dims are a known size, else {"depths": ..., "dims": ...}."""
    if "downsample_layers.0.0.weight" not in state:
        raise SettingError("the weights have no stem (downsample_layers.0.0.weight): not ConvNeXt V2 weights")
    dims = [state[f"stages.{i}.0.dwconv.weight"].shape[0] if f"stages.{i}.0.dwconv.weight" in state
            else state[f"downsample_layers.{i}.{0 if i == 0 else 1}.weight"].shape[0] for i in range(4)]
    depths = [1 + max((int(k.split(".")[2]) for k in state if k.startswith(f"stages.{s}.")), default=-1)
              for s in range(4)]
    model = size_name(depths, dims) or {"depths": depths, "dims": dims}
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    return model, state["downsample_layers.0.0.weight"].shape[1], num_classes


def describe(path, trust=False):
    """One line about a weights file: kind, size, in_chans, classes, steps."""
    return read_weights(path, trust=trust).summary()


# ----------------------------------------------------------------------------- writing

def save_torch(obj, path):
    """torch.save, atomically (see atomic_write)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(path, write)


def save_weights(path, state, meta):
    """Dense public-layout weights -> .safetensors (metadata values JSON-encoded strings) or
    .pth/.pt ({"model": state, "meta": metadata}, like the release's files), atomically, mode
    0644. The architecture (layout, model, depths, dims, in_chans, num_classes) is read off
    `state` and recorded beside the caller's `meta`."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise SettingError(f"`output` {path}: unknown format '{path.suffix}': use .safetensors or .pth")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    model, in_chans, num_classes = architecture(state)
    depths, dims = (SIZES[model] if isinstance(model, str) else (model["depths"], model["dims"]))
    meta = {"format": "pt", "layout": LAYOUT, "model": model if isinstance(model, str) else "custom",
            "depths": list(depths), "dims": list(dims), "in_chans": in_chans, "num_classes": num_classes, **meta}
    encoded = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()}
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=encoded), mode=0o644)
    else:
        def write(tmp):
            with open(tmp, "wb") as f:
                torch.save({"model": state, "meta": encoded}, f)  # plain strings: loads weights_only
        atomic_write(path, write, mode=0o644)


def export_weights(source, output=None, ema=False, trust=False):
    """Checkpoint (or run directory) -> dense weights file in the public layout, with metadata
    (kind, input size, crop, steps, epoch, the run's configuration, class names); returns its
    path. Default `output`: <run dir>/encoder.safetensors, or classifier.safetensors for a
    fine-tuning checkpoint."""
    if output is not None and Path(output).suffix not in (".safetensors", ".pth", ".pt"):
        raise SettingError(f"`output` {output}: unknown format '{Path(output).suffix}': use .safetensors or .pth")
    weights = read_weights(source, ema, trust)
    kind = "classifier" if weights.num_classes else "encoder"
    if output is None:
        output = RunDir(run_dir_of(weights.path)).export(kind)
    m = weights.meta
    meta = {"kind": kind, "input_size": m.get("input_size"), "crop_pct": m.get("crop_pct"), "steps": m.get("steps"),
            "epoch": m.get("epoch"), "ema": ema, "config": m.get("config") or {}}
    if weights.classes:
        meta["classes"] = weights.classes
    save_weights(output, weights.state, meta)
    return Path(output)
