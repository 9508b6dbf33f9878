"""Pre-training with the defaults on one's own images: the recipe's warmup fitted to the run
(printed, kept in notes, the same on resume), loader workers from the machine, progress as plain
lines in a log, list flags as typed, and a short real run on generated images whose loss falls
with the defaults where the recipe's 40-epoch warmup keeps it flat."""
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import PRETRAIN_TINY as TINY, parse_pretrain as parse, weights

from fcmae.commands.pretrain import build_parser, fit
from fcmae.data.sources import DemoImages
from fcmae.module import PretrainModule
from fcmae.training import trainer as trainer_module
from fcmae.training.flags import recipe_values
from fcmae.training.pretrain import PretrainTask, fit_warmup
from fcmae.training.run import train
from fcmae.training.trainer import auto_workers


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Runs every test here with one compute thread (tests/conftest.py)."""


def demo_folder(root, n, size=64):
    """n of the demo's procedural images as PNG files: a folder of one's own images."""
    root.mkdir(parents=True, exist_ok=True)
    images = DemoImages(num=n, size=size)
    for i in range(n):
        images[i][0].save(root / f"{i:04d}.png")
    return root


def dry_run(capsys, *args):
    fit(parse(*TINY, "--output", "unused", "--dry-run", *args))
    return yaml.safe_load(capsys.readouterr().out)


# ----------------------------------------------------------------------------- the warmup

def test_the_recipes_warmup_is_fitted_to_a_short_run_and_a_chosen_one_kept():
    notes = []
    assert fit_warmup(1600, 40, 1600, 40, notes) == 40 and notes == []  # the recipe's own length: as is
    assert fit_warmup(100, 40, 1600, 40, notes) == 20 and "warmup 40 epochs -> 20" in notes[-1]
    assert fit_warmup(3, 40, 1600, 40, notes) == pytest.approx(0.6)  # never the whole run: a fifth of it
    notes.clear()
    assert fit_warmup(3, 0.3, 1600, 40, notes) == 0.3 and notes == []  # chosen, shorter than the run: kept
    assert fit_warmup(3, 5, 1600, 40, notes) == 5  # chosen, longer than the run: kept, with a warning
    assert notes[0].startswith("warning: --warmup-epochs 5 is not shorter than the run's 3 epochs")


def test_a_folder_run_prints_its_fitted_warmup_after_the_config(tmp_path, capsys):
    data = demo_folder(tmp_path / "photos", 40, size=48)
    resolved = dry_run(capsys, "--data", str(data), "--epochs", "3")
    assert resolved["warmup_epochs"] == pytest.approx(0.6) and resolved["warmup_steps"] == 6  # 10 steps per epoch
    assert resolved["notes"][0].startswith("warmup 40 epochs -> 0.6: the recipe's 40 of its 1600 epochs")
    fit(parse(*TINY, "--output", str(tmp_path / "run"), "--data", str(data), "--epochs", "3", "--max-steps", "1"))
    out = capsys.readouterr().out
    config = out.index("warmup_steps: 6")
    assert out.index("warmup 40 epochs -> 0.6", config + 1) > config  # one printed line, after the config
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["warmup_epochs"] == pytest.approx(0.6)
    assert dry_run(capsys, "--data", str(data), "--epochs", "3", "--warmup-epochs", "0.25")["warmup_steps"] == 2


def test_the_demo_keeps_its_schedule_and_fits_a_shorter_one(capsys):
    demo = dry_run(capsys)
    assert demo["warmup_epochs"] == 1 and demo["epochs"] == 8 and demo["notes"] == []
    short = dry_run(capsys, "--epochs", "2")
    assert short["warmup_epochs"] == pytest.approx(0.4) and "the recipe's 1 of its 8 epochs" in short["notes"][0]


@pytest.mark.slow
def test_a_resumed_run_gets_the_same_fitted_schedule_and_ends_as_a_straight_one(tmp_path):
    """The recipe's warmup, fitted (0.8 of 4 epochs of 5 steps: 4 steps), is planned again on
    resume: stopping at 3 steps and rerunning to 6 ends with the weights of one straight run."""
    data = ["--data", str(demo_folder(tmp_path / "images", 20, size=48)), "--lr", "1e-3", "--epochs", "4"]
    _, straight = fit(parse(*TINY, *data, "--max-steps", "6", "--output", str(tmp_path / "a")))
    assert straight.hparams.warmup_epochs == pytest.approx(0.8)
    for stop in (3, 6):
        trainer, resumed = fit(parse(*TINY, *data, "--max-steps", str(stop), "--output", str(tmp_path / "b")))
        assert trainer.global_step == stop and resumed.hparams.warmup_epochs == pytest.approx(0.8)
    a, b = weights(straight), weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6  # tolerance: float32 round-off
    torch.manual_seed(0)
    init = weights(PretrainModule(**straight.hparams))
    key = "model.encoder.stages.0.0.pwconv1.weight"
    assert (a[key] - init[key]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- workers

def test_workers_default_to_what_the_machine_has(monkeypatch, capsys):
    cfg = parse("--accelerator", "cpu")
    assert cfg.workers == "auto"
    monkeypatch.setattr(trainer_module, "cores", lambda: 2)
    assert auto_workers(cfg) == 1  # 1 loader process, 1 compute thread
    assert trainer_module.training_threads(1, 1) == 1
    monkeypatch.setattr(trainer_module, "cores", lambda: 16)
    assert auto_workers(cfg) == 8 and trainer_module.training_threads(8, 1) == 8
    assert auto_workers(parse("--accelerator", "cpu", "--devices", "2")) == 4  # per device

    class GPUs:  # what Lightning counts on a node of 8 GPUs
        num_devices, accelerator = 8, object()
    monkeypatch.setattr(trainer_module, "planning_trainer", lambda cfg: GPUs)
    monkeypatch.setattr(trainer_module, "cores", lambda: 96)
    assert auto_workers(cfg) == 11  # 12 cores per GPU, one for its training process
    monkeypatch.setattr(trainer_module, "cores", lambda: 512)
    assert auto_workers(cfg) == trainer_module.MAX_AUTO_WORKERS
    monkeypatch.undo()
    args = [a for a in TINY if a not in ("--workers", "0")]
    resolved = dry_run(capsys, *[a for i, a in enumerate(args) if not (a == "0" and args[i - 1] == "--workers")],
                       "--data", "demo", "--workers", "auto", "--epochs", "8", "--vis-every", "2")
    assert isinstance(resolved["workers"], int) and resolved["workers"] == auto_workers(cfg)
    assert dry_run(capsys, "--workers", "3")["workers"] == 3  # an explicit --workers wins


def test_recipes_do_not_hard_code_loader_workers():
    from importlib.resources import files
    for recipe in files("fcmae.configs").joinpath("pretrain").iterdir():
        if recipe.name.endswith(".yaml"):
            assert yaml.safe_load(recipe.read_text())["workers"] == "auto", recipe.name


# ----------------------------------------------------------------------------- list flags

def test_list_flags_take_words_commas_or_brackets(tmp_path, capsys):
    from fcmae.cli import main
    for form in (["sparse", "dense"], ["sparse,dense"], ["[sparse,dense]"]):
        main(["bench", "--model", "atto", "--input-size", "64", "--batch-size", "1", "--steps", "1", "--warmup", "0",
              "--no-memory", "--backends", *form, "--mask-ratio", "0.5", "0.75", "--json", str(tmp_path / "b.json")])
        rows = yaml.safe_load((tmp_path / "b.json").read_text())["results"]
        assert sorted({(r["backend"], r["mask_ratio"]) for r in rows}) == [
            ("dense", 0.5), ("dense", 0.75), ("sparse", 0.5), ("sparse", 0.75)], form
    capsys.readouterr()
    main(["pretrain", *TINY, "--betas", "0.9", "0.99", "--output", "unused", "--dry-run"])
    assert yaml.safe_load(capsys.readouterr().out)["betas"] == [0.9, 0.99]
    with pytest.raises(SystemExit) as exit:
        main(["bench", "--backends", "sparse", "fast"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--backends: got 'fast', pass one of dense, sparse, minkowski" in err


# ----------------------------------------------------------------------------- progress

def test_progress_in_a_log_is_one_plain_line_per_log_interval(tmp_path):
    """stdout to a file (a scheduler's log): no carriage returns, one line every --log-every
    steps with step, epoch, loss, lr, images/s and time left."""
    log = tmp_path / "log.txt"
    args = [*TINY, "--max-steps", "6", "--log-every", "2", "--epochs", "1", "--output", str(tmp_path / "run")]
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "fcmae.cli", "pretrain", *args], stdout=f,
                              stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0
    text = log.read_text()
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    for line in lines:
        words = line.split()
        assert words[2:4] == ["epoch", "0"] and words[4] == "loss" and 0 < float(words[5]) < 2
        assert words[6] == "lr" and float(words[7]) > 0 and words[9] == "images/s" and words[-1] == "left"


# ----------------------------------------------------------------------------- the defaults, end to end

@pytest.mark.slow
def test_the_recipe_defaults_learn_on_a_short_run_where_the_recipes_warmup_stays_flat(tmp_path):
    """`fcmae pretrain --data DIR --input-size 64 --batch-size 32 --epochs 2` on 1,600 generated
    images (the demo's shapes, as files: 50 steps per epoch, 100 in all), passing nothing else but
    --output and --workers. The recipe's 40-epoch warmup taken as it is (today's schedule: 2,000
    warmup steps) keeps the lr under 1e-6 and the loss where it started; the fitted default
    (0.4 epochs) takes it below, by thirty times as much. About 3 minutes on 2 idle cores. Loss: the model's on one fixed batch (the run's preview
    batch), at the run's initial weights and at its end."""
    data = demo_folder(tmp_path / "photos", 1600, size=64)
    args = ["--data", str(data), "--input-size", "64", "--batch-size", "32", "--epochs", "2", "--workers", "1"]
    losses = {}
    for name in ("default", "unfitted"):
        cfg = parse(*args, "--output", str(tmp_path / name))
        recipe = recipe_values(build_parser(), cfg)
        if name == "unfitted":  # the recipe's warmup taken as the user's choice: kept as it is, as before
            recipe.warmup_epochs = None
        trainer, module = train(PretrainTask(cfg, recipe))
        assert trainer.global_step == 100
        imgs, mask = trainer.datamodule.preview(8)
        torch.manual_seed(0)  # the run's seed: its initial weights
        initial = PretrainModule(**module.hparams)
        losses[name] = [preview_loss(m, imgs, mask) for m in (initial, module)]
    (start, end), (same_start, unfitted_end) = losses["default"], losses["unfitted"]
    assert same_start == start and abs(unfitted_end - start) < 0.005, losses  # flat: measured 1.0093 -> 1.0080
    assert end < start - 0.03 and start - end > 10 * abs(start - unfitted_end), losses  # measured -> 0.9674


@torch.no_grad()
def preview_loss(module, imgs, mask):
    return module.model.eval()(imgs, mask)[0].item()
