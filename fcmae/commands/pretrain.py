"""`fcmae pretrain`: FCMAE pre-training of a ConvNeXt V2 encoder.

    fcmae pretrain                                    # demo: built-in images, atto, a few minutes on CPU
    fcmae pretrain --model base --data /data/imagenet # the paper's recipe (configs/pretrain/base.yaml)

The recipe file of `--model` is read first, so every flag overrides it; `--config FILE` replaces it.
The run is fcmae/training/pretrain.py's task on the one run layer; rerunning the same command
resumes from OUTPUT/checkpoints/last.ckpt.
"""
from typing import Literal, Optional

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from fcmae.encoders import BACKEND_CHOICES, SIZES
from fcmae.masking import PATCH_SIZE
from fcmae.training import flags
from fcmae.training.monitor import EVAL_FLAGS, add_knn_flags
from fcmae.training.pretrain import DEFAULT_MODEL, DEMO, PretrainTask, resolve as resolve_demo
from fcmae.training.run import train

__all__ = ["DEFAULT_MODEL", "DEMO", "build_parser", "fit", "resolve", "run"]


def build_parser():
    p = ArgumentParser(prog="fcmae pretrain", description=(
        "FCMAE pre-training of a ConvNeXt V2 encoder. `--model SIZE --data DIR` runs the paper's recipe "
        "(configs/pretrain/SIZE.yaml; flags override it, --config FILE replaces it). Without --data it "
        "trains on built-in demo images with a short demo schedule (minutes on a CPU). Rerunning the same "
        "command resumes from OUTPUT/checkpoints/last.ckpt."),
                       epilog="Effective batch = batch-size x devices x num-nodes x accumulate; "
                              "lr = blr x effective batch / 256 unless --lr is given. "
                              f"--data demo replaces unchanged recipe values with {DEMO}.")
    p.add_argument("--config", action=ActionConfigFile, help="a recipe file (default: configs/pretrain/<model>.yaml)")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=Literal[tuple(SIZES)], default=DEFAULT_MODEL, help="ConvNeXt V2 size")
    g.add_argument("--backend", type=Literal[BACKEND_CHOICES], default="auto",
                   help="sparse-encoder implementation; auto = the fastest available on the device")
    g.add_argument("--in-chans", type=int, default=3, help="input channels: 3 = RGB, 1 = grayscale, other = .npy")
    g.add_argument("--input-size", type=int, default=224, help=f"crop side in pixels, a multiple of {PATCH_SIZE}")
    g.add_argument("--mask-ratio", type=float, default=0.6,
                   help=f"fraction of {PATCH_SIZE}x{PATCH_SIZE} patches masked")
    g.add_argument("--norm-pix-loss", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="regress per-patch normalized pixels (--no-norm-pix-loss: raw pixels)")
    g.add_argument("--decoder-dim", type=int, default=512)
    g.add_argument("--decoder-depth", type=int, default=1)
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the encoder")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=str, default="demo",
                   help="'demo' (built-in images), DIR/train/<class>/<image> (ImageNet), a folder of images/.npy, or "
                        "WebDataset shards: a folder with index.json (fcmae shard), a pattern "
                        "(/data/shard-{000000..000999}.tar) or URLs (https://..., 'pipe:aws s3 cp s3://.../shard-{...}.tar -')")
    g.add_argument("--strict-data", action="store_true",
                   help="stop at the first unreadable file (default: skip it with a warning naming it, "
                        "count skips per epoch as data/skipped)")
    g.add_argument("--samples-per-epoch", type=Optional[int], default=None,
                   help="shards without index.json: samples in one epoch (the schedule needs it)")
    g.add_argument("--shuffle-buffer", type=int, default=1000,
                   help="shards: samples each loader worker shuffles among (more: better mixed, more memory)")
    g = flags.add_optimization_flags(p, batch_size=64, epochs=1600, blr=1.5e-4, min_lr=0.0, warmup_epochs=40)
    g.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--betas", type=tuple[float, float], default=(0.9, 0.95))
    flags.add_hardware_flags(p)
    g = p.add_argument_group("evaluation", "a kNN monitor of the encoder's features on a small labelled set")
    add_knn_flags(g, EVAL_FLAGS, required=False)
    g.add_argument("--eval-every", type=int, default=1, help="epochs between kNN evaluations (and one at the end)")
    g = flags.add_run_flags(p, output_help="run directory (default: runs/<model>[-demo])")
    g.add_argument("--vis-every", type=int, default=1000, help="steps between reconstruction grids")
    g.add_argument("--ckpt-every", type=int, default=1000, help="steps between last.ckpt updates")
    g.add_argument("--save-every-epochs", type=int, default=20, help="epochs between periodic step*.ckpt files")
    g.add_argument("--keep-checkpoints", type=int, default=3,
                   help="periodic step*.ckpt files kept: the latest K (an older one is removed only after the new "
                        "one is written); 0: none, -1: all. last.ckpt is always kept")
    g.add_argument("--export", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="write <output>/encoder.safetensors at the end")
    return p


def resolve(cfg):
    """Parsed flags -> the run's flags: the demo schedule, the run directory."""
    return resolve_demo(cfg, flags.recipe_values(build_parser(), cfg))


def fit(cfg):
    """Train; returns (trainer, module), None with --dry-run. `run` is the command; this is for
    tests and scripts."""
    return train(PretrainTask(cfg, flags.recipe_values(build_parser(), cfg)))


def run(cfg):
    fit(cfg)
