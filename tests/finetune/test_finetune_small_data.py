"""Fine-tuning on a small dataset of your own: the recipe fits itself to the data (effective
batch, EMA decay, warmup), --clip-grad, a held-out validation split when there is no val/, the
best checkpoint, the per-class table, confusion.png and curves.png, and a learnability check
against a plain timm + PyTorch loop. Tiny models, 32 px images, a few steps."""
import json

import pytest
import torch
import yaml
from helpers import TINY, labelled_images
from PIL import Image

from fcmae.checkpoints import read_weights
from fcmae.commands.eval import build_parser as eval_parser, evaluate
from fcmae.commands.finetune import DEFAULT_MODEL, build_parser, resolve, train
from fcmae.commands.pretrain import build_parser as pretrain_parser, fit as pretrain_fit
from fcmae.data import labelled as data
from fcmae.errors import UserError
from fcmae.finetune.report import confusion_update, per_class_table
from fcmae.rundir import read_metrics
from fcmae.training import run as runs
from fcmae.training.flags import recipe_path, with_recipe


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Runs every test here with one compute thread (tests/conftest.py)."""


def parse(*args):
    """Like `fcmae finetune ARGS`: the size's recipe first, then the flags."""
    return build_parser().parse_args(with_recipe("finetune", list(args), DEFAULT_MODEL))


RUN = ["--model", json.dumps(TINY), "--input-size", "32", "--workers", "0", "--accelerator", "cpu",
       "--devices", "1", "--precision", "32", "--batch-size", "4", "--aa", "null", "--reprob", "0"]


def finetune(*args):
    """`fcmae finetune` with the atto recipe on the TINY size, 32 px."""
    return train(build_parser().parse_args(["--config", recipe_path("finetune", "atto"), *RUN, *args]))


def is_png(path):
    with Image.open(path) as img:
        return img.format == "PNG" and img.size[0] > 100


# ----------------------------------------------------------------------------- fitting the recipe to the data

def test_steps_per_epoch_count_devices_and_drop_last():
    assert runs.steps_per_epoch(96, 16, 1, 64) == 1  # the example: 6 batches, one step
    assert runs.steps_per_epoch(96, 16, 1, 1) == 6
    assert runs.steps_per_epoch(100, 16, 1, 1) == 6  # the last 4 images are dropped
    assert runs.steps_per_epoch(100, 16, 2, 1) == 3  # 50 per rank: 3 full batches
    assert runs.steps_per_epoch(1152, 16, 1, 4) == 18  # 72 batches, a partial window steps too


def test_recipe_effective_batch_comes_down_until_20_steps_per_epoch():
    rv = resolve(parse("--model", "atto", "--data", "x", "--devices", "1", "--batch-size", "16"), train_images=1152)
    # 72 batches: accumulation 4 would give 18 steps, 3 gives 24
    assert (rv["accumulate"], rv["effective_batch"], rv["steps_per_epoch"]) == (3, 48, 24)
    assert rv["lr"] == pytest.approx(2e-4 * 1024 / 256)  # the recipe's lr, not scaled down with the batch
    assert ("effective batch 1024 -> 48: 1,152 training images give 24 steps per epoch; "
            "pass --effective-batch to choose (lr stays the recipe's 0.0008)") in rv["notes"]
    # the issue's own line: accumulation reaches 1 before 20 steps
    rv = resolve(parse("--model", "atto", "--data", "x", "--devices", "1", "--batch-size", "64"), train_images=1152)
    assert (rv["accumulate"], rv["effective_batch"]) == (1, 64)
    assert ("effective batch 1024 -> 64: 1,152 training images give 18 steps per epoch; "
            "pass --effective-batch to choose (lr stays the recipe's 0.0008)") in rv["notes"]
    # enough data: the recipe stands, nothing printed
    rv = resolve(parse("--model", "atto", "--data", "x", "--devices", "1", "--batch-size", "16"),
                 train_images=1_281_167)
    assert rv["effective_batch"] == 1024 and rv["ema_decay"] == 0.9999 and rv["notes"] == []


@pytest.mark.parametrize("flags", [["--effective-batch", "256"], ["--accumulate", "8"]])
def test_an_explicit_batch_is_kept_with_a_warning(flags):
    rv = resolve(parse("--model", "atto", "--data", "x", "--devices", "1", "--batch-size", "32", *flags),
                 train_images=2000)
    assert rv["effective_batch"] == 256 and rv["steps_per_epoch"] == 8 and rv["lr"] == pytest.approx(2e-4)
    err = "\n".join(rv["notes"])
    assert "warning: 2,000 training images give 8 optimizer steps per epoch (fewer than 20)" in err
    assert "effective batch 1024 ->" not in err


