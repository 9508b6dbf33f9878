"""`fcmae segment` before training: the recipe read first, the resolved configuration printed (and
--dry-run stopping there), the recipe fitted to a short run with one note line per change, the
length in iterations or epochs, and bad flags and bad data as one line with exit code 2. Fast: no
training step (tests/segment/test_segment_run.py trains)."""
import json

import pytest
import yaml
from helpers import TINY, run_fcmae, segment_args, segmentation_images
from PIL import Image



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return segmentation_images(tmp_path_factory.mktemp("seg"), train=8, val=2, size=64, classes=4)


def fcmae(capsys, *argv):
    return run_fcmae(capsys, *argv)


def dry_run(capsys, data, tmp_path, *args):
    code, out, err = fcmae(capsys, *segment_args("--data", data, "--output", tmp_path / "run", "--dry-run", *args))
    assert code == 0, err
    return yaml.safe_load(out), out


def test_the_recipe_is_read_first_and_fitted_to_a_short_run(capsys, data, tmp_path):
    resolved, out = dry_run(capsys, data, tmp_path, "--iterations", "200")
    assert (resolved["lr"], resolved["weight_decay"], resolved["layer_decay"], resolved["aux_weight"]) == \
        (1e-4, 0.05, 0.9, 0.4)  # the recipe's
    assert resolved["model"] == TINY and resolved["drop_path"] == 0.1  # flags over the recipe
    assert resolved["scale"] == [256, 64] and resolved["eval_window"] == [64, 42]  # from --input-size 64
    assert (resolved["iterations"], resolved["total_steps"], resolved["warmup_iterations"], resolved["eval_every"]) \
        == (200, 200, 2, 20)  # 1500 / 160k of the run; 10 validations
    assert resolved["notes"] == [
        "warmup 1,500 iterations -> 2: the recipe's share of its 160,000 iterations, for this run's 200; pass "
        "--warmup-iterations to choose",
        "evaluation every 16,000 iterations -> 20: the recipe's 10 validations in this run's 200 iterations; pass "
        "--eval-every to choose"]
    assert (resolved["effective_batch"], resolved["accumulate"], resolved["steps_per_epoch"], resolved["epochs"]) == \
        (2, 1, 4, 50)  # 8 images, batches of 2
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_values_the_user_passes_are_kept(capsys, data, tmp_path):
    resolved, _ = dry_run(capsys, data, tmp_path, "--iterations", "200", "--warmup-iterations", "300",
                          "--eval-every", "50", "--scale", "[128, 32]", "--eval-mode", "whole")
    assert (resolved["warmup_iterations"], resolved["eval_every"], resolved["scale"]) == (300, 50, [128, 32])
    assert resolved["notes"] == ["warning: --warmup-iterations 300 is the whole run of 200 iterations: the lr never "
                                 "leaves the warmup; pass fewer"]


def test_the_length_in_epochs(capsys, data, tmp_path):
    resolved, _ = dry_run(capsys, data, tmp_path, "--epochs", "3", "--effective-batch", "4")
    assert (resolved["accumulate"], resolved["steps_per_epoch"], resolved["iterations"], resolved["epochs"]) == \
        (2, 2, 6, 3)  # 8 images = 4 batches of 2 = 2 steps of 4 per epoch
    assert resolved["notes"][0] == ("--epochs 3: 2 optimizer steps per epoch (8 training images at an effective "
                                    "batch of 4) give 6 iterations")


def test_without_val_a_seeded_share_is_held_out(capsys, tmp_path):
    data = segmentation_images(tmp_path / "noval", train=10, val=0, size=64, classes=4, names=False)
    resolved, _ = dry_run(capsys, data, tmp_path, "--iterations", "10", "--val-split", "0.2")
    assert resolved["notes"][0].startswith(f"no {data}/classes.txt: ") and "found in 10 masks" in resolved["notes"][0]
    assert resolved["notes"][1].startswith(f"no validation pairs in {data}: holding out 2 of 10 training images")


@pytest.mark.parametrize("args, message", [
    (["--iterations", "100", "--epochs", "3"], "--iterations 100 and --epochs 3: the length is one or the other"),
    (["--batch-size", "1"], "--batch-size 1: UperNet's pyramid pooling normalizes over the images of a batch"),
    (["--input-size", "50"], "--input-size 50 is not a multiple of 32: pass e.g. 512"),
    (["--layer-decay-type", "group"], "--layer-decay-type group is the release's grouping for depths"),
    (["--eval-window", "[32, 64]"], "--eval-window [32, 64]: pass [crop, stride] with 0 < stride <= crop"),
    (["--val-split", "1.5"], "--val-split 1.5: pass a fraction in [0, 1)"),
    (["--pretrained", "/nonexistent.safetensors"], "--pretrained /nonexistent.safetensors: no such file"),
    (["--in-chans", "5"], "--in-chans 5 needs .npy arrays (5, H, W), but "),
    (["--eval-mode", "grid"], "--eval-mode: got 'grid', pass one of slide, whole"),
])
def test_bad_flags_are_one_line(capsys, data, tmp_path, args, message):
    code, _, err = fcmae(capsys, *segment_args("--data", data, "--output", tmp_path / "run", *args))
    assert code == 2 and "Traceback" not in err and message in err.strip().splitlines()[-1], err


def test_an_image_without_its_mask_is_one_line_naming_it(capsys, tmp_path):
    data = segmentation_images(tmp_path / "d", train=4, val=2, size=64, classes=4)
    (data / "train" / "masks" / "train_002.png").unlink()
    code, _, err = fcmae(capsys, *segment_args("--data", data, "--output", tmp_path / "run", "--iterations", "2"))
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert line == (f"fcmae: error: --data {data}: 1 of 4 images in {data}/train/images have no mask: "
                    f"{data}/train/images/train_002.png has no {data}/train/masks/train_002.png: add the masks (the "
                    f"image's stem + .png), or move those images out")
    assert not (tmp_path / "run").exists()


def test_no_data_layout_is_one_line(capsys, tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    code, _, err = fcmae(capsys, *segment_args("--data", tmp_path / "flat", "--output", tmp_path / "run"))
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"fcmae: error: --data {tmp_path / 'flat'}: {tmp_path / 'flat'} holds neither train/images/ with "
        f"train/masks/ nor ADE20K's images/training/ with annotations/training/")


def test_registered_with_its_recipes(capsys):
    from fcmae.cli import COMMANDS, RECIPE_COMMANDS
    assert "segment" in COMMANDS and "segment" in RECIPE_COMMANDS
    code, out, _ = fcmae(capsys, "segment", "--help")
    assert code == 0 and "--reduce-zero-label" in out and "--tta" in out and json.dumps(TINY) not in out
