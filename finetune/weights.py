"""Weights in and out of fine-tuning.

In: `--pretrained` takes any of four files (our exported encoder .safetensors, our pre-training
Lightning checkpoint, the release's MinkowskiEngine-layout pre-training checkpoint, a dense
checkpoint in the public layout); `fcmae.encoders.convert.to_dense_encoder` turns each into our
dense keys, and `load_pretrained` refuses anything that does not fit the model tensor for tensor.

Out: the classifier in the public dense layout (`downsample_layers.*`, `stages.*`, `norm.*`,
`head.*`), which the release's code and timm's `convnextv2_*` (through its checkpoint filter) load.
"""
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from timm.layers import trunc_normal_

from fcmae.encoders import SIZES
from fcmae.encoders.convnextv2 import size_config
from fcmae.encoders.convert import to_dense_encoder, unwrap
from fcmae.errors import UserError

HEAD = ("head.weight", "head.bias")


def read_file(path):
    """The object stored in a .safetensors / .pth / .ckpt file (tensors only where possible)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file {path} does not exist: pass the path of a .safetensors, .pth or .ckpt file")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise _unreadable(path, e) from None
        # The release's checkpoints also pickle their argparse Namespace: that needs full unpickling.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise _unreadable(path, e2) from None
        print(f"note: {path} holds Python objects besides tensors; loaded it fully (use only files you trust)")
    except Exception as e:  # safetensors' and torch's errors for files of another format
        raise _unreadable(path, e) from None
    if not isinstance(obj, dict):  # torch.save'd something else, e.g. a tensor or a whole model
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint (a dict of weights): "
                        f"pass a .safetensors, .pth or .ckpt file of ConvNeXt V2 weights")
    return obj


def _unreadable(path, e):
    return UserError(f"cannot read {path} as a checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}): "
                     f"pass a .safetensors, .pth or .ckpt file")


def describe(obj):
    """Which of the supported kinds a loaded file is, for the report."""
    sd = unwrap(obj)
    keys = list(sd) if isinstance(sd, dict) else []
    if any(k.endswith("dwconv.kernel") for k in keys):
        return "release pre-training checkpoint (MinkowskiEngine layout)"
    if any(k.startswith("model.encoder.") for k in keys):
        return "fcmae pre-training checkpoint"
    if any(k.startswith("encoder.") for k in keys):
        return "FCMAE model state dict"
    if any(k.startswith("model.stages.") for k in keys):
        return "fcmae fine-tuning checkpoint (raw weights)"
    if "head.weight" in keys:
        return "dense classifier (public layout)"
    return "dense encoder (public layout)"


def _shape(t):
    return "(" + ", ".join(map(str, t.shape)) + ")"


def load_pretrained(model, path):
    """Load `path` into the dense ConvNeXtV2 `model`; print what was loaded, missing, unexpected.

    The trunk must match exactly: a tensor of another shape, or a block one side lacks, means
    another size or in_chans and is refused with the tensor named. The final norm and the head
    may be absent (pre-training checkpoints have neither); a head with another class count is
    dropped. A head that was not loaded is re-initialized as the release does (std 2e-5).
    """
    obj = read_file(path)
    state = to_dense_encoder(obj)
    if not state:
        raise UserError(f"--pretrained {path}: no ConvNeXt V2 weights found (expected keys like stages.0.0.dwconv.weight, "
                        f"encoder.*, model.encoder.*): pass an fcmae export, checkpoint or a release checkpoint")
    own = model.state_dict()
    name = next((n for n, (d, c) in SIZES.items() if (tuple(d), tuple(c)) == (model.depths, model.dims)),
                f"{{depths: {list(model.depths)}, dims: {list(model.dims)}}}")
    size = f"--model {name} --in-chans {model.in_chans}"
    dropped = []
    for k in HEAD:
        if k in state and k in own and state[k].shape != own[k].shape:
            dropped.append(f"{k} {_shape(state.pop(k))}")
    for k in own:  # in the model's order: the stem's weight first
        if k in state and state[k].shape != own[k].shape:
            raise UserError(f"--pretrained {path} does not fit {size}: {k} is {_shape(state[k])} in the file but "
                            f"{_shape(own[k])} in the model: pass the --model and --in-chans it was trained with")
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    trunk_missing = [k for k in missing if not k.startswith(("norm.", "head."))]
    if unexpected or trunk_missing:
        k = (unexpected or trunk_missing)[0]
        where = "in the file but not in the model" if unexpected else "in the model but not in the file"
        raise UserError(f"--pretrained {path} does not fit {size}: {k} is {where} "
                        f"({len(unexpected)} unexpected, {len(trunk_missing)} missing trunk tensors): "
                        f"pass the --model it was trained with")
    model.load_state_dict(state, strict=False)
    if "head.weight" not in state:
        trunc_normal_(model.head.weight, std=2e-5)
        torch.nn.init.zeros_(model.head.bias)
    print(f"loaded {len(state)} tensors from {path} ({describe(obj)})")
    print(f"  missing (left at init): {', '.join(missing) or 'none'}")
    print(f"  unexpected: none; dropped (other class count): {', '.join(dropped) or 'none'}")
    return {"loaded": sorted(state), "missing": missing, "dropped": dropped, "kind": describe(obj)}


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
        raise UserError("the checkpoint has no EMA weights (trained with --no-ema): drop --ema"
                        if ema else "the checkpoint holds no fine-tuned classifier (model.* keys)")
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    bn = {("feature_bn." + k.split("feature_bn.", 1)[1]): v for k, v in state_dict.items() if "feature_bn." in k}
    if bn:
        out = fold_feature_norm({**out, **bn})
    return out


def architecture(state):
    """(model, in_chans, num_classes) of a dense classifier state dict; `model` is a size name
    when the depths and dims are a known size, else {"depths": ..., "dims": ...}."""
    if "downsample_layers.0.0.weight" not in state:
        raise UserError("the weights have no stem (downsample_layers.0.0.weight): not a ConvNeXt V2 classifier")
    dims = [state[f"downsample_layers.{i}.{0 if i == 0 else 1}.weight"].shape[0] for i in range(4)]
    depths = [1 + max(int(k.split(".")[2]) for k in state if k.startswith(f"stages.{s}.")) for s in range(4)]
    named = [n for n, (d, c) in SIZES.items() if list(d) == depths and list(c) == dims]
    model = named[0] if named else {"depths": depths, "dims": dims}
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    return model, state["downsample_layers.0.0.weight"].shape[1], num_classes


def save_classifier(path, state, **metadata):
    """Write a dense classifier as .safetensors, through a temporary file so an interrupted
    write never leaves a half file. Metadata (as `fcmae export` writes it, values JSON-encoded):
    layout, model size, depths, dims, in_chans, num_classes, plus what the caller adds."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    model, in_chans, num_classes = architecture(state)
    depths, dims = size_config(model)
    meta = {"format": "pt", "layout": "convnextv2-dense", "model": model if isinstance(model, str) else "custom",
            "depths": list(depths), "dims": list(dims), "in_chans": in_chans, "num_classes": num_classes, **metadata}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def _parse(value):
    try:
        return json.loads(value)
    except ValueError:
        return value  # a plain string


def load_classifier(path, ema=False):
    """Any classifier file -> (dense state dict, metadata dict). Accepts our classifier
    .safetensors, our fine-tuning last.ckpt, and the release's dense fine-tuned checkpoints."""
    obj = read_file(path)
    meta = {}
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = {k: _parse(v) for k, v in (f.metadata() or {}).items()}
        state = obj
    elif isinstance(obj, dict) and "state_dict" in obj and any(k.startswith("model.") for k in obj["state_dict"]):
        state = classifier_state_dict(obj["state_dict"], ema)
        meta = dict(obj.get("hyper_parameters", {}))
    else:
        if ema and not isinstance(obj.get("model_ema"), dict):
            raise UserError(f"{path} has no model_ema weights: drop --ema")
        state = to_dense_encoder(obj["model_ema"] if ema else obj)
    if not any(k.startswith("stages.") for k in state):
        raise UserError(f"no ConvNeXt V2 weights found in {path}: pass a fine-tuning last.ckpt, classifier.safetensors "
                        f"or a release fine-tuned checkpoint")
    if "head.weight" not in state:
        raise UserError(f"{path} has no classifier head (a pre-trained encoder?): fine-tune it first "
                        f"with `fcmae finetune --pretrained {path}`")
    return state, meta
