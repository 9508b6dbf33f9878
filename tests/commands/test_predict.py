"""`fcmae predict` and `fcmae.Classifier`: CSV rows with the top-k classes of each file, the
probabilities the classifier gives through its eval transform, error rows for unreadable files
(exit code 1), release files named by index, .npy inputs of any channel count."""
import argparse
import csv
import json

import numpy as np
import pytest
import torch
from helpers import TINY, labelled_images, randomize_
from PIL import Image

from fcmae import Classifier
from fcmae.checkpoints import save_weights
from fcmae.cli import main
from fcmae.data.reading import load_image
from fcmae.data.transforms import eval_transform
from fcmae.encoders import ConvNeXtV2
from fcmae.errors import UserError
from fcmae.training.flags import recipe_path

NAMES = ["cat", "dog", "eel", "fox"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One compute thread (tests/conftest.py)."""


def classifier_file(path, in_chans=3, classes=NAMES, meta=None):
    """A random tiny classifier saved as an fcmae export (class names in its metadata)."""
    torch.manual_seed(0)
    model = randomize_(ConvNeXtV2(TINY, in_chans, len(classes)))
    save_weights(path, model.state_dict(), {"kind": "classifier", "input_size": 64, "crop_pct": None,
                                            "classes": list(classes), **(meta or {})})
    return model.eval(), path


def images(folder, n, size=80, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return sorted(folder.glob("*.png"))


def fcmae(*argv):
    """`fcmae ARGV` in this process -> exit code."""
    try:
        return main([str(a) for a in argv]) or 0
    except SystemExit as e:
        return e.code


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_probs(model, path, in_chans=3):
    """Softmax of the model on the file through the 64 px eval transform, computed here."""
    x = eval_transform(64, in_chans)(load_image(path, "RGB"))
    with torch.no_grad():
        return model(x[None]).softmax(-1)[0]


def test_predict_writes_topk_rows_and_an_error_row_for_a_bad_file(tmp_path, capsys):
    model, ckpt = classifier_file(tmp_path / "clf.safetensors")
    good = images(tmp_path / "in" / "nested" / "deeper", 3) + images(tmp_path / "in", 2, seed=1)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "in" / "notes.txt").write_text("not an image: not listed")
    out = tmp_path / "preds.csv"
    code = fcmae("predict", "--checkpoint", ckpt, tmp_path / "in", "--output", out, "--topk", "3",
                 "--workers", "0", "--device", "cpu", "--batch-size", "2")
    assert code == 1  # one file could not be read
    table = rows(out)
    assert list(table[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3", "error"]
    assert len(table) == 6 and not any(r["path"].endswith("notes.txt") for r in table)
    by_path = {r["path"]: r for r in table}
    bad = by_path[str(tmp_path / "in" / "broken.jpg")]
    assert "broken.jpg" in bad["error"] and bad["class_1"] == "" and bad["prob_1"] == ""
    for path in good:
        r = by_path[str(path)]
        assert r["error"] == ""
        probs = expected_probs(model, path)
        p, idx = probs.topk(3)
        assert [r[f"class_{i}"] for i in (1, 2, 3)] == [NAMES[i] for i in idx.tolist()]
        assert [float(r[f"prob_{i}"]) for i in (1, 2, 3)] == pytest.approx(p.tolist(), abs=1e-5)
    assert "1 could not be read" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_all_files_read_exit_0_and_topk_is_capped_at_the_classes(tmp_path):
    _, ckpt = classifier_file(tmp_path / "clf.safetensors")
    files = images(tmp_path / "in", 2)
    out = tmp_path / "p.csv"
    assert fcmae("predict", "--checkpoint", ckpt, *files, "--output", out, "--workers", "1", "--device", "cpu") == 0
    table = rows(out)
    assert [r["path"] for r in table] == [str(f) for f in files]
    assert "class_4" in table[0] and "class_5" not in table[0]  # --topk 5, 4 classes
    assert sorted(r[f"class_{i}"] for i in range(1, 5) for r in table[:1]) == sorted(NAMES)


def test_a_release_finetuned_checkpoint_names_classes_by_index(tmp_path):
    torch.manual_seed(0)
    model = randomize_(ConvNeXtV2(TINY, 3, 3)).eval()
    path = tmp_path / "release.pth"  # the release's layout: {"model", "args", ...}
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(input_size=64), "epoch": 9}, path)
    files = images(tmp_path / "in", 2)
    clf = Classifier.load(path, device="cpu")
    assert clf.classes == ["0", "1", "2"] and clf.input_size == 64
    p = clf.predict(files[0], topk=3)
    probs = expected_probs(model, files[0])
    assert [name for name, _ in p.top] == [str(i) for i in probs.argsort(descending=True).tolist()]


def test_an_encoder_without_head_is_one_line(tmp_path, capsys):
    path = tmp_path / "enc.safetensors"
    save_weights(path, ConvNeXtV2(TINY, 3, 0).state_dict(), {"kind": "encoder"})
    images(tmp_path / "in", 1)
    assert fcmae("predict", "--checkpoint", path, tmp_path / "in", "--output", tmp_path / "p.csv") == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("fcmae: error:") and "encoder without a classifier head" in err
    assert fcmae("predict", "--checkpoint", path, tmp_path / "nothing-here", "--output", tmp_path / "p.csv") == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_npy_inputs_of_five_channels(tmp_path):
    model, ckpt = classifier_file(tmp_path / "clf.safetensors", in_chans=5, classes=["a", "b"])
    folder = tmp_path / "arrays"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "u8.npy", rng.integers(0, 256, (5, 70, 90), dtype=np.uint8))
    np.save(folder / "f32.npy", rng.standard_normal((5, 64, 64)).astype(np.float32))
    np.save(folder / "three.npy", rng.standard_normal((3, 64, 64)).astype(np.float32))  # wrong channel count
    images(folder, 1)  # an image: this classifier takes arrays
    out = tmp_path / "p.csv"
    assert fcmae("predict", "--checkpoint", ckpt, folder, "--output", out, "--workers", "0", "--device", "cpu") == 1
    by_name = {r["path"].rsplit("/", 1)[1]: r for r in rows(out)}
    assert "expected (5, H, W)" in by_name["three.npy"]["error"]
    assert "5-channel .npy arrays" in by_name["00.png"]["error"]
    for name in ("u8.npy", "f32.npy"):
        x = torch.from_numpy(np.load(folder / name))
        x = x.float() / 255 if x.dtype == torch.uint8 else x  # as pre-training reads arrays, not normalized
        with torch.no_grad():
            probs = model(eval_transform(64, 5)(x)[None]).softmax(-1)[0]
        assert by_name[name]["error"] == ""
        assert float(by_name[name]["prob_1"]) == pytest.approx(probs.max().item(), abs=1e-5)
        assert by_name[name]["class_1"] == ["a", "b"][probs.argmax()]


def test_classifier_api_takes_paths_pil_images_and_tensors(tmp_path):
    _, ckpt = classifier_file(tmp_path / "clf.safetensors")
    path = images(tmp_path / "in", 1)[0]
    clf = Classifier.load(ckpt, device="cpu")
    assert clf.classes == NAMES
    img = Image.open(path)
    by_path, by_image = clf.predict([path, img], topk=2)
    assert by_path.path == str(path) and by_image.path is None and by_path.error is None
    assert [n for n, _ in by_path.top] == [n for n, _ in by_image.top] and len(by_path.top) == 2
    assert by_path.top[0][1] == pytest.approx(by_image.top[0][1], abs=1e-6)
    assert by_path.label == by_path.top[0][0] and by_path.top[0][1] >= by_path.top[1][1]
    # tensors are taken as arrays: uint8 scaled to [0, 1], the same as the float tensor / 255
    u8 = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
    a, b = clf.predict(torch.stack([u8, u8]).float() / 255)[0], clf.predict([u8])[0]  # a batch, a list
    assert [n for n, _ in a.top] == [n for n, _ in b.top]
    assert a.top[0][1] == pytest.approx(b.top[0][1], abs=1e-6)
    bad = clf.predict(torch.zeros(4, 8, 8))  # one input: one Prediction
    assert bad.error and "expected (3, H, W)" in bad.error and bad.top == [] and bad.label is None
    with pytest.raises(UserError, match="encoder without a classifier head"):
        path = tmp_path / "enc.safetensors"
        save_weights(path, ConvNeXtV2(TINY, 3, 0).state_dict(), {})
        Classifier.load(path)


@pytest.mark.slow
def test_predict_with_a_finetuned_run(tmp_path):
    """`fcmae finetune` 2 steps, then predict with its run folder (last.ckpt) and its export: the
    class names are the training folder's."""
    root = labelled_images(tmp_path / "data", classes=3, per_class=4, size=48, val_per_class=1)
    run = tmp_path / "run"
    assert fcmae("finetune", "--config", recipe_path("finetune", "atto"), "--model", json.dumps({"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}),
                 "--data", root, "--input-size", "64", "--batch-size", "4", "--effective-batch", "4",
                 "--epochs", "1", "--max-steps", "2", "--warmup-epochs", "0", "--workers", "0",
                 "--accelerator", "cpu", "--devices", "1", "--precision", "32", "--output", run) == 0
    files = sorted((root / "val").rglob("*.png"))
    results = {}
    for source in (run, run / "classifier.safetensors"):
        out = tmp_path / f"{source.name}.csv"
        assert fcmae("predict", "--checkpoint", source, root / "val", "--output", out, "--workers", "0",
                     "--device", "cpu") == 0
        table = rows(out)
        assert [r["path"] for r in table] == [str(f) for f in files]
        assert {r["class_1"] for r in table} <= {"class0", "class1", "class2"}
        results[source.name] = [(r["class_1"], float(r["prob_1"])) for r in table]
    # the export holds the same raw weights as last.ckpt
    assert [n for n, _ in results["run"]] == [n for n, _ in results["classifier.safetensors"]]
    assert [p for _, p in results["run"]] == pytest.approx([p for _, p in results["classifier.safetensors"]], abs=1e-5)
