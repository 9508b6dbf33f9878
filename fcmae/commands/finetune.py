"""`fcmae finetune`: train the dense ConvNeXt V2 classifier on DIR/train, report top-1/top-5 of
the raw weights and of their EMA on DIR/val (or, without val/, on a held-out part of train/)
every epoch.

    fcmae finetune --model base --data /path/to/imagenet-1k --pretrained FILE --output runs/ft-base

The size's recipe (configs/finetune/<model>.yaml) is read first; command-line options override
it. `--linear-probe` trains only a linear head on the frozen encoder (MAE's protocol, values
from `probe.*`). The run is finetune/task.py's task on the one run layer; rerunning the same
command resumes from OUTPUT/checkpoints/last.ckpt.
"""
from typing import Literal, Optional, Union

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from fcmae.finetune import task
from fcmae.finetune.task import FinetuneTask, batch_plan
from fcmae.masking import PATCH_SIZE
from fcmae.training import flags
from fcmae.training.run import train as train_task

__all__ = ["DEFAULT_MODEL", "batch_plan", "build_parser", "resolve", "run", "train"]

DEFAULT_MODEL = "base"


def build_parser():
    p = ArgumentParser(prog="fcmae finetune", description=(
        "Fine-tune a ConvNeXt V2 classifier on DIR/train, top-1/top-5 on DIR/val every epoch (raw and EMA "
        "weights). `--model SIZE` reads configs/finetune/SIZE.yaml first (flags override it, --config FILE "
        "replaces it). Rerunning the same command resumes from OUTPUT/checkpoints/last.ckpt."),
                       epilog="Effective batch = batch-size x devices x num-nodes x accumulate; accumulate comes "
                              "from --effective-batch unless given. lr = blr x effective batch / 256 unless --lr. "
                              "A run fits itself to small data: see --effective-batch, --ema-decay, --warmup-epochs.")
    p.add_argument("--config", action=ActionConfigFile, help="a recipe file (default: configs/finetune/<model>.yaml)")
    g = p.add_argument_group("model and weights")
    g.add_argument("--model", type=Union[str, dict], default=DEFAULT_MODEL,
                   help="ConvNeXt V2 size (atto ... huge), or {depths: [...], dims: [...]}")
    g.add_argument("--pretrained", type=Optional[str], default=None,
                   help="weights to start from: an fcmae export (.safetensors), an fcmae pre-training last.ckpt, "
                        "a release pre-training checkpoint, or a dense public-layout checkpoint; none: from scratch")
    g.add_argument("--linear-probe", action="store_true",
                   help="train only a linear head (after BatchNorm) on the frozen encoder; uses the probe.* values")
    g.add_argument("--in-chans", type=int, default=3, help="3 = RGB, 1 = grayscale, any count for .npy arrays")
    g.add_argument("--input-size", type=int, default=224, help=f"crop side in pixels, a multiple of {PATCH_SIZE}")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--data", type=Optional[str], default=None,
                   help="folder with train/ class folders, and val/ ones (else --val-split holds part of train/ "
                        "out)")
    g.add_argument("--val-split", type=float, default=0.1,
                   help="without val/: the fraction of each class of train/ held out for validation (stratified, "
                        "seeded by --seed, listed in OUTPUT/val_split.txt and reused on resume); 0: train on "
                        "everything, no validation (the best checkpoint is then the last)")
    g.add_argument("--strict-data", action="store_true",
                   help="stop at the first unreadable image (default: skip it with a warning naming it, "
                        "count skips per epoch as data/skipped)")
    g.add_argument("--aa", type=Optional[str], default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy (null: off)")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--crop-pct", type=Optional[float], default=None, help="eval: resize to input/crop_pct, center-crop "
                   "(default 224/256; 1.0 from 384 px)")
    g = flags.add_optimization_flags(p, batch_size=32, epochs=100, blr=6.25e-4, min_lr=1e-6, warmup_epochs=20)
    g.add_argument("--effective-batch", type=Optional[int], default=1024,
                   help="images per optimizer step; sets --accumulate from the device count unless that is given. "
                        "The recipe's value is lowered (by lowering the accumulation) until an epoch has at least "
                        "20 optimizer steps; a value you pass is kept")
    g.add_argument("--accumulate", type=Optional[int], default=None, help="gradient accumulation steps")
    g.add_argument("--layer-decay", type=float, default=0.6, help="layer-wise lr decay (1: off)")
    g.add_argument("--layer-decay-type", type=Literal["single", "group"], default="group",
                   help="single: an id per block; group: the third stage three blocks at a time (base and larger)")
    g.add_argument("--ema", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="keep an EMA of the weights and evaluate it beside them (--no-ema: off)")
    g.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay per optimizer step. A run shorter than 10 time constants (1 / (1 - decay) "
                        "steps) gets the recipe's value lowered to 1 - 10 / steps (at least 0.5); a value you pass "
                        "is kept, with a warning")
    g.add_argument("--clip-grad", type=Optional[float], default=None,
                   help="clip the gradients' total norm to NORM before each optimizer step (the release's "
                        "clip_grad); null: no clipping")
    g = p.add_argument_group("linear probe (MAE's recipe, with --linear-probe)")
    g.add_argument("--probe.blr", type=float, default=0.1, help="base lr (LARS)")
    g.add_argument("--probe.weight-decay", type=float, default=0.0)
    g.add_argument("--probe.epochs", type=int, default=90)
    g.add_argument("--probe.warmup-epochs", type=float, default=10)
    flags.add_hardware_flags(p, strategy=False)
    flags.add_run_flags(p, output_help="run directory (default: runs/<model>-finetune or runs/<model>-linprobe)")
    return p


def resolve(cfg, train_images=None):
    """Flags -> the run's values (finetune.task.resolve), fitted to `train_images` when given."""
    return task.resolve(cfg, flags.recipe_values(build_parser(), cfg), train_images)


def train(cfg):
    """The whole run. Returns {"history": per-epoch metrics, "output", "classifier", "best",
    "module"} (None for --dry-run); `run` is the command, this is for tests and scripts."""
    return train_task(FinetuneTask(cfg, flags.recipe_values(build_parser(), cfg)))


def run(cfg):
    train(cfg)
