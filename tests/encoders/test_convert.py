"""Conversions between our layout, the public release's pre-training layout (MinkowskiEngine
modules) and the dense classifier are exact."""
import torch
from helpers import TINY, randomize_, release_checkpoint

from fcmae import FCMAE
from fcmae.encoders import ConvNeXtV2
from fcmae.encoders.convert import fcmae_from_release, fcmae_to_release, to_dense_encoder


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
