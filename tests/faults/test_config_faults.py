"""Fault catalog, configuration: each mistake is one line naming the problem and the fix, exit
code 2, no traceback, before any heavy work (checked with --dry-run, which stops right after the
checks, or by the run directory not being created)."""
import sys

import numpy as np
import pytest
from safetensors.torch import save_file

from fcmae.encoders import ConvNeXtV2

from .conftest import FINETUNE, error_line, labeled_folder, write_images

pytestmark = pytest.mark.faults

TINY = ["--input-size", "64", "--batch-size", "4", "--accelerator", "cpu", "--devices", "1", "--workers", "0"]


def one_line(err):
    line = error_line(err)
    assert err.strip() == line, f"more than the error line on stderr:\n{err}"
    return line


@pytest.mark.parametrize("args, expected", [
    (["--input-size", "100"], "--input-size 100 is not a multiple of 32: use e.g. 96"),
    (["--mask-ratio", "0"], "--mask-ratio 0.0 is outside (0, 1): pass the fraction of patches to mask, e.g. 0.6"),
    (["--mask-ratio", "1"], "--mask-ratio 1.0 is outside (0, 1)"),
    (["--mask-ratio", "-0.2"], "--mask-ratio -0.2 is outside (0, 1)"),
    (["--mask-ratio", "0.9", "--input-size", "64"], "--mask-ratio 0.9 leaves no visible patch of the 4 in a 64px crop"),
    (["--model", "gigantic"], "no pretrain recipe for model 'gigantic' (looked for configs/pretrain/gigantic.yaml): "
                              "pass a known size or --config FILE"),
    (["--config", "__RECIPE__", "--model", "gigantic"],  # the recipe named explicitly: the parser's check
     "--model: got 'gigantic', pass one of atto, femto, pico, nano, tiny, base, large, huge (see fcmae pretrain --help)"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--batch-size", "many"], "--batch-size: got 'many', expected int (see fcmae pretrain --help)"),
    (["--ckpt-every", "0"], "--ckpt-every 0: must be at least 1"),
    (["--in-chans", "4"], "--in-chans 4 needs .npy arrays (C, H, W), one per sample"),
    (["--in-chans", "3", "--data", "__ARRAYS__"], "has 5 channels but --in-chans is 3: pass --in-chans 5"),
    (["--in-chans", "2", "--data", "demo"], "--data demo makes RGB or grayscale images, not 2 channels"),
])
def test_pretrain_options(fcmae, tmp_path, args, expected):
    from fcmae.training.flags import recipe_path
    write_images(tmp_path / "images", 2)
    (tmp_path / "arrays").mkdir()
    np.save(tmp_path / "arrays" / "a.npy", np.zeros((5, 48, 48), np.float32))
    subs = {"__RECIPE__": recipe_path("pretrain", "atto"), "__ARRAYS__": tmp_path / "arrays"}
    args = [subs.get(a, a) for a in args]
    data = [] if "--data" in args else ["--data", tmp_path / "images"]
    code, err = fcmae("pretrain", *TINY, *data, *args, "--dry-run", "--output", tmp_path / "run")
    assert code == 2 and expected in one_line(err)


def test_minkowski_backend_without_minkowski_engine(fcmae, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # installed here: hide it (import raises)
    code, err = fcmae("pretrain", *TINY, "--backend", "minkowski", "--dry-run", "--output", tmp_path / "run")
    assert code == 2 and one_line(err) == (
        "fcmae: error: backend 'minkowski' needs MinkowskiEngine, which is not installed: install it with "
        "`bash scripts/install_minkowski.sh`, or choose --backend sparse")


@pytest.mark.parametrize("args, expected", [
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--input-size", "100"], "--input-size 100 is not a multiple of 32: pass e.g. 224"),
    (["--in-chans", "4"], "--in-chans 4: image folders give 3 (RGB) or 1 (grayscale) channels: pass 3 or 1"),
    (["--model", "gigantic"], "--model: unknown"),
])
def test_finetune_options(fcmae, tmp_path, args, expected):
    root = labeled_folder(tmp_path / "d")
    code, err = fcmae("finetune", *FINETUNE, "--data", root, *args, "--dry-run", "--output", tmp_path / "run")
    assert code == 2 and expected in one_line(err)


def test_pretrained_weights_of_another_size(fcmae, tmp_path):
    root = labeled_folder(tmp_path / "d")
    other = tmp_path / "other.safetensors"
    save_file(ConvNeXtV2({"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}, num_classes=0).state_dict(), other)
    code, err = fcmae("finetune", *FINETUNE, "--data", root, "--pretrained", other, "--output", tmp_path / "run")
    assert code == 2 and "does not fit --model {depths: [1, 1, 1, 1], dims: [8, 16, 32, 64]} --in-chans 3: " \
        "downsample_layers.0.0.weight is (16, 3, 4, 4) in the file but (8, 3, 4, 4) in the model: " \
        "pass the --model and --in-chans it was trained with" in error_line(err)
    assert not (tmp_path / "run").exists()  # before anything was written