def test_short_runs_get_an_ema_that_fits_and_explicit_decays_a_warning():
    rv = resolve(parse("--model", "atto", "--data", "x", "--devices", "1", "--batch-size", "16", "--epochs", "6"),
                 train_images=96)
    assert rv["total_steps"] == 36 and rv["ema_decay"] == 0.7222  # 1 - 10/36, rounded down
    assert any(n.startswith("EMA decay 0.9999 -> 0.7222: this run has 36 optimizer steps") for n in rv["notes"])
    rv = resolve(parse("--model", "atto", "--data", "x", "--devices", "1", "--batch-size", "16", "--epochs", "6",
                       "--ema-decay", "0.99"), train_images=96)
    assert rv["ema_decay"] == 0.99
    assert rv["notes"][-1].startswith("warning: --ema-decay 0.99") and rv["notes"][-1].endswith("--ema-decay 0.7222 fits")
    # --max-steps shortens the run the EMA has to fit
    rv = resolve(parse("--model", "atto", "--data", "x", "--devices", "1", "--batch-size", "16", "--epochs", "6",
                       "--max-steps", "20"), train_images=96)
    assert rv["total_steps"] == 20 and rv["ema_decay"] == 0.5
    rv = resolve(parse("--model", "atto", "--data", "x", "--devices", "1", "--batch-size", "16", "--epochs", "6",
                       "--max-steps", "2"), train_images=96)
    assert rv["ema_decay"] == 0.5  # never 0, which would turn the EMA off


def test_warmup_longer_than_the_run_is_clamped():
    rv = resolve(parse("--model", "base", "--data", "x", "--devices", "1", "--batch-size", "16", "--epochs", "5"),
                 train_images=5000)
    assert rv["warmup_epochs"] == 1.0  # the recipe's 20 of a 5-epoch run: a fifth of it
    assert rv["notes"][-1].startswith("warmup 20 epochs -> 1: the run has 5 epochs")
    rv = resolve(parse("--model", "base", "--data", "x", "--devices", "1", "--epochs", "30"), train_images=5000)
    assert rv["warmup_epochs"] == 20


def test_pretrain_warns_about_few_steps_per_epoch(tmp_path, capsys):
    folder = tmp_path / "unlabelled"
    labelled_images(folder, classes=1, per_class=24, size=64)
    pretrain_fit(pretrain_parser().parse_args(with_recipe("pretrain", [
        "--model", "atto", "--data", str(folder / "train"), "--input-size", "64", "--batch-size", "4",
        "--accumulate", "2", "--accelerator", "cpu", "--devices", "1", "--output", str(tmp_path / "pt"),
        "--dry-run"], "atto")))
    printed = yaml.safe_load(capsys.readouterr().out)  # --dry-run: the notes are in the YAML
    assert printed["notes"][0].startswith("warning: 24 training images give 3 optimizer steps per epoch (fewer than 20)")
    assert printed["notes"][0].endswith("lower --accumulate or --batch-size")


@pytest.mark.parametrize("flags, message", [
    (["--val-split", "1"], "--val-split 1.0: pass a fraction in"),
    (["--clip-grad", "0"], "--clip-grad 0.0: pass a positive norm"),
])
def test_bad_small_data_flags_are_one_line(flags, message):
    with pytest.raises(UserError, match=message):
        resolve(parse("--model", "atto", "--data", "x", *flags))


# ----------------------------------------------------------------------------- validation split

def test_held_out_split_is_stratified_listed_and_reused(tmp_path):
    labelled_images(tmp_path / "d", classes=3, per_class=10, size=32)
    ds = data.image_folder(tmp_path / "d", "train", None)
    listed = tmp_path / "run" / "val_split.txt"
    kept, held = data.held_out_split(ds, 0.2, seed=0, list_file=listed)
    assert sorted(kept + held) == list(range(30))
    assert [int(ds.targets[i]) for i in held].count(0) == 2  # 2 of each class's 10
    data.write_split(listed, ds, held)
    names = listed.read_text().splitlines()
    assert len(names) == 6 and all(n.startswith("class") for n in names)
    # a resumed run holds out the listed files, whatever the fraction or seed now says
    assert data.held_out_split(ds, 0.5, seed=3, list_file=listed) == (kept, held)
    (tmp_path / "d" / "train" / names[0]).unlink()
    ds = data.image_folder(tmp_path / "d", "train", None)
    with pytest.raises(UserError, match=f"holds out 1 file.* no longer in .*e.g. {names[0]}.*--no-resume"):
        data.held_out_split(ds, 0.2, seed=0, list_file=listed)


