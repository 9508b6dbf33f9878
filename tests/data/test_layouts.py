"""Folder layouts lose no file silently: a tree of files is read whole by pre-training and `fcmae
shard`, files beside fine-tuning's class folders are named as left out; a held-out image's
substitute comes from the held-out split; `.npy` class folders feed the kNN monitor, `fcmae knn`
and `fcmae analyze`; `fcmae shard` to a file is one line."""
import numpy as np
import pytest
import torch
from helpers import PRETRAIN_TINY, SMALL_FINETUNE, parse_pretrain
from PIL import Image

from fcmae.cli import main
from fcmae.commands.finetune import build_parser as finetune_parser
from fcmae.data.modules import PretrainData
from fcmae.data.shards import write_shards
from fcmae.finetune.task import datasets
from fcmae.training.flags import recipe_path


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One compute thread (tests/conftest.py)."""


def images(folder, names, size=48, value=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if value is None else \
            np.full((size, size, 3), value(name), np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def run(*argv, capsys):
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_a_folder_with_files_and_subfolders_is_read_whole(tmp_path):
    photos = images(tmp_path / "photos", ["a.jpg", "b.jpg", "c.png"])
    images(photos / "thumbs", ["d.jpg", "e.jpg"])
    images(photos / "thumbs" / "tiny", ["f.png"])
    source = PretrainData(str(photos), 64, workers=0).dataset.source
    assert sorted(str(p.relative_to(photos)) for p in source.paths) == [
        "a.jpg", "b.jpg", "c.png", "thumbs/d.jpg", "thumbs/e.jpg", "thumbs/tiny/f.png"]
    index = write_shards(photos, tmp_path / "shards", samples_per_shard=4, progress=False)
    assert index["samples"] == 6 and index["classes"] is None  # the same files, whole; no class folders
    classes = tmp_path / "classes"  # class folders only: labelled, as before
    images(classes / "x", ["1.png", "2.png"]), images(classes / "y", ["3.png"])
    assert write_shards(classes, tmp_path / "class-shards", progress=False)["classes"] == ["x", "y"]


def test_shard_to_an_existing_file_is_one_line(tmp_path, capsys):
    src, taken = images(tmp_path / "src", ["a.png"]), tmp_path / "taken"
    taken.write_text("someone's file")
    code, out = run("shard", src, taken, capsys=capsys)
    assert code == 2 and "Traceback" not in out.err
    assert out.err.strip() == (f"fcmae: error: OUT {taken} is a file, not a folder: pass a folder for the shards "
                               f"(a new one, or the one an interrupted run was writing)")
    assert taken.read_text() == "someone's file"


def finetune_cfg(data, *args):
    return finetune_parser().parse_args(["--config", recipe_path("finetune", "atto"), *SMALL_FINETUNE,
                                         "--batch-size", "2", "--data", str(data), *args])


def test_files_beside_finetunings_class_folders_are_named_as_left_out(tmp_path):
    data = tmp_path / "labelled"
    images(data / "train" / "cat", ["1.png", "2.png", "3.png"]), images(data / "train" / "dog", ["4.png", "5.png"])
    images(data / "train", ["stray.png", "other.jpg"])
    train, val, classes, notes = datasets(finetune_cfg(data), tmp_path / "out", 1)
    assert classes == ["cat", "dog"] and len(train) + len(val) == 5
    assert notes[0] == (f"note: 2 files directly in {data / 'train'} (other.jpg, ...) are left out: a file's class is "
                        f"the folder it is in; move them into a class folder")


def test_an_unreadable_held_out_image_is_replaced_from_the_held_out_split(tmp_path):
    """Without val/, train/ is split; a held-out file that cannot be read gives way to the next
    held-out file, never to a training image next to it in the folder (nor a training file to a
    held-out one)."""
    data = tmp_path / "labelled"
    for c in ("a", "b"):  # every image one grey level, from its name, to tell them apart
        images(data / "train" / c, [f"{i:02d}.png" for i in range(10)], size=64,
               value=lambda name, c=c: 10 * int(name[:2]) + 100 * (c == "b"))
    train, val, _, _ = datasets(finetune_cfg(data, "--val-split", "0.3", "--input-size", "64", "--crop-pct", "1.0"),
                                tmp_path / "out", 1)
    folder, held, kept = val.dataset, list(val.indices), list(train.indices)
    # a held-out file whose neighbour in the folder is a training file
    v = next(j for j, i in enumerate(held) if i + 1 in kept)
    t = next(j for j, i in enumerate(kept) if i + 1 in held)  # and a training file followed by a held-out one
    for i in (held[v], kept[t]):
        folder.paths[i].write_bytes(b"not an image")
    read, real = [], folder.read
    folder.read = lambda i: read.append(i) or real(i)
    item = val[v]
    assert item.skipped == 1 and read == [held[v], held[(v + 1) % len(held)]]
    shown = round(float(item.image[0].mean() * 0.229 + 0.485) * 255)  # back to 0-255 (ImageNet mean/std)
    expected = 10 * int(folder.paths[held[(v + 1) % len(held)]].stem) + 100 * int(folder.targets[read[-1]])
    assert abs(shown - expected) <= 1
    read.clear()
    train_folder = train.dataset  # a copy of the folder with the training transform
    train_folder.read = lambda i, real=train_folder.read: read.append(i) or real(i)
    assert train[t].skipped == 1 and read == [kept[t], kept[(t + 1) % len(kept)]]


def npy_classes(root, chans=5, per_class=6, size=40):
    for c in range(2):
        folder = root / "train" / f"band{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):  # the class: which band is bright
            bands = np.random.default_rng(i + 10 * c).random((chans, size, size))
            bands[0 if c == 0 else chans - 1] += 3
            np.save(folder / f"{i}.npy", bands.astype(np.float32))
    return root


def test_knn_and_analyze_read_npy_class_folders(tmp_path, capsys):
    data = npy_classes(tmp_path / "bands")
    code, out = run("knn", "--random-init", "--in-chans", "5", "--data", data, "--input-size", "32", "--workers", "0",
                    "--device", "cpu", "--val-split", "0.34", "--k", "3", "--output", tmp_path / "knn.json", capsys=capsys)
    assert code == 0 and "top-1 100.00%" in out.out, out  # the bright band tells the classes apart
    code, out = run("analyze", "--random-init", "--in-chans", "5", "--data", data, "--input-size", "32", "--workers",
                    "0", "--device", "cpu", "--images", "4", "--output", tmp_path / "analysis", capsys=capsys)
    assert code == 0 and "4 images" in out.out and (tmp_path / "analysis" / "collapse.png").is_file(), out


def test_the_knn_monitor_watches_a_multispectral_run(tmp_path):
    from fcmae.commands.pretrain import fit
    data = npy_classes(tmp_path / "bands", per_class=4)
    trainer, _ = fit(parse_pretrain(*PRETRAIN_TINY, "--data", str(data / "train"), "--in-chans", "5",
                                    "--eval-data", str(data), "--eval-val-split", "0.5", "--max-steps", "2",
                                    "--epochs", "1", "--output", str(tmp_path / "run")))
    monitor = next(cb for cb in trainer.callbacks if type(cb).__name__ == "KnnMonitor")
    assert monitor.last["step"] == 2 and 0 <= monitor.last["top1"] <= 100
    assert '"eval/knn_top1"' in (tmp_path / "run" / "metrics.jsonl").read_text()
