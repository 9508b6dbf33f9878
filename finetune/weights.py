"""Pre-trained weights into a fine-tuning model: the fit check and the head's init.

`--pretrained` takes any weights `fcmae.checkpoints.read_weights` reads (our exported encoder,
our pre-training last.ckpt, the release's MinkowskiEngine-layout pre-training checkpoints, dense
public-layout or timm-layout checkpoints); `load_pretrained` refuses anything that does not fit the
model tensor for tensor. Reading and writing files is fcmae.checkpoints' job.
"""
import torch
from timm.layers import trunc_normal_

from fcmae.checkpoints import KINDS, read_weights, size_name
from fcmae.errors import SettingError

__all__ = ["load_pretrained"]

HEAD = ("head.weight", "head.bias")


def _shape(t):
    return "(" + ", ".join(map(str, t.shape)) + ")"


def load_pretrained(model, path, trust=False):
    """Load `path` into the dense ConvNeXtV2 `model`; print what was loaded, missing, unexpected.

    The trunk must match exactly: a tensor of another shape, or a block one side lacks, means
    another size or in_chans and is refused with the tensor named. The final norm and the head
    may be absent (pre-training checkpoints have neither); a head with another class count is
    dropped. A head that was not loaded is re-initialized as the release does (std 2e-5).
    """
    weights = read_weights(path, trust=trust)
    state = dict(weights.state)
    own = model.state_dict()
    name = size_name(model.depths, model.dims) or f"{{depths: {list(model.depths)}, dims: {list(model.dims)}}}"
    size = f"`model` {name} `in_chans` {model.in_chans}"
    dropped = []
    for k in HEAD:
        if k in state and k in own and state[k].shape != own[k].shape:
            dropped.append(f"{k} {_shape(state.pop(k))}")
    for k in own:  # in the model's order: the stem's weight first
        if k in state and state[k].shape != own[k].shape:
            raise SettingError(f"`pretrained` {path} does not fit {size}: {k} is {_shape(state[k])} in the file but "
                               f"{_shape(own[k])} in the model: pass the `model` and `in_chans` it was trained with")
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    trunk_missing = [k for k in missing if not k.startswith(("norm.", "head."))]
    if unexpected or trunk_missing:
        k = (unexpected or trunk_missing)[0]
        where = "in the file but not in the model" if unexpected else "in the model but not in the file"
        raise SettingError(f"`pretrained` {path} does not fit {size}: {k} is {where} "
                           f"({len(unexpected)} unexpected, {len(trunk_missing)} missing trunk tensors): "
                           f"pass the `model` it was trained with")
    model.load_state_dict(state, strict=False)
    if "head.weight" not in state:
        trunc_normal_(model.head.weight, std=2e-5)
        torch.nn.init.zeros_(model.head.bias)
    kind = KINDS[weights.kind]
    print(f"loaded {len(state)} tensors from {path} ({kind})")
    print(f"  missing (left at init): {', '.join(missing) or 'none'}")
    print(f"  unexpected: none; dropped (other class count): {', '.join(dropped) or 'none'}")
    return {"loaded": sorted(state), "missing": missing, "dropped": dropped, "kind": kind}
