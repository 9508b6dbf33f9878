"""`fcmae segment` end to end on a tiny generated set: what the run directory holds (metrics rows with
mIoU, TensorBoard scalars, the best and last segmenters, curves.png, predictions.png, the
per-class table), `fcmae eval`, `predict` and `export` of the run, an exact resume, mixed
precision, pre-trained encoders, and bad pairs skipped and named (or fatal with --strict-data)."""
import csv
import json

import numpy as np
import pytest
import torch
from helpers import segment_args, segment_small, segmentation_images, weights
from PIL import Image
from safetensors import safe_open

from fcmae.checkpoints import read_segmenter, read_weights
from fcmae.cli import main

pytestmark = pytest.mark.slow
CLASSES = ["background", "disc", "square", "triangle"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One compute thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return segmentation_images(tmp_path_factory.mktemp("seg"), train=8, val=3, size=64, classes=4)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "run"
    result = segment_small("--data", data, "--output", out, "--iterations", 6, "--eval-every", 3)
    return result


def fcmae(*argv):
    """`fcmae ARGV` in this process -> exit code."""
    try:
        return main([str(a) for a in argv]) or 0
    except SystemExit as e:
        return e.code


def test_the_run_directory_holds_every_result(run):
    out = run["output"]
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "predictions.png", "per_class.txt",
                 "segmenter.safetensors", "segmenter_best.safetensors", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and [r["step"] for r in run["history"]] == [3, 6]
    for row in rows:
        assert {"mIoU", "mAcc", "aAcc", "train_loss", "lr"} <= set(row)
        assert {f"IoU/{c}" for c in CLASSES} | {f"Acc/{c}" for c in CLASSES} <= set(row)
        assert 0 <= row["mIoU"] <= 100 and row["train_loss"] > 0
    best = max(rows, key=lambda r: r["mIoU"])
    assert run["best"]["mIoU"] == pytest.approx(best["mIoU"]) and run["best"]["step"] == best["step"]
    with safe_open(out / "segmenter_best.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["mIoU"]) == pytest.approx(best["mIoU"]) and json.loads(meta["classes"]) == CLASSES
    table = (out / "per_class.txt").read_text().splitlines()
    assert [line.split()[0] for line in table[1:5]] == CLASSES and table[-1].startswith(f"mIoU {best['mIoU']:.2f}")
    for png in ("curves.png", "predictions.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG"
    assert read_weights(out / "checkpoints" / "last.ckpt").kind == "segment-checkpoint"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_tensorboard_has_the_scores(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run["output"] / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/mIoU", "val/mAcc", "val/aAcc", "train/loss", "lr"} <= tags
    assert any(t.startswith("val/IoU/") for t in tags)
    assert [e.value for e in events.Scalars("val/mIoU")] == pytest.approx([r["mIoU"] for r in run["history"]])


@pytest.mark.parametrize("which", ["segmenter.safetensors", "checkpoints/last.ckpt"])
def test_eval_reports_the_last_validation(run, data, capsys, which):
    from fcmae.commands.eval import build_parser, evaluate
    capsys.readouterr()
    workers = ["--workers", "0"] if which.endswith(".safetensors") else []  # the default: auto
    scores = evaluate(build_parser().parse_args(["--checkpoint", str(run["output"] / which), "--data", str(data),
                                                 "--accelerator", "cpu", "--precision", "32", *workers]))
    last = run["history"][-1]
    assert scores["images"] == 3 and abs(scores["mIoU"] - last["mIoU"]) <= 1e-6
    assert abs(scores["aAcc"] - last["aAcc"]) <= 1e-6
    assert [v if v == v else None for v in scores["IoU"]] == pytest.approx([last[f"IoU/{c}"] for c in CLASSES])
    out = capsys.readouterr().out
    assert f"mIoU {last['mIoU']:.2f}" in out and "triangle" in out


def test_predict_writes_a_label_map_and_an_overlay_per_image_and_a_csv(run, data, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.open(data / "val" / "images" / "val_000.png").resize((80, 48)).save(inputs / "wide.png")
    Image.open(data / "val" / "images" / "val_001.png").save(inputs / "same.png")
    (inputs / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "masks"
    code = fcmae("predict", "--checkpoint", run["output"] / "segmenter.safetensors", inputs, "--output", out,
                 "--device", "cpu")
    assert code == 1  # one file could not be read
    with Image.open(out / "wide.png") as labels:
        assert labels.mode == "P" and labels.size == (80, 48)  # the input's own size
        assert int(np.asarray(labels).max()) < 4
    with Image.open(out / "wide_overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == (80, 48)
    with open(out / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["path", "label_map", *CLASSES, "error"]
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in table}
    assert rows["broken.jpg"]["error"] and rows["broken.jpg"]["label_map"] == ""
    counts = np.bincount(np.asarray(Image.open(out / "wide.png")).flatten(), minlength=4) / (80 * 48)
    assert [float(rows["wide.png"][c]) for c in CLASSES] == pytest.approx(counts.tolist(), abs=1e-6)
    from fcmae import Segmenter
    seg = Segmenter.load(run["output"] / "segmenter.safetensors", device="cpu")
    expected = seg.predict(inputs / "same.png").labels  # the Python API gives the same label map
    assert np.array_equal(np.asarray(Image.open(out / "same.png")), expected.numpy())


def test_export_of_the_run_is_the_whole_segmenter(run, tmp_path):
    path = tmp_path / "exported.safetensors"
    assert fcmae("export", run["output"], "--output", path) == 0
    state, meta = read_segmenter(path)
    ours, _ = read_segmenter(run["output"] / "segmenter.safetensors")
    assert set(state) == set(ours) and all(torch.equal(state[k], ours[k]) for k in ours)
    assert (meta["classes"], meta["in_chans"], meta["input_size"], meta["scale"], meta["steps"]) == \
        (CLASSES, 3, 64, [256, 64], 6)
    assert meta["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406]) and len(meta["palette"]) == 4
    assert read_weights(path).kind == "segmenter"


def test_resume_matches_a_straight_run_on_weights(data, tmp_path):
    """N steps, then the same command to 2N, against 2N straight (validating at N in between)."""
    go = lambda out, *args: segment_small("--data", data, "--output", tmp_path / out, "--iterations", 6,  # noqa: E731
                                          "--eval-every", 100, "--drop-path", 0.1, "--lr", 1e-2,
                                          *args)["module"]
    straight = weights(go("a"))
    first = weights(go("b", "--max-steps", 3))
    resumed = go("b")
    assert resumed.trainer.global_step == 6
    b = weights(resumed)
    floats = [k for k in straight if straight[k].is_floating_point()]
    assert max((straight[k] - first[k]).abs().max().item() for k in floats) > 1e-3  # steps N+1..2N move the weights
    assert max((straight[k] - b[k]).abs().max().item() for k in floats) <= 1e-6  # float32 round-off


@pytest.mark.parametrize("precision", ["bf16-mixed"])
def test_mixed_precision_trains(data, tmp_path, precision):
    result = segment_small("--data", data, "--output", tmp_path / "run", "--iterations", 2, "--eval-every", 2,
                           "--precision", precision)
    assert result["module"].trainer.precision == precision
    assert np.isfinite(result["history"][-1]["train_loss"]) and result["history"][-1]["mIoU"] >= 0


def test_pretrained_encoder_goes_into_the_segmenter(run, data, tmp_path, capsys):
    source = run["output"] / "segmenter.safetensors"  # a segmentation export is an encoder too
    module = segment_small("--data", data, "--output", tmp_path / "run", "--iterations", 1, "--lr", 0,
                           "--pretrained", source)["module"]
    out = capsys.readouterr().out
    assert f"loaded the encoder's " in out and "(fcmae segmenter export)" in out
    ours, _ = read_segmenter(source)
    got = module.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ours.items() if k.startswith("encoder."))  # lr 0: unchanged


def test_bad_pairs_are_skipped_and_named_or_stop_the_run_with_strict_data(tmp_path, capsys):
    data = segmentation_images(tmp_path / "d", train=6, val=2, size=64, classes=4)
    Image.new("L", (32, 64), 1).save(data / "train" / "masks" / "train_001.png")  # its image is 64 wide
    Image.new("L", (64, 64), 9).save(data / "train" / "masks" / "train_003.png")  # label 9 of 4 classes
    result = segment_small("--data", data, "--output", tmp_path / "run", "--iterations", 3, "--eval-every", 3)
    skipped = (tmp_path / "run" / "skipped_files.txt").read_text()
    assert "train_001.png (mask of 32x64 pixels" in skipped and "save each mask at its image's size" in skipped
    assert "train_003.png (label 9, but there are 4 classes" in skipped and result["module"].trainer.global_step == 3
    capsys.readouterr()
    code = fcmae(*segment_args("--data", data, "--output", tmp_path / "strict", "--iterations", 3, "--strict-data"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fcmae: error: unreadable file ") and "train/masks/train_00" in line
    assert line.endswith("fix or remove it, or drop --strict-data to skip bad files with a warning")
