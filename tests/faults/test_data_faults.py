"""Fault catalog, data: bad files are skipped with a warning naming them and counted per epoch
(or fatal with --strict-data), odd image modes convert to the right values, and an empty or
missing dataset is one line at the start."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.commands.pretrain import fit
from fcmae.data import labelled as ft_data, transforms
from fcmae.data.modules import PretrainData
from fcmae.data.sources import FileSamples
from fcmae.data.transforms import pretrain_transform
from fcmae.errors import UserError

from .conftest import FINETUNE, error_line, labeled_folder, write_images

pytestmark = pytest.mark.faults


def bad_files(folder):
    """Eight files in sorted order good, bad, good, bad, ...: each bad one is replaced by the
    good one after it, so an epoch over all eight skips exactly four. Returns the bad names."""
    write_images(folder, 4, start=0)
    for i, name in enumerate(("000.png", "001.png", "002.png", "003.png")):
        (folder / name).rename(folder / f"{2 * i}_good.png")
    jpeg = io.BytesIO()  # large enough that its first half holds whole headers: Pillow could pad the rest
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (folder / "1_truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "3_empty.jpg").write_bytes(b"")
    (folder / "5_text.png").write_text("not an image, despite the name")
    (folder / "7_dangling.jpg").symlink_to(folder / "no-such-file.jpg")  # unreadable: open fails
    (folder / "notes.txt").write_text("not listed: not an image extension")
    return ["1_truncated.jpg", "3_empty.jpg", "5_text.png", "7_dangling.jpg"]


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_files_are_skipped_named_and_counted_per_epoch(tmp_path, pretrain_cfg, recwarn, capfd, workers):
    names = bad_files(tmp_path / "images")
    trainer, module = fit(pretrain_cfg("--data", tmp_path / "images", "--epochs", "2", "--workers", workers,
                                       "--output", tmp_path / "run"))
    assert trainer.global_step == 4  # 8 samples / batch 4 = 2 steps per epoch, 2 epochs: nothing lost
    assert trainer.callback_metrics["data/skipped"] == 4  # the last epoch's count
    out, err = capfd.readouterr()
    assert out.count("skipped 4 unreadable files") == 2  # one line per epoch
    warned = err + "\n".join(str(w.message) for w in recwarn)  # worker processes warn on stderr
    for name in names:
        assert f"skipping unreadable file {tmp_path / 'images' / name}" in warned, name
    assert "notes.txt" not in warned


def test_an_unreadable_file_is_skipped(tmp_path, monkeypatch, recwarn):
    """Root reads through chmod 000, so the permission error is simulated at open()."""
    folder = write_images(tmp_path / "images", 3)
    real_open = Image.open

    def open_(path, *args, **kwargs):
        if str(path).endswith("001.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(Image, "open", open_)
    samples = FileSamples(sorted(folder.iterdir()), 3)
    image, skipped = samples[1]
    assert skipped == 1 and np.array_equal(np.asarray(image), np.asarray(real_open(folder / "002.png")))
    assert any("001.png (PermissionError" in str(w.message) for w in recwarn)


def test_strict_data_makes_the_first_bad_file_fatal(tmp_path, fcmae):
    bad_files(tmp_path / "images")
    code, err = fcmae("pretrain", "--model", "atto", "--input-size", "64", "--batch-size", "4", "--decoder-dim", "16",
                      "--workers", "1", "--accelerator", "cpu", "--backend", "sparse", "--no-export",
                      "--data", tmp_path / "images", "--strict-data", "--output", tmp_path / "run")
    line = error_line(err)
    assert code == 2 and "unreadable file" in line and "images/" in line and "--strict-data" in line
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_strict_data_in_finetuning(tmp_path):
    root = labeled_folder(tmp_path / "d")
    (root / "train" / "a" / "000.png").write_bytes(b"")
    lenient = ft_data.image_folder(root, "train", None)
    image, label, skipped = lenient[0]
    assert (label, skipped) == (0, 1) and image.size == (48, 48)  # its neighbour 001.png stands in
    with pytest.raises(UserError, match=r"unreadable file .*000\.png"):
        ft_data.image_folder(root, "train", None, strict=True)[0]


# ----------------------------------------------------------------------------- conversions

def save(img, path, fmt=None):
    img.save(path, fmt)
    return path


def test_image_modes_convert_to_the_right_rgb_values(tmp_path):
    """Pillow's own convert("RGB") clips 16-bit values at 255 (all but black turns white) and
    shows the hidden colour of transparent pixels; these must come out right."""
    sixteen = np.array([[0, 128 * 257, 65535, 1000]], np.uint16)  # -> 0, 128, 255, 4
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])  # hidden red, opaque red, half black
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    files = {
        "gray.png": (save(Image.new("L", (1, 1), 100), tmp_path / "gray.png"), [(100, 100, 100)]),
        "rgba.png": (save(rgba, tmp_path / "rgba.png"), [(255, 255, 255), (255, 0, 0), (127, 127, 127)]),
        "cmyk.tif": (save(Image.new("CMYK", (1, 1), (255, 0, 0, 0)), tmp_path / "cmyk.tif"), [(0, 255, 255)]),
        "palette.png": (save(palette, tmp_path / "palette.png"), [(255, 255, 255), (0, 0, 255)]),
        "16bit.png": (save(Image.fromarray(sixteen), tmp_path / "16bit.png"), [(v, v, v) for v in (0, 128, 255, 4)]),
        "32bit.tif": (save(Image.fromarray(sixteen.astype(np.int32)), tmp_path / "32bit.tif"),
                      [(v, v, v) for v in (0, 128, 255, 4)]),
    }
    assert Image.open(files["16bit.png"][0]).mode == "I;16" and Image.open(files["32bit.tif"][0]).mode == "I"
    samples = FileSamples([path for path, _ in files.values()], 3)
    for i, (name, (path, expected)) in enumerate(files.items()):
        image, skipped = samples[i]
        assert image.mode == "RGB" and skipped == 0
        got = np.asarray(image).reshape(-1, 3).astype(int)
        assert np.abs(got - np.array(expected)).max() <= 1, (name, got.tolist())  # 1: rounding of the blends
    gray16, _ = FileSamples([files["16bit.png"][0]], 1)[0]  # --in-chans 1
    assert gray16.mode == "L" and np.asarray(gray16).tolist() == [[0, 128, 255, 4]]
    # fine-tuning reads through the same loader
    root = tmp_path / "ft"
    (root / "val" / "x").mkdir(parents=True)
    files["16bit.png"][0].rename(root / "val" / "x" / "16bit.png")
    image, _, _ = ft_data.image_folder(root, "val", None)[0]
    assert np.asarray(image)[0, :, 0].tolist() == [0, 128, 255, 4]


def test_an_image_smaller_than_the_crop_is_upsampled(tmp_path):
    tiny, thin = Image.new("RGB", (8, 8), (200, 30, 30)), Image.new("RGB", (3, 50), (200, 30, 30))
    transform = pretrain_transform(64)
    for img in (tiny, thin):
        view = transform(img)
        assert view.shape == (3, 64, 64)
        assert (view[:, 20:40, 20:40].int() - torch.tensor([200, 30, 30]).view(3, 1, 1)).abs().max() <= 5
    for transform in (transforms.train_transform(64, aa=None, reprob=0), transforms.eval_transform(64)):
        for img in (tiny, thin):
            assert transform(img).shape == (3, 64, 64)
    view, mask = PretrainData(str(write_images(tmp_path / "small", 2, size=8)), 64).dataset[0]
    assert view.shape == (3, 64, 64) and mask.shape == (2, 2)


# ----------------------------------------------------------------------------- folders

def test_an_empty_class_folder(tmp_path, fcmae):
    root = tmp_path / "imagenet"
    write_images(root / "train" / "n01", 3)
    (root / "train" / "n02").mkdir()  # empty: harmless to pre-training, which ignores labels
    assert len(PretrainData(str(root), 64).dataset) == 3
    labeled_folder(tmp_path / "ft")
    (tmp_path / "ft" / "train" / "c").mkdir()  # would shift the labels: fine-tuning refuses it
    code, err = fcmae("finetune", *FINETUNE, "--data", tmp_path / "ft", "--output", tmp_path / "run")
    assert code == 2 and "no valid file for the classes c" in error_line(err) and "\n" not in err.strip()


def test_a_missing_train_folder(tmp_path, fcmae):
    labeled_folder(tmp_path / "d")
    (tmp_path / "d" / "train").rename(tmp_path / "d" / "training")
    (tmp_path / "d" / "training").rename(tmp_path / "elsewhere")  # only val/ is left
    code, err = fcmae("pretrain", "--data", tmp_path / "d", "--dry-run", "--output", tmp_path / "run")
    assert code == 2 and "has val/ but no train/ folder" in error_line(err) and "\n" not in err.strip()
    assert str(tmp_path / "d" / "train") in err
    code, err = fcmae("finetune", *FINETUNE, "--data", tmp_path / "d", "--output", tmp_path / "run")
    assert code == 2 and f"has no train/ folder: expected {tmp_path / 'd'}/train/<class>/<image>" in error_line(err)


@pytest.mark.parametrize("layout", ["empty folder", "empty train/", "only non-images"])
def test_an_empty_dataset(tmp_path, fcmae, layout):
    root = tmp_path / "d"
    root.mkdir()
    if layout == "empty train/":
        (root / "train" / "n01").mkdir(parents=True)
    elif layout == "only non-images":
        (root / "readme.txt").write_text("hello")
    code, err = fcmae("pretrain", "--data", root, "--dry-run", "--output", tmp_path / "run")
    line = error_line(err)
    looked_in = root / "train" if layout == "empty train/" else root
    assert code == 2 and f"no images or .npy files in '{looked_in}': expected DIR/train/<class>/<image>" in line
    assert "\n" not in err.strip()
    if layout == "empty train/":
        (root / "val" / "n01").mkdir(parents=True)
        code, err = fcmae("finetune", *FINETUNE, "--data", root, "--output", tmp_path / "run")
        assert code == 2 and "put images in one folder per class" in error_line(err)