def test_a_class_with_one_image_is_refused_by_name(tmp_path):
    labelled_images(tmp_path / "d", classes=3, per_class=6, size=32)
    for f in sorted((tmp_path / "d" / "train" / "class1").iterdir())[1:]:
        f.unlink()
    with pytest.raises(UserError, match=r"class class1 has fewer than 2 images.*--val-split 0"):
        finetune("--data", str(tmp_path / "d"), "--output", str(tmp_path / "run"), "--epochs", "1")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """2 epochs on 3 classes x 12 images without val/: 10% (one image a class) held out."""
    root = tmp_path_factory.mktemp("small")
    labelled_images(root / "d", classes=3, per_class=12, size=32)
    out = root / "run"
    result = finetune("--data", str(root / "d"), "--output", str(out), "--epochs", "2", "--clip-grad", "1.0",
                      "--lr", "2e-3", "--log-every", "1")
    return root, result


def test_no_val_folder_holds_out_a_listed_split(small_run):
    root, result = small_run
    out = result["output"]
    held = (out / "val_split.txt").read_text().splitlines()
    assert sorted(h.split("/")[0] for h in held) == ["class0", "class1", "class2"]
    assert all(row["top1"] is not None and row["ema_top1"] is not None for row in result["history"])
    assert result["module"].trainer.gradient_clip_val == 1.0  # --clip-grad reaches Lightning
    assert result["module"].trainer.global_step == 2 * 8  # 33 train images, batch 4: 8 steps an epoch


def test_best_checkpoint_is_the_best_top1_raw_or_ema(small_run):
    root, result = small_run
    out, history = result["output"], result["history"]
    best = result["best"]
    scores = [(row["top1"], False, row["epoch"]) for row in history] + \
             [(row["ema_top1"], True, row["epoch"]) for row in history]
    top = max(s[0] for s in scores)
    assert best["top1"] == pytest.approx(top)
    assert (best["top1"], best["ema"], best["epoch"]) in [s for s in scores if s[0] == top]
    assert (out / "checkpoints" / "best.ckpt").is_file()
    weights = read_weights(out / "classifier_best.safetensors", trust=False)
    assert weights.meta["top1"] == pytest.approx(best["top1"]) and weights.meta["ema"] == best["ema"]
    assert weights.classes == ["class0", "class1", "class2"]  # class names in every export and checkpoint
    for name in ("classifier.safetensors", "classifier_ema.safetensors", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt"):
        assert read_weights(out / name, trust=False).classes == ["class0", "class1", "class2"], name
    # eval on the held-out images gives the recorded best
    args = ["--checkpoint", str(out / "classifier_best.safetensors"), "--data", str(root / "d"), "--workers", "0",
            "--accelerator", "cpu", "--precision", "32"]
    # the held-out images alone, as a bare class-folder tree
    for line in (out / "val_split.txt").read_text().splitlines():
        target = root / "heldout" / line
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((root / "d" / "train" / line).read_bytes())
    args[3] = str(root / "heldout")
    assert evaluate(eval_parser().parse_args(args))["top1"] == pytest.approx(best["top1"])


def test_pictures_and_table_at_the_end(small_run, capsys):
    root, result = small_run
    out = result["output"]
    assert is_png(out / "curves.png") and is_png(out / "confusion.png")
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["train_loss"] > 0 and r["val_loss"] > 0 and r["lr"] > 0 for r in rows)


def test_resume_reuses_the_split(small_run, capsys):
    root, result = small_run
    out = result["output"]
    before = (out / "val_split.txt").read_text()
    again = finetune("--data", str(root / "d"), "--output", str(out), "--epochs", "3", "--clip-grad", "1.0",
                     "--lr", "2e-3", "--val-split", "0.3")
    assert "reusing the 3 of 36 train/ images" in capsys.readouterr().out
    assert (out / "val_split.txt").read_text() == before
    assert [row["epoch"] for row in again["history"]] == [2]
    assert again["best"]["top1"] >= result["best"]["top1"]  # the best so far survives the resume


