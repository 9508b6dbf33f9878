"""fcmae/segmenter.py and the segmentation files of fcmae.checkpoints: inference at an image's own
size (whole image padded to the encoder's stride, sliding windows on mmsegmentation's grid,
multi-scale + flip averaging probabilities); the segmentation export (one weights writer,
metadata); fcmae.Segmenter: label maps at each input's own size from paths, PIL images, arrays and
tensors; overlays, palette PNGs, fractions."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TINY, randomize_
from PIL import Image
from safetensors import safe_open

from fcmae import Segmenter
from fcmae.checkpoints import read_segmenter, read_weights, segmenter_meta, write_segmenter
from fcmae.data.transforms import normalization
from fcmae.decoders.upernet import UperNetSegmenter
from fcmae.labelmaps import default_palette
from fcmae.segmenter import TTA_RATIOS, build_segmenter, infer, slide, whole

CLASSES = ["background", "disc", "square"]


# ----------------------------------------------------------------------------- inference

class Pointwise(nn.Module):
    """A 1x1 conv as a 'segmenter': each pixel's logits depend on that pixel only, so windows,
    padding and flips change nothing. Records the input sizes it is given."""

    def __init__(self, in_chans=3, num_classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.num_classes, self.sizes = nn.Conv2d(in_chans, num_classes, 1), num_classes, []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.conv(x)


def test_whole_pads_to_multiples_of_32_and_crops_back():
    model = Pointwise()
    x = torch.randn(1, 3, 50, 70)
    out = whole(model, x)
    assert model.sizes == [(64, 96)] and out.shape == (1, 4, 50, 70)
    torch.testing.assert_close(out, model.conv(x))


def test_sliding_windows_cover_the_image_on_mmsegmentations_grid():
    model = Pointwise()
    x = torch.randn(1, 3, 100, 200)
    out = slide(model, x, crop=64, stride=43)
    rows, cols = (100 - 64 + 42) // 43 + 1, (200 - 64 + 42) // 43 + 1  # 2 and 5 windows
    assert len(model.sizes) == rows * cols and set(model.sizes) == {(64, 64)}
    torch.testing.assert_close(out, model.conv(x), atol=1e-6, rtol=1e-5)  # overlaps averaged: the same values
    model.sizes = []
    small = slide(model, torch.randn(1, 3, 40, 50), crop=64, stride=43)  # smaller than one window
    assert model.sizes == [(64, 64)] and small.shape == (1, 4, 40, 50)


def test_a_real_segmenter_whole_equals_its_forward_when_no_padding_is_needed():
    model = UperNetSegmenter(TINY, 3, channels=16, aux_channels=8).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(whole(model, x), model(x), rtol=0, atol=0)
        probs = infer(model, x, scale=(96, 64))  # already at the scale: no resize
        torch.testing.assert_close(probs, model(x).softmax(1))
        windows = infer(model, x, scale=(96, 64), window=(64, 32))
        assert windows.shape == (1, 3, 64, 96) and torch.allclose(windows.sum(1), torch.ones(1, 64, 96))


def test_probabilities_come_back_at_the_image_size_after_rescaling():
    model = Pointwise()
    x = torch.randn(1, 3, 30, 45)
    probs = infer(model, x, scale=(256, 64))  # short side 30 -> 64
    assert model.sizes == [(64, 96)] and probs.shape == (1, 4, 30, 45)
    assert torch.allclose(probs.sum(1), torch.ones(1, 30, 45))
    assert infer(model, x, size=(60, 90), scale=(256, 64)).shape == (1, 4, 60, 90)  # the label's size


def test_multi_scale_and_flip_average_every_pass():
    model = Pointwise()
    x = torch.randn(1, 3, 64, 64)
    ratios = (0.5, 1.0, 1.5)
    probs = infer(model, x, scale=(256, 64), ratios=ratios, flip=True)
    assert sorted(model.sizes) == sorted([(32, 32)] * 2 + [(64, 64)] * 2 + [(96, 96)] * 2)
    expected = sum(F.interpolate(model.conv(F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
                                            if s != 64 else x), size=(64, 64), mode="bilinear",
                                 align_corners=False).softmax(1) for s in (32, 64, 96)) / 3
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)  # a pointwise model is flip-equivariant


def test_flip_is_undone_before_averaging():
    class LeftBiased(Pointwise):
        def forward(self, x):  # favours class 0 on the left half of whatever it sees
            logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
            logits[:, 0, :, : x.shape[-1] // 2] = 5.0
            return logits
    model = LeftBiased(num_classes=2)
    model.num_classes = 2
    probs = infer(model, torch.zeros(1, 3, 32, 64), scale=(64, 32), flip=True)
    # the mirrored pass favours the right half; undone and averaged: both halves alike
    torch.testing.assert_close(probs[0, 0, :, :32], probs[0, 0, :, 32:].flip(-1))
    assert probs[0, 0, 0, 0] == pytest.approx((torch.tensor([5.0, 0.0]).softmax(0)[0] + 0.5) / 2)


# ----------------------------------------------------------------------------- files and the API


def trained_stand_in(in_chans=3):
    torch.manual_seed(0)
    model = randomize_(UperNetSegmenter(TINY, 3, in_chans, channels=16, aux_channels=8)).eval()
    with torch.no_grad():  # BatchNorm running statistics away from their init, so they must travel too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def export(tmp_path, in_chans=3, suffix=".safetensors"):
    model = trained_stand_in(in_chans)
    norm = normalization(in_chans, in_chans != 3)
    meta = segmenter_meta(model, CLASSES, default_palette(3), 64, (256, 64), norm)
    return write_segmenter(tmp_path / f"segmenter{suffix}", model.state_dict(), meta, steps=7, mIoU=12.5), model


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_the_export_round_trips_and_reads_as_an_encoder_anywhere(tmp_path, suffix):
    path, model = export(tmp_path, suffix=suffix)
    state, meta = read_segmenter(path)
    assert meta["task"] == "segmentation" and meta["kind"] == "segmenter" and meta["classes"] == CLASSES
    assert (meta["num_classes"], meta["input_size"], meta["scale"], meta["in_chans"]) == (3, 64, [256, 64], 3)
    assert meta["palette"] == default_palette(3)
    assert meta["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["head"] == {"name": "upernet", "channels": 16, "aux_channels": 8} and meta["steps"] == 7
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    rebuilt = build_segmenter(state, meta)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    weights = read_weights(path)  # the encoder in the public dense layout: pre-trained weights for anything
    assert weights.kind == "segmenter" and weights.segmentation and weights.model == TINY and weights.num_classes == 0
    if suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            assert f.metadata()["layout"] == "convnextv2-dense" and json.loads(f.metadata()["classes"]) == CLASSES
            assert "downsample_layers.0.0.weight" in f.keys() and "decoder.psp.out_conv.0.weight" in f.keys()


def test_a_lightning_checkpoint_of_the_segmentation_module_reads_too(tmp_path):
    from fcmae.segment.module import SegmentModule
    model = trained_stand_in()
    meta = segmenter_meta(model, CLASSES, default_palette(3), 64, (256, 64), normalization(3, False))
    module = SegmentModule(model, **meta)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 1,
                "loops": {}}, path)
    state, got = read_segmenter(path)
    assert got["classes"] == CLASSES and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    encoder = read_weights(path)  # also usable as pre-trained weights, named as what it is
    assert encoder.kind == "segment-checkpoint" and encoder.segmentation
    assert encoder.summary().startswith(f"{path}: fcmae segmentation checkpoint")
    assert set(encoder.state) == {k[len("encoder."):] for k in model.state_dict() if k.startswith("encoder.")}


def test_other_files_are_not_segmenters(tmp_path):
    from fcmae.checkpoints import save_weights
    from fcmae.encoders import ConvNeXtV2
    path = tmp_path / "classifier.safetensors"
    save_weights(path, ConvNeXtV2(TINY, num_classes=3).state_dict(), {"kind": "classifier"})
    with pytest.raises(ValueError, match=r"classifier\.safetensors holds no segmenter \(no segmentation head\)"):
        read_segmenter(path)


def test_predict_gives_label_maps_at_each_inputs_own_size(tmp_path):
    path, model = export(tmp_path)
    seg = Segmenter.load(path, device="cpu")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (90, 50), dtype=np.uint8)).save(tmp_path / "gray.png")  # converted to RGB
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    pil = Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8))
    tensor = torch.rand(3, 64, 80)
    results = seg.predict([tmp_path / "a.png", tmp_path / "gray.png", tmp_path / "broken.jpg", pil, tensor])
    assert [r.labels.shape if r.labels is not None else None for r in results] == \
        [(40, 70), (90, 50), None, (33, 47), (64, 80)]
    assert results[2].error.startswith(str(tmp_path / "broken.jpg")) and results[0].error is None
    assert results[0].path == str(tmp_path / "a.png") and results[3].path is None
    assert all(r.labels.dtype == torch.uint8 and int(r.labels.max()) < 3 for r in results if r.labels is not None)
    # the same as the library's inference on the normalized image
    x = torch.from_numpy(np.array(Image.open(tmp_path / "a.png"))).permute(2, 0, 1).float() / 255
    mean, std = normalization(3, False)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    expected = infer(model, x[None], scale=(256, 64))[0].argmax(0)
    assert torch.equal(results[0].labels.long(), expected)
    one = seg.predict(tmp_path / "a.png")  # one input: one result
    assert torch.equal(one.labels, results[0].labels)


def test_arrays_for_a_model_of_other_channel_counts(tmp_path):
    path, _ = export(tmp_path, in_chans=5)
    seg = Segmenter.load(path, device="cpu", window=(64, 48))
    array = np.random.default_rng(0).random((5, 48, 72)).astype(np.float32)
    np.save(tmp_path / "a.npy", array)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    arr, photo = seg.predict([tmp_path / "a.npy", tmp_path / "photo.png"])
    expected = infer(seg.model, torch.from_numpy(array)[None], scale=(256, 64), window=(64, 48))[0].argmax(0)
    assert torch.equal(arr.labels.long(), expected)  # as stored: no normalization for an arrays model
    assert "an image, but the segmenter takes 5-channel .npy arrays" in photo.error


def test_tta_runs_every_ratio_and_flip():
    model = trained_stand_in()
    meta = segmenter_meta(model, CLASSES, default_palette(3), 32, (64, 32), None)
    x = torch.rand(3, 32, 32)
    got = Segmenter(model, meta, tta=True).predict(x).labels
    assert torch.equal(got.long(), infer(model, x[None], scale=(64, 32), ratios=TTA_RATIOS, flip=True)[0].argmax(0))


def test_overlay_label_png_and_fractions(tmp_path):
    path, _ = export(tmp_path)
    seg = Segmenter.load(path, device="cpu")
    image = Image.fromarray(np.full((20, 30, 3), 100, np.uint8))
    labels = torch.zeros(20, 30, dtype=torch.uint8)
    labels[:, 15:] = 2
    labels[0, 0] = 255  # ignored: shows the image
    png = seg.label_image(labels)
    assert png.mode == "P" and np.array(png).tolist() == labels.tolist()
    assert png.getpalette()[6:9] == default_palette(3)[2]
    over = np.array(seg.overlay(image, labels))
    assert over.shape == (20, 30, 3) and over[0, 0].tolist() == [100, 100, 100]
    assert over[5, 20].tolist() == [round(0.5 * 100 + 0.5 * c) for c in default_palette(3)[2]]
    fractions = seg.fractions(labels)
    assert list(fractions) == CLASSES
    assert fractions["square"] == pytest.approx(300 / 600) and fractions["background"] == pytest.approx(299 / 600)
    assert fractions["disc"] == 0.0
