"""fcmae.training (flags, trainer): the flags every training command shares, and the device count Lightning gives."""
import pytest

from fcmae.commands.finetune import build_parser as finetune_parser, resolve as finetune_resolve
from fcmae.commands.pretrain import build_parser as pretrain_parser
from fcmae.errors import UserError
from fcmae.training.flags import with_recipe
from fcmae.training.trainer import world_size

SHARED = ("accelerator", "devices", "num_nodes", "precision", "workers", "channels_last", "output", "resume", "no_resume",
          "trust_checkpoint", "log_every", "dry_run", "batch_size", "epochs", "max_steps", "blr", "lr", "min_lr",
          "warmup_epochs", "weight_decay", "seed")


def test_training_commands_share_their_run_flags():
    pretrain = pretrain_parser().parse_args(["--trust-checkpoint"])
    finetune = finetune_parser().parse_args([])
    for name in SHARED:
        assert name in pretrain and name in finetune, name
    assert pretrain.trust_checkpoint is True and finetune.trust_checkpoint is False
    assert "strategy" in pretrain and "strategy" not in finetune  # fine-tuning has no FSDP path


@pytest.mark.parametrize("devices, nodes, world", [(1, 1, 1), (2, 3, 6)])
def test_world_size_is_lightnings_count(devices, nodes, world):
    args = ["--accelerator", "cpu", "--devices", str(devices), "--num-nodes", str(nodes)]
    assert world_size(finetune_parser().parse_args(args)) == world
    # and fine-tuning plans its accumulation on it: 1024 images per step from 16 per device
    rv = finetune_resolve(finetune_parser().parse_args(with_recipe("finetune", [
        "--model", "atto", "--data", "x", "--batch-size", "16", "--effective-batch", str(16 * 6 * 2), *args],
        "base")))
    assert rv["world_size"] == world and rv["accumulate"] * 16 * world == rv["effective_batch"] == 192


def test_devices_lightning_refuses_are_one_line():
    cfg = finetune_parser().parse_args(["--accelerator", "cpu", "--devices", "0,1"])  # CPUs are counted, not listed
    with pytest.raises(UserError, match=r"^--accelerator cpu --devices 0,1 --num-nodes 1: .*int > 0"):
        world_size(cfg)


def test_training_commands_cache_their_file_listings(tmp_path, one_thread):
    """Pre-training's folder and fine-tuning's train/ and val/ are listed once: the listings land
    in the cache (fcmae.data.filelist.default_cache, a temporary one in tests) and are read back."""
    import json
    import os
    import time

    from helpers import labelled_images

    from fcmae.commands.finetune import train
    from fcmae.data.filelist import default_cache
    from fcmae.data.modules import PretrainData
    data = labelled_images(tmp_path / "data", classes=2, per_class=4, size=64, val_per_class=1)
    past = time.time() - 60  # folders changed just now are not cached (a file may land in the same tick)
    for folder, _, _ in os.walk(data):
        os.utime(folder, (past, past))
    before = set(default_cache().glob("*.npz")) if default_cache().is_dir() else set()
    first = PretrainData(str(data / "train"), input_size=64, workers=0)
    cached = set(default_cache().glob("*.npz")) - before
    assert len(cached) == 1
    assert len(PretrainData(str(data / "train"), input_size=64, workers=0).dataset) == len(first.dataset) == 8
    tiny = json.dumps({"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]})
    from fcmae.training.flags import recipe_path
    train(finetune_parser().parse_args([
        "--config", recipe_path("finetune", "atto"), "--model", tiny, "--data", str(data), "--input-size", "64", "--batch-size", "2", "--effective-batch", "2",
        "--workers", "0", "--accelerator", "cpu", "--devices", "1", "--precision", "32", "--max-steps", "1",
        "--output", str(tmp_path / "ft")]))
    assert len(set(default_cache().glob("*.npz")) - before - cached) == 2  # train/ and val/


def test_the_trainer_tunes_cudnn_for_fixed_shapes(tmp_path, monkeypatch):
    import torch

    from fcmae.training.trainer import make_trainer
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    make_trainer(pretrain_parser().parse_args(["--accelerator", "cpu", "--devices", "1"]), tmp_path, [], epochs=1,
                 accumulate=1)
    assert torch.backends.cudnn.benchmark
