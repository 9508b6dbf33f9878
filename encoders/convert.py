"""Checkpoint key filters: foreign and pre-training layouts -> our models.

Our sparse encoder, our dense ConvNeXtV2 and the public release's dense checkpoints share one
layout, so most conversions are key filters. The release's pre-training checkpoints hold the
encoder as MinkowskiEngine modules: their kernels are reshaped here (orderings measured against
MinkowskiEngine, see `tests/test_minkowski.py`).
"""
import re


_DWCONV = re.compile(r"stages\.\d+\.\d+\.dwconv\.")
_DOWNSAMPLE_CONV = re.compile(r"downsample_layers\.[123]\.1\.")


def dwconv_to_minkowski(w):
    """Dense depthwise weight (C, 1, 7, 7) -> MinkowskiEngine channelwise kernel (49, C)."""
    return w[:, 0].transpose(1, 2).reshape(w.shape[0], -1).t()


def dwconv_from_minkowski(k):
    """MinkowskiEngine channelwise kernel (K*K, C) -> dense depthwise weight (C, 1, K, K)."""
    c, size = k.shape[1], round(k.shape[0] ** 0.5)
    return k.t().reshape(c, size, size).transpose(1, 2).unsqueeze(1)


def downsample_to_minkowski(w):
    """Dense stride-2 weight (C_out, C_in, 2, 2) -> MinkowskiEngine kernel (4, C_in, C_out)."""
    c_out, c_in = w.shape[:2]
    return w.transpose(2, 3).reshape(c_out, c_in, 4).permute(2, 1, 0)


def downsample_from_minkowski(k):
    """MinkowskiEngine kernel (4, C_in, C_out) -> dense stride-2 weight (C_out, C_in, 2, 2)."""
    _, c_in, c_out = k.shape
    return k.permute(2, 1, 0).reshape(c_out, c_in, 2, 2).transpose(2, 3)


def unwrap(checkpoint):
    """The state dict inside a checkpoint file's object (`model`, `state_dict`, or itself)."""
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def is_minkowski_layout(state_dict):
    return any(k.endswith("dwconv.kernel") for k in state_dict)


def encoder_from_minkowski(state_dict):
    """Release pre-training encoder keys (prefix `encoder.` removed) -> our encoder keys."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace(".ln.", ".").replace(".linear.", ".")
        if _DWCONV.match(k) and k.endswith(".kernel"):
            k, v = k[: -len("kernel")] + "weight", dwconv_from_minkowski(v)
        elif _DOWNSAMPLE_CONV.match(k) and k.endswith(".kernel"):
            k, v = k[: -len("kernel")] + "weight", downsample_from_minkowski(v)
        elif (_DWCONV.match(k) or _DOWNSAMPLE_CONV.match(k)) and k.endswith(".bias"):
            v = v.reshape(-1)
        elif k.endswith(("grn.gamma", "grn.beta")):
            v = v.reshape(1, 1, 1, -1)
        out[k] = v
    return out


def encoder_to_minkowski(state_dict):
    """Our encoder keys -> the release's MinkowskiEngine layout (the inverse of the above)."""
    out = {}
    for k, v in state_dict.items():
        if _DWCONV.match(k) or _DOWNSAMPLE_CONV.match(k):
            to_kernel = dwconv_to_minkowski if _DWCONV.match(k) else downsample_to_minkowski
            if k.endswith(".weight"):
                k, v = k[: -len("weight")] + "kernel", to_kernel(v)
            else:
                v = v.reshape(1, -1)
        elif k.endswith(("grn.gamma", "grn.beta")):
            v = v.reshape(1, -1)
        elif re.match(r"stages\.\d+\.\d+\.norm\.|downsample_layers\.[123]\.0\.", k):
            k = k.replace(".norm.", ".norm.ln.") if ".norm." in k else k.replace(".0.", ".0.ln.", 1)
        elif re.match(r"stages\.\d+\.\d+\.pwconv\d\.", k):
            k = re.sub(r"(pwconv\d)\.", r"\1.linear.", k)
        out[k] = v
    return out


_DECODER_FROM_RELEASE = (("proj.", "decoder.proj."), ("decoder.", "decoder.blocks."),
                         ("pred.", "decoder.pred."), ("mask_token", "decoder.mask_token"))


def fcmae_from_release(state_dict):
    """A release pre-training checkpoint's `model` (ME encoder + dense decoder) -> our FCMAE keys."""
    state_dict = unwrap(state_dict)
    encoder = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    out = {"encoder." + k: v for k, v in encoder_from_minkowski(encoder).items()}
    for k, v in state_dict.items():
        for old, new in _DECODER_FROM_RELEASE:
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
    return out


def fcmae_to_release(state_dict):
    """Our FCMAE keys -> the release's pre-training layout (for round trips and sharing)."""
    encoder = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    out = {"encoder." + k: v for k, v in encoder_to_minkowski(encoder).items()}
    for k, v in state_dict.items():
        for old, new in _DECODER_FROM_RELEASE:
            if k.startswith(new):
                out[old + k[len(new):]] = v
                break
    return out


_FROM_TIMM = ((r"^stem\.", "downsample_layers.0."), (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
              (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."), (r"\.conv_dw\.", ".dwconv."),
              (r"\.mlp\.fc(\d)\.", r".pwconv\1."), (r"\.mlp\.grn\.weight$", ".grn.gamma"),
              (r"\.mlp\.grn\.bias$", ".grn.beta"), (r"^head\.norm\.", "norm."), (r"^head\.fc\.", "head."))


def from_timm(state_dict):
    """timm's own `convnextv2_*` keys (stem.*, stages.S.blocks.B.conv_dw / mlp.fc1 / mlp.grn, head.fc)
    -> the public dense layout; other state dicts pass through unchanged."""
    if "stem.0.weight" not in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _FROM_TIMM:
            k = re.sub(pattern, repl, k)
        if re.search(r"\.pwconv\d\.weight$", k) and v.ndim == 4:
            v = v.flatten(1)  # timm's 1x1 convolutions (C_out, C_in, 1, 1) -> Linear (C_out, C_in)
        elif k.endswith(("grn.gamma", "grn.beta")):
            v = v.reshape(1, 1, 1, -1)
        out[k] = v
    return out


def to_dense_encoder(state_dict):
    """Any supported pre-training or dense checkpoint -> keys of our dense `ConvNeXtV2`.

    Accepts: our FCMAE model or Lightning checkpoint (`encoder.*`, `model.encoder.*`), the
    release's MinkowskiEngine-layout pre-training checkpoints, dense checkpoints in the public
    layout (with `norm.*`/`head.*`), timm's own layout. Decoder keys are dropped.
    """
    state_dict = from_timm(unwrap(state_dict))
    state_dict = {k.removeprefix("module.").removeprefix("model."): v for k, v in state_dict.items()}
    if any(k.startswith("encoder.") for k in state_dict):
        state_dict = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if is_minkowski_layout(state_dict):
        state_dict = encoder_from_minkowski(state_dict)
    keep = ("downsample_layers.", "stages.", "norm.", "head.")
    return {k: v for k, v in state_dict.items() if k.startswith(keep)}
