"""End-to-end `fcmae finetune` / `fcmae eval` on CPU: a tiny ConvNeXt V2 on 64x64 colored shapes
(3 classes, 96 train / 24 val images), a few epochs each."""
import json

import pytest
import torch
from helpers import SMALL, finetune_small as finetune, randomize_, shapes_dataset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcmae import FCMAE
from fcmae.commands.eval import build_parser as eval_parser, evaluate

pytestmark = pytest.mark.slow

EPOCHS = 8


def evaluate_file(path, data, *args):
    return evaluate(eval_parser().parse_args(["--checkpoint", str(path), "--data", str(data), "--workers", "0",
                                              "--accelerator", "cpu", "--precision", "32", *args]))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def finetuned(shapes, tmp_path_factory):
    """The atto recipe (label smoothing, layer decay 0.9, weight decay 0.3, drop path, EMA) on a
    short schedule: a higher lr, 1 warmup epoch, EMA decay 0.9 for so few steps, and without
    RandAugment and random erasing, which make 48 steps too noisy a read (the resume test below
    runs them, with Mixup and CutMix)."""
    out = tmp_path_factory.mktemp("run") / "ft"
    return finetune("--data", str(shapes), "--output", str(out), "--epochs", str(EPOCHS), "--lr", "4e-3",
                    "--warmup-epochs", "1", "--smoothing", "0.1", "--ema-decay", "0.9", "--aa", "null", "--reprob", "0")


def test_a_short_run_learns_the_easy_task(finetuned):
    history = finetuned["history"]
    assert [row["epoch"] for row in history] == list(range(EPOCHS))
    for row in history:  # raw and EMA, top-1 and top-5, every epoch
        assert all(row[k] is not None for k in ("top1", "top5", "ema_top1", "ema_top5"))
    chance = 100 / 3
    assert history[-1]["top1"] >= 2 * chance and history[-1]["ema_top1"] >= 2 * chance
    assert history[-1]["top5"] == 100.0  # 3 classes: top-5 is every class
    lines = (finetuned["output"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history


def test_run_directory_and_tensorboard(finetuned):
    out = finetuned["output"]
    for name in ("checkpoints/last.ckpt", "classifier.safetensors", "classifier_ema.safetensors", "config.yaml"):
        assert (out / name).is_file(), name
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "lr", "val/top1", "val/top5", "val_ema/top1", "val_ema/top5"} <= tags
    assert len(events.Scalars("val_ema/top1")) == EPOCHS


def test_layer_decayed_lr_follows_the_schedule(finetuned):
    optimizer = finetuned["module"].trainer.optimizers[0]
    base = {round(g["lr"] / g["lr_scale"], 12) for g in optimizer.param_groups}
    assert len(base) == 1  # every group at the same point of the schedule, times its own scale
    assert max(g["lr_scale"] for g in optimizer.param_groups) == 1.0
    assert min(g["lr_scale"] for g in optimizer.param_groups) == pytest.approx(0.9 ** 4)  # 4 blocks, stem = block 1


def test_eval_gives_the_last_epochs_accuracy(finetuned, shapes):
    last, out = finetuned["history"][-1], finetuned["output"]
    raw = evaluate_file(out / "checkpoints" / "last.ckpt", shapes)
    assert raw["top1"] == pytest.approx(last["top1"]) and raw["top5"] == pytest.approx(last["top5"])
    assert evaluate_file(out / "checkpoints" / "last.ckpt", shapes, "--ema")["top1"] == pytest.approx(last["ema_top1"])
    assert evaluate_file(out / "classifier.safetensors", shapes)["top1"] == pytest.approx(last["top1"])
    assert evaluate_file(out / "classifier_ema.safetensors", shapes)["top1"] == pytest.approx(last["ema_top1"])


def test_rerunning_resumes_from_last_ckpt(finetuned, shapes, capsys):
    # Last in this file: it extends the run directory the tests above read. The extra epoch runs
    # the base recipe's augmentation: RandAugment, random erasing, Mixup + CutMix (soft targets).
    result = finetune("--data", str(shapes), "--output", str(finetuned["output"]), "--epochs", str(EPOCHS + 1),
                      "--lr", "4e-3", "--warmup-epochs", "1", "--smoothing", "0.1", "--ema-decay", "0.9",
                      "--mixup", "0.8", "--cutmix", "1.0")
    assert "resuming from" in capsys.readouterr().out
    assert [row["epoch"] for row in result["history"]] == [EPOCHS]
    assert result["module"].trainer.global_step == (EPOCHS + 1) * 6  # 96 images / 16 per step


def test_linear_probe_leaves_the_encoder_unchanged(shapes, tmp_path):
    torch.manual_seed(0)
    fcmae = randomize_(FCMAE(model=SMALL, img_size=64, decoder_dim=16))
    ckpt = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in fcmae.state_dict().items()}}, ckpt)
    out = tmp_path / "probe"
    result = finetune("--data", str(shapes), "--output", str(out), "--pretrained", str(ckpt), "--linear-probe",
                      "--probe.epochs", "2", "--probe.warmup-epochs", "0")
    model = result["module"].model
    for k, v in fcmae.encoder.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model.norm.weight, torch.ones(64)) and torch.equal(model.norm.bias, torch.zeros(64))
    assert result["module"].feature_bn.num_batches_tracked == 12  # the probe did train: 2 epochs x 6 steps
    assert result["module"].model_ema is None
    # Evaluating the checkpoint or the export (BatchNorm folded into the head) gives the run's own numbers.
    last = result["history"][-1]
    assert evaluate_file(out / "checkpoints" / "last.ckpt", shapes)["top1"] == pytest.approx(last["top1"])
    assert evaluate_file(out / "classifier.safetensors", shapes)["top1"] == pytest.approx(last["top1"])
