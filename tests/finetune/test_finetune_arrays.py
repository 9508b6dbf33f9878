"""Fine-tuning, `fcmae eval` and `fcmae predict` on class folders of .npy arrays (C, H, W) of any
channel count: read as pre-training reads them, tensor augmentations (no RandAugment, with a
note), and one-line errors for a wrong channel count."""
import json

import numpy as np
import pytest
import torch
from helpers import run_fcmae

from fcmae.data import labelled as data, transforms
from fcmae.training.flags import recipe_path

TINY = json.dumps({"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]})


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One compute thread (tests/conftest.py)."""


def array_folders(root, chans=5, per_class=(4, 2), size=48):
    """root/{train,val}/{bright,dark}/NNN.npy: (chans, size, size) uint8, class 'bright' higher."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, (lo, hi) in {"bright": (128, 256), "dark": (0, 128)}.items():
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                np.save(folder / f"{i:03d}.npy", rng.integers(lo, hi, (chans, size, size + 4 * i), dtype=np.uint8))
    return root


def fcmae(capsys, *argv):
    return run_fcmae(capsys, *argv)


FINETUNE = ["--config", "__ATTO__", "--model", TINY, "--input-size", "64", "--batch-size", "4", "--effective-batch",
            "4", "--epochs", "1", "--max-steps", "2", "--warmup-epochs", "0", "--workers", "0", "--accelerator",
            "cpu", "--devices", "1", "--precision", "32"]


def finetune_args(*args):
    return [recipe_path("finetune", "atto") if a == "__ATTO__" else a for a in FINETUNE] + list(args)


def test_arrays_are_read_as_in_pretraining_and_transformed_as_tensors(tmp_path, capsys):
    root = array_folders(tmp_path / "d")
    train = data.image_folder(root, "train", transforms.train_transform(64, 5), in_chans=5)
    assert "note: --aa rand-m9-mstd0.5-inc1 applies to RGB images only" in capsys.readouterr().out
    assert train.arrays and train.classes == ["bright", "dark"] and len(train) == 8
    x, label, skipped = train[0]
    assert x.shape == (5, 64, 64) and x.dtype == torch.float32 and skipped == 0 and label == 0
    val = data.image_folder(root, "val", transforms.eval_transform(64, 5), in_chans=5)
    v, _, _ = val[0]
    raw = np.load(root / "val" / "bright" / "000.npy").astype(np.float32) / 255  # (5, 48, 48) in [0, 1]
    # eval: resize the shorter side to 64 / (224/256) = 73, center crop 64; not normalized
    assert v.shape == (5, 64, 64) and 0.4 < v.mean() < 1.05 and abs(v.mean() - raw.mean()) < 0.05
    # RGB arrays work too, with the same conventions (no normalization)
    rgb = data.image_folder(array_folders(tmp_path / "rgb", chans=3), "val", transforms.eval_transform(64, 3),
                            in_chans=3)
    assert rgb.arrays and rgb[0][0].shape == (3, 64, 64) and rgb[0][0].min() >= -0.1


def test_five_channel_arrays_finetune_evaluate_and_predict(tmp_path, capsys):
    root = array_folders(tmp_path / "d")
    run = tmp_path / "run"
    code, out, err = fcmae(capsys, "finetune", *finetune_args("--data", root, "--in-chans", "5", "--output", run))
    assert code == 0, err
    assert "applies to RGB images only" in out
    assert (run / "classifier.safetensors").is_file()
    code, out, err = fcmae(capsys, "eval", "--checkpoint", run / "classifier.safetensors", "--data", root,
                           "--accelerator", "cpu", "--workers", "0", "--batch-size", "4")
    assert code == 0, err
    assert "on 4 images" in out
    code, _, err = fcmae(capsys, "predict", "--checkpoint", run / "classifier.safetensors", root / "val",
                         "--output", tmp_path / "p.csv", "--workers", "0", "--device", "cpu")
    assert code == 0, err
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert len(lines) == 5 and all(",bright," in line or ",dark," in line for line in lines[1:])


@pytest.mark.parametrize("chans, args, message", [
    (5, ["--in-chans", "3"], "has 5 channels but --in-chans is 3: pass --in-chans 5"),
    (None, ["--in-chans", "5"], "--in-chans 5: image folders give 3 (RGB) or 1 (grayscale) channels: pass 3 or 1"),
])
def test_wrong_channel_counts_are_one_line(tmp_path, capsys, chans, args, message):
    from helpers import labelled_images
    root = array_folders(tmp_path / "d", chans) if chans else labelled_images(tmp_path / "d", 2, 2, val_per_class=1)
    code, out, err = fcmae(capsys, "finetune", *finetune_args("--data", root, "--output", tmp_path / "run", *args))
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fcmae: error: ") and message in err


def test_mixed_images_and_arrays_are_refused(tmp_path):
    root = array_folders(tmp_path / "d", 3)
    from PIL import Image
    Image.new("RGB", (48, 48)).save(root / "train" / "dark" / "zzz.png")
    with pytest.raises(Exception, match="mixes images and .npy arrays"):
        data.image_folder(root, "train", None, in_chans=3)
