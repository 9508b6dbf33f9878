"""fcmae.runs: the flags every training command shares, and the device count Lightning gives."""
import pytest

from fcmae.cli import with_recipe
from fcmae.errors import UserError
from fcmae.finetune.cli import build_parser as finetune_parser, resolve as finetune_resolve
from fcmae.pretrain import build_parser as pretrain_parser
from fcmae.runs import world_size

SHARED = ("accelerator", "devices", "num_nodes", "precision", "workers", "output", "resume", "no_resume",
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
