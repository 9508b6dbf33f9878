"""TEMPORARY shim: only `read_weights` / `Weights`, on top of finetune/weights.py and
encoders/convert.py, until the real fcmae/checkpoints.py lands (it replaces this file)."""
import json
from dataclasses import dataclass, field
from pathlib import Path

from fcmae.encoders.convert import to_dense_encoder
from fcmae.errors import UserError
from fcmae.finetune.weights import architecture, classifier_state_dict, read_file


@dataclass
class Weights:
    path: Path
    kind: str
    model: object
    in_chans: int
    num_classes: int
    classes: list = None
    state: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    has_ema: bool = False

    @property
    def encoder(self):
        return {k: v for k, v in self.state.items() if k.startswith(("downsample_layers.", "stages."))}


def _parse(value):
    try:
        return json.loads(value)
    except ValueError:
        return value


def read_weights(path_or_run_dir, ema=False, trust=False):
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    obj = read_file(path)
    meta, kind = {}, "dense"
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = {k: _parse(v) for k, v in (f.metadata() or {}).items()}
        state, kind = obj, meta.get("kind", "dense")
    elif "state_dict" in obj and any(k.startswith("model.stages.") for k in obj["state_dict"]):
        state, kind = classifier_state_dict(obj["state_dict"], ema), "finetune-checkpoint"
        meta = dict(obj.get("hyper_parameters", {}))
    elif "state_dict" in obj:
        state, kind = to_dense_encoder(obj["state_dict"]), "pretrain-checkpoint"
        meta = dict(obj.get("hyper_parameters", {}))
        meta["steps"] = obj.get("global_step")
    else:
        state = to_dense_encoder(obj["model_ema"] if ema else obj)
        kind = "release-pretrain" if any("kernel" in k for k in obj.get("model", {})) else "dense"
    if not any(k.startswith("stages.") for k in state):
        raise UserError(f"no ConvNeXt V2 weights found in {path}: pass an fcmae checkpoint, export or release checkpoint")
    if isinstance(meta.get("config"), dict):
        meta.setdefault("input_size", meta["config"].get("input_size"))
    model, in_chans, num_classes = architecture(state)
    return Weights(path, kind, model, in_chans, num_classes, None, state, meta, isinstance(obj.get("model_ema"), dict))