def test_val_split_0_trains_on_everything_without_validation(tmp_path, capsys):
    labelled_images(tmp_path / "d", classes=2, per_class=8, size=32)
    result = finetune("--data", str(tmp_path / "d"), "--output", str(tmp_path / "run"), "--epochs", "2",
                      "--val-split", "0")
    out = result["output"]
    assert result["module"].trainer.global_step == 2 * 4  # all 16 images, batch 4
    assert all(row["top1"] is None and row["train_loss"] > 0 for row in result["history"])
    assert result["best"] is None and not (out / "val_split.txt").exists() and not (out / "confusion.png").exists()
    printed = capsys.readouterr().out
    assert "best.ckpt and classifier_best.safetensors are the last weights" in printed
    # the fitted plan is printed as one line (after the configuration)
    assert "\neffective batch 1024 -> 4: 16 training images give 4 steps per epoch; pass --effective-batch" in printed
    best, last = (read_weights(out / n, trust=False) for n in ("classifier_best.safetensors", "classifier.safetensors"))
    assert all(torch.equal(best.state[k], last.state[k]) for k in last.state)
    assert (out / "checkpoints" / "best.ckpt").is_file() and is_png(out / "curves.png")


# ----------------------------------------------------------------------------- tables and fcmae eval

def test_confusion_and_per_class_table():
    cm = torch.zeros(3, 3, dtype=torch.int64)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])
    confusion_update(cm, logits, torch.tensor([0, 1, 1, 2]))
    assert cm.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    table = per_class_table(cm, ["cat", "dog", "eel"])
    assert "dog            2   50.0" in table and "all            4   75.0" in table


def test_eval_prints_the_table_and_saves_the_confusion_png(small_run, capsys, tmp_path):
    root, result = small_run
    ckpt = result["output"] / "checkpoints" / "last.ckpt"
    got = evaluate(eval_parser().parse_args(["--checkpoint", str(ckpt), "--data", str(root / "d" / "train"),
                                             "--workers", "0", "--accelerator", "cpu", "--precision", "32"]))
    assert got["confusion"].sum() == 36 and got["confusion"].diag().sum() == round(got["top1"] * 36 / 100)
    printed = capsys.readouterr().out
    assert "class0" in printed and "confusion (rows: true class" in printed
    assert is_png(ckpt.with_name("last_confusion.png"))
    evaluate(eval_parser().parse_args(["--checkpoint", str(ckpt), "--data", str(root / "d" / "train"), "--workers",
                                       "0", "--accelerator", "cpu", "--confusion", str(tmp_path / "cm.png")]))
    assert is_png(tmp_path / "cm.png")


# ----------------------------------------------------------------------------- learnability

LEARN_STEPS = 90  # the budget, in optimizer steps: 15 epochs of 100 images at batch 16 (drop_last: 6 an epoch)


def plain_loop(root, steps, batch_size=16):
    """Best val top-1 of a plain timm + PyTorch loop: atto from scratch, AdamW at its default lr,
    no augmentation, evaluated once per epoch."""
    import timm
    from torchvision import datasets, transforms
    torch.manual_seed(0)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    train_set, val_set = (datasets.ImageFolder(root / split, tf) for split in ("train", "val"))
    model = timm.create_model("convnextv2_atto", num_classes=len(train_set.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(train_set, batch_size, shuffle=True, drop_last=True)
    done, best = 0, 0.0
    while done < steps:
        model.train()
        for x, y in loader:  # x: (B, 3, 32, 32)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in torch.utils.data.DataLoader(val_set, 64))
        best = max(best, 100 * hits / len(val_set))
    return best


@pytest.mark.slow
def test_recipe_defaults_learn_what_a_plain_loop_learns_in_the_same_budget(tmp_path):
    """5 classes x 20 images (coloured shapes, 32 px) with val/: the plain loop passes 90% within
    90 steps; `fcmae finetune` given only data, size, batch and epochs (the atto recipe: its
    augmentation, layer decay, weight decay, smoothing, EMA) must too. Before the recipe fitted
    itself to the data it made 1 step per epoch (15 in all) and stayed below (84% in 10 epochs), as it
    does with the lr scaled down with the batch (68%)."""
    root = labelled_images(tmp_path / "d", classes=5, per_class=20, size=32, val_per_class=10)
    plain = plain_loop(root, LEARN_STEPS)
    print(f"plain loop: best val top-1 {plain:.1f}")
    assert plain >= 90
    result = train(build_parser().parse_args(with_recipe("finetune", [
        "--model", "atto", "--data", str(root), "--input-size", "32", "--batch-size", "16", "--epochs", "15",
        "--workers", "0", "--accelerator", "cpu", "--devices", "1", "--output", str(tmp_path / "run")], "atto")))
    assert result["module"].trainer.global_step == LEARN_STEPS
    assert result["best"]["top1"] >= 90
