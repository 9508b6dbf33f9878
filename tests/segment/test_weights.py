"""Every weights source fine-tuning takes goes into the segmenter's encoder through read_weights,
exactly; weights of another size or in_chans are refused in one line naming the tensor."""
import argparse

import pytest
import timm
import torch
from helpers import TINY, randomize_
from safetensors.torch import save_file

from fcmae import FCMAE
from fcmae.checkpoints import export_weights, read_weights, save_weights, segmenter_meta, write_segmenter
from fcmae.encoders import ConvNeXtV2
from fcmae.encoders.convert import fcmae_to_release
from fcmae.decoders.upernet import UperNetSegmenter
from fcmae.segment.weights import load_encoder


def segmenter(model=TINY, in_chans=3):
    return UperNetSegmenter(model, 4, in_chans, channels=16, aux_channels=8)


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    return randomize_(FCMAE(model=TINY, img_size=64, decoder_dim=16))


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(1)
    return randomize_(ConvNeXtV2(TINY, num_classes=5), seed=1)


def trunk(state):
    return {k: v for k, v in state.items() if k.startswith(("downsample_layers.", "stages."))}


def pretrain_ckpt(model, path):
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": "custom", "in_chans": 3, "input_size": 64}, "global_step": 3}, path)
    return path


def write_kind(kind, tmp_path, pretrained, classifier):
    """A file of `kind` as its maker writes it, and the encoder it holds."""
    if kind == "encoder export":
        return export_weights(pretrain_ckpt(pretrained, tmp_path / "last.ckpt"), tmp_path / "encoder.safetensors"), \
            pretrained.encoder.state_dict()
    if kind == "pre-training last.ckpt":
        return pretrain_ckpt(pretrained, tmp_path / "last.ckpt"), pretrained.encoder.state_dict()
    if kind == "classifier export":
        path = tmp_path / "classifier.safetensors"
        save_weights(path, classifier.state_dict(), {"kind": "classifier", "classes": list("abcde"), "input_size": 64})
        return path, classifier.state_dict()
    if kind == "fine-tuning last.ckpt":
        ema = randomize_(ConvNeXtV2(TINY, num_classes=5), seed=2)
        state = {**{"model." + k: v for k, v in classifier.state_dict().items()},
                 **{"model_ema.module." + k: v for k, v in ema.state_dict().items()}}
        path = tmp_path / "ft.ckpt"
        torch.save({"state_dict": state, "hyper_parameters": {"classes": list("abcde")}, "global_step": 2}, path)
        return path, classifier.state_dict()
    if kind == "release pre-training":
        path = tmp_path / "convnextv2_fcmae.pt"
        torch.save({"model": fcmae_to_release(pretrained.state_dict()), "args": argparse.Namespace(input_size=224),
                    "epoch": 1599}, path)
        return path, pretrained.encoder.state_dict()
    if kind == "release fine-tuned":
        path = tmp_path / "convnextv2_1k.pth"
        torch.save({"model": classifier.state_dict(), "model_ema": classifier.state_dict(),
                    "args": argparse.Namespace(input_size=224)}, path)
        return path, classifier.state_dict()
    if kind == "segmentation export":
        source = randomize_(segmenter(), seed=3)
        path = tmp_path / "segmenter.safetensors"
        write_segmenter(path, source.state_dict(), segmenter_meta(source, list("abcd"), [[0, 0, 0]] * 4, 64, (256, 64), None))
        return path, {k[len("encoder."):]: v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    raise AssertionError(kind)


KINDS = ["encoder export", "pre-training last.ckpt", "classifier export", "fine-tuning last.ckpt",
         "release pre-training", "release fine-tuned", "segmentation export"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_loads_into_the_encoder_exactly(kind, tmp_path, pretrained, classifier):
    path, expected = write_kind(kind, tmp_path, pretrained, classifier)
    seg = segmenter()
    head_before = {k: v.clone() for k, v in seg.state_dict().items() if not k.startswith("encoder.")}
    report = load_encoder(seg, read_weights(path))
    own = seg.encoder.state_dict()
    assert set(own) == set(trunk(expected)) and report["loaded"] == len(own)
    for k, v in trunk(expected).items():
        assert torch.equal(own[k], v), k  # the release's Minkowski kernels reshaped back exactly too
    assert all(torch.equal(seg.state_dict()[k], v) for k, v in head_before.items())  # the head untouched
    has_head = kind in ("classifier export", "fine-tuning last.ckpt", "release fine-tuned")
    assert report["left_out"] == (["head.bias", "head.weight", "norm.bias", "norm.weight"] if has_head else [])


def test_timm_layout_weights_load_and_compute_the_same_stages(tmp_path):
    theirs = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0).eval()
    with torch.no_grad():  # GRN starts at zero in timm: give every tensor a value to carry
        for name, p in theirs.named_parameters():
            if "grn" in name or name.endswith(".bias"):
                p.normal_(0, 0.3)
    path = tmp_path / "timm.pth"
    torch.save(theirs.state_dict(), path)
    seg = UperNetSegmenter("atto", 3, channels=16, aux_channels=8).eval()
    assert load_encoder(seg, read_weights(path))["kind"] == "dense weights (public or timm layout)"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = seg.encoder.forward_stages(x)
        reference = theirs.forward_intermediates(x, intermediates_only=True)  # timm's own stage outputs
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("file_model, file_chans, message", [
    (TINY, 1, r"^\S+ does not fit ConvNeXt V2 \{\"depths\": \[2, 2, 3, 2\], \"dims\": \[8, 16, 24, 32\]\} with "
              r"in_chans 3: downsample_layers\.0\.0\.weight is \(8, 1, 4, 4\) in the file but \(8, 3, 4, 4\) in the "
              r"model$"),
    ({"depths": [2, 2, 3, 2], "dims": [8, 16, 24, 48]}, 3, r"is \(48[,)].* in the file but \(32[,)].* in the model$"),
    ({"depths": [2, 2, 4, 2], "dims": [8, 16, 24, 32]}, 3, r"stages\.2\.3\..* is in the file but not in the model"),
    ({"depths": [2, 2, 2, 2], "dims": [8, 16, 24, 32]}, 3, r"stages\.2\.2\..* is in the model but not in the file"),
])
def test_weights_of_another_size_or_in_chans_are_refused(tmp_path, file_model, file_chans, message):
    path = tmp_path / "other.safetensors"
    save_file(ConvNeXtV2(file_model, in_chans=file_chans, num_classes=0).state_dict(), path)
    seg = segmenter()
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    with pytest.raises(ValueError, match=message) as e:
        load_encoder(seg, read_weights(path))
    assert "\n" not in str(e.value)
    assert all(torch.equal(seg.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded
