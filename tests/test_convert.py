"""Conversions between our layout, the public release's pre-training layout (MinkowskiEngine
modules) and the dense classifier are exact."""
import re

import torch

from fcmae import FCMAE
from fcmae.encoders import ConvNeXtV2
from fcmae.encoders.convert import fcmae_from_release, fcmae_to_release, to_dense_encoder
from helpers import TINY, randomize_


def release_checkpoint(ours):
    """Our FCMAE state dict written the way the public release stores it (docs/checkpoints.md), spelled out
    key by key here, independently of the library's converter."""
    out = {}
    for k, v in ours.items():
        if k.startswith("decoder."):
            k = k.replace("decoder.blocks.", "decoder.", 1) if ".blocks." in k else k[len("decoder."):]
            out[k] = v
            continue
        m = re.match(r"encoder\.stages\.(\d+)\.(\d+)\.(\w+)\.(\w+)$", k)
        if m:
            layer, param = m.group(3), m.group(4)
            if layer == "dwconv" and param == "weight":
                out[k.replace("weight", "kernel")] = v[:, 0].transpose(1, 2).reshape(v.shape[0], 49).t()
            elif layer == "dwconv":
                out[k] = v.reshape(1, -1)
            elif layer == "norm":
                out[k.replace("norm.", "norm.ln.")] = v
            elif layer in ("pwconv1", "pwconv2"):
                out[k.replace(f"{layer}.", f"{layer}.linear.")] = v
            elif layer == "grn":
                out[k] = v.reshape(1, -1)
            continue
        m = re.match(r"encoder\.downsample_layers\.([123])\.(\d)\.(\w+)$", k)
        if m and m.group(2) == "0":
            out[k.replace(".0.", ".0.ln.")] = v
        elif m and m.group(3) == "weight":
            c_out, c_in = v.shape[:2]
            out[k.replace("weight", "kernel")] = v.transpose(2, 3).reshape(c_out, c_in, 4).permute(2, 1, 0)
        elif m:
            out[k] = v.reshape(1, -1)
        else:
            out[k] = v  # the dense stem
    return {"model": out, "epoch": 1599}


def our_state():
    torch.manual_seed(0)
    return randomize_(FCMAE(TINY, img_size=64, decoder_dim=16)).state_dict()


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_release_layout_loads_exactly():
    ours = our_state()
    release = release_checkpoint(ours)
    assert "encoder.stages.0.0.dwconv.kernel" in release["model"]
    assert release["model"]["encoder.stages.0.0.dwconv.kernel"].shape == (49, 8)
    assert release["model"]["encoder.downsample_layers.1.1.kernel"].shape == (4, 8, 16)
    assert release["model"]["encoder.stages.1.0.grn.gamma"].shape == (1, 64)
    assert_same(fcmae_from_release(release), ours)
    model = FCMAE(TINY, img_size=64, decoder_dim=16)
    model.load_state_dict(fcmae_from_release(release))  # strict


def test_round_trip_through_release_layout():
    ours = our_state()
    assert_same(fcmae_to_release(ours), release_checkpoint(ours)["model"])
    assert_same(fcmae_from_release(fcmae_to_release(ours)), ours)


def test_sparse_encoder_to_dense_classifier():
    ours = our_state()
    expected = {k[len("encoder."):]: v for k, v in ours.items() if k.startswith("encoder.")}
    for checkpoint in (ours, {"state_dict": {"model." + k: v for k, v in ours.items()}},
                       release_checkpoint(ours)):
        dense_keys = to_dense_encoder(checkpoint)
        assert_same(dense_keys, expected)
    classifier = ConvNeXtV2(TINY, num_classes=10)
    missing, unexpected = classifier.load_state_dict(to_dense_encoder(ours), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"] and not unexpected
