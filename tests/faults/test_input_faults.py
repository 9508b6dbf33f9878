"""Fault catalog, inputs found while using the framework on one's own images: an image over
Pillow's decompression-bomb limit is skipped and named like any unreadable file (pre-training,
fine-tuning, predict); skipped files are listed in OUTPUT/skipped_files.txt whatever the warnings
filter; `--output` naming an existing file is one line."""
import os
import struct
import zlib

import pytest

from fcmae.data import labelled as ft_data, transforms
from fcmae.data.reading import SKIPPED_FILES_ENV, BadFile, load_image

from .conftest import FINETUNE, PRETRAIN, error_line, labeled_folder, run_command, write_images

pytestmark = pytest.mark.faults


def bomb_png(path, side=14000):
    """A valid 1-bit PNG of side x side black pixels (196 megapixels, over twice Pillow's
    MAX_IMAGE_PIXELS) in about 24 KB, written chunk by chunk without holding the image."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * side, 9))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_a_bad_file(tmp_path):
    path = bomb_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 100_000
    with pytest.raises(BadFile, match=r"bomb.png \(DecompressionBombError"):
        load_image(path)


def test_pretrain_skips_a_bomb_and_lists_it_with_warnings_ignored(tmp_path):
    """In a child process with PYTHONWARNINGS=ignore (run_command's), loading in a worker process:
    the warnings say nothing, skipped_files.txt and the epoch line still name the file."""
    folder = write_images(tmp_path / "images", 7)
    bomb_png(folder / "003_bomb.png")
    (folder / "005_empty.jpg").write_bytes(b"")
    run = tmp_path / "run"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = run_command(["pretrain", *PRETRAIN, "--data", folder, "--epochs", "1", "--workers", "1",
                            "--output", run], stdout=out, stderr=err)
        assert proc.wait(timeout=600) == 0, (tmp_path / "err.txt").read_text()[-3000:]
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    listed = run / "skipped_files.txt"
    assert f"skipped 2 unreadable files (listed in {listed.absolute()})" in stdout
    assert "skipping unreadable" not in stderr  # the warnings were filtered out
    lines = sorted(listed.read_text().splitlines())  # in the order processes met them
    assert len(lines) == 2  # each once, though the preview (main process) and the worker both met them
    assert lines[0].startswith(f"{folder / '003_bomb.png'} (DecompressionBombError")
    assert lines[1].startswith(f"{folder / '005_empty.jpg'} (")


def test_finetuning_skips_a_bomb_and_lists_it(tmp_path, fcmae):
    root = labeled_folder(tmp_path / "d", per_class=(3, 1))
    bomb_png(root / "train" / "a" / "001_bomb.png")
    train = ft_data.image_folder(root, "train", transforms.eval_transform(64))
    i = [path.name for path in train.paths].index("001_bomb.png")
    with pytest.warns(UserWarning, match="001_bomb.png"):
        _, _, skipped = train[i]  # the bomb: the next image stands in
    assert skipped == 1
    code, err = fcmae("finetune", *FINETUNE, "--data", root, "--epochs", "1", "--output", tmp_path / "run")
    assert code == 0, err
    assert "001_bomb.png (DecompressionBombError" in (tmp_path / "run" / "skipped_files.txt").read_text()
    assert SKIPPED_FILES_ENV not in os.environ  # set for the run only


def test_predict_gives_a_bomb_an_error_row(tmp_path, fcmae):
    import csv

    from fcmae.checkpoints import save_weights
    from fcmae.encoders import ConvNeXtV2
    model = ConvNeXtV2({"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}, 3, 2)
    save_weights(tmp_path / "clf.safetensors", model.state_dict(), {"classes": ["x", "y"], "input_size": 64})
    folder = write_images(tmp_path / "in", 1)
    bomb_png(folder / "bomb.png")
    code, err = fcmae("predict", "--checkpoint", tmp_path / "clf.safetensors", folder, "--output",
                      tmp_path / "p.csv", "--workers", "0", "--device", "cpu")
    assert code == 1 and "Traceback" not in err
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert "DecompressionBombError" in rows[str(folder / "bomb.png")]["error"]
    assert rows[str(folder / "000.png")]["class_1"] in ("x", "y")


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_output_naming_an_existing_file_is_one_line(tmp_path, fcmae, command):
    (tmp_path / "taken").write_text("someone's file")
    if command == "pretrain":
        args = [*PRETRAIN, "--data", write_images(tmp_path / "images", 4)]
    else:
        args = [*FINETUNE, "--data", labeled_folder(tmp_path / "d")]
    code, err = fcmae(command, *args, "--output", tmp_path / "taken")
    assert code == 2
    assert error_line(err) == (f"fcmae: error: --output {tmp_path / 'taken'} is a file, not a folder: pass a run "
                               f"directory (new or existing)")
    assert (tmp_path / "taken").read_text() == "someone's file"


def test_a_very_large_jpeg_is_decoded_reduced(tmp_path, monkeypatch):
    """Scaled down: with DRAFT_SIDE 64, a 300 x 260 JPEG (shorter side over 2 x 64) decodes at
    1/4 scale (75 x 65: the largest reduction keeping 64), as a 12000 x 10400 photo would with
    2048 (3000 x 2600); a 120 px one (under 2 x 64) at full size. Both loaders: Pillow's (load_image) and the bytes one
    (read_image, otherwise torchvision's JPEG decoder)."""

    import numpy as np
    from PIL import Image

    import fcmae.data.reading as fdata
    monkeypatch.setattr(fdata, "DRAFT_SIDE", 64)
    rng = np.random.default_rng(0)
    for (w, h), expected in (((300, 260), (75, 65)), ((120, 300), (120, 300))):
        path = tmp_path / f"{w}x{h}.jpg"
        yy, xx = np.mgrid[:h, :w]  # smooth content, as photos have, plus a little noise
        smooth = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1) + rng.normal(0, 4, (h, w, 3))
        Image.fromarray(smooth.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        assert fdata.load_image(path).size == expected
        decoded = fdata.read_image(path.read_bytes(), "RGB", path)
        size = decoded.size if isinstance(decoded, Image.Image) else (decoded.shape[2], decoded.shape[1])
        assert size == expected
    # the reduced decode is a faithful downscale: close to Pillow's full decode resized
    full = Image.open(tmp_path / "300x260.jpg").convert("RGB").resize((75, 65), Image.BOX)
    reduced = fdata.load_image(tmp_path / "300x260.jpg")
    assert np.abs(np.asarray(full, float) - np.asarray(reduced, float)).mean() < 3
