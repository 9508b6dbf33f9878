"""`fcmae segment`: train a UperNet on the dense ConvNeXt V2 encoder (semantic segmentation), with
mIoU, mean accuracy, pixel accuracy and per-class IoU / accuracy on the validation pairs every
--eval-every iterations and at the end.

    fcmae segment --model tiny --data /path/to/ADEChallengeData2016 --reduce-zero-label \\
        --pretrained runs/ft-tiny/classifier.safetensors --output runs/seg-tiny

DATA is ADE20K's layout (images/{training,validation}/*.jpg, annotations/{training,validation}/*.png)
or the generic one (train/images/* with train/masks/<stem>.png, val/ the same; without val/ a
seeded --val-split of train/ is held out). The size's recipe (configs/segment/<model>.yaml, the
ADE20K setup of the ConvNeXt papers) is read first; command-line options override it. The run is
segment/task.py's task on the one run layer; rerunning the same command resumes from
OUTPUT/checkpoints/last.ckpt.
"""
from typing import List, Literal, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser

from fcmae.masking import PATCH_SIZE
from fcmae.segment.task import SegmentTask
from fcmae.training import flags
from fcmae.training.run import train as train_task

DEFAULT_MODEL = "tiny"


def build_parser():
    p = ArgumentParser(prog="fcmae segment", description=(
        "Train a UperNet segmenter on a ConvNeXt V2 encoder; mIoU, mean and pixel accuracy and per-class IoU on the "
        "validation pairs every --eval-every iterations. `--model SIZE` reads configs/segment/SIZE.yaml first "
        "(flags override it, --config FILE replaces it). Rerunning the same command resumes from "
        "OUTPUT/checkpoints/last.ckpt."),
        epilog="Effective batch = batch-size x devices x num-nodes x accumulate; accumulate comes from "
               "--effective-batch unless given. The length is --iterations (optimizer steps) or --epochs (passes "
               "over the training images). A shorter run than the recipe's fits its warmup and evaluation "
               "interval to its length: see --warmup-iterations, --eval-every.")
    p.add_argument("--config", action=ActionConfigFile, help="a recipe file (default: configs/segment/<model>.yaml)")
    g = p.add_argument_group("model and weights")
    g.add_argument("--model", type=Union[str, dict], default=DEFAULT_MODEL,
                   help="ConvNeXt V2 size (atto ... huge), or {depths: [...], dims: [...]}")
    g.add_argument("--pretrained", type=Optional[str], default=None,
                   help="the encoder's weights: an fcmae export (encoder, classifier or segmenter .safetensors), an "
                        "fcmae pre-training, fine-tuning or segmentation last.ckpt, a release checkpoint, or dense "
                        "public- or timm-layout weights; none: from scratch")
    g.add_argument("--in-chans", type=int, default=3, help="3 = RGB, 1 = grayscale, any count for .npy arrays")
    g.add_argument("--input-size", type=int, default=512,
                   help=f"training crop side in pixels, a multiple of {PATCH_SIZE}")
    g.add_argument("--drop-path", type=float, default=0.4, help="the encoder's stochastic depth rate")
    g.add_argument("--channels", type=int, default=512, help="UperNet's width")
    g.add_argument("--aux-channels", type=int, default=256, help="the auxiliary FCN head's width")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--data", type=Optional[str], default=None,
                   help="ADE20K's layout (images/training, annotations/training, ...) or train/images with "
                        "train/masks (and val/images with val/masks, else --val-split holds part of train/ out); "
                        "DIR/classes.txt names the classes, one per line")
    g.add_argument("--val-split", type=float, default=0.1,
                   help="without validation pairs: the fraction of the training pairs held out for validation "
                        "(seeded by --seed, listed in OUTPUT/val_split.txt and reused on resume); 0: no validation")
    g.add_argument("--reduce-zero-label", action="store_true",
                   help="label 0 ('other') is ignored and 1..K become 0..K-1, as ADE20K is usually trained")
    g.add_argument("--strict-data", action="store_true",
                   help="stop at the first unusable pair (unreadable, a mask of another size, a label beyond the "
                        "classes); default: skip it with a warning naming it, listed in OUTPUT/skipped_files.txt")
    g.add_argument("--scale", type=Optional[List[int]], default=None,
                   help="[long, short] the training images are rescaled to (x a ratio of --ratio-range) and the "
                        "evaluation scale; null: 4x and 1x --input-size")
    g.add_argument("--ratio-range", type=List[float], default=[0.5, 2.0], help="random rescale ratios [low, high]")
    g.add_argument("--cat-max-ratio", type=float, default=0.75,
                   help="a random crop is drawn again (up to 10 times) while one class covers this share of it")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=Optional[int], default=16000,
                   help="iterations between validations (and one at the end). The recipe's value is lowered to "
                        "give a shorter run its 10 validations; a value you pass is kept")
    g.add_argument("--eval-mode", type=Literal["slide", "whole"], default="slide",
                   help="single-scale evaluation at --scale: sliding windows (--eval-window) or the whole image")
    g.add_argument("--eval-window", type=Optional[List[int]], default=None,
                   help="the sliding window [crop, stride]; null: --input-size and two thirds of it")
    g.add_argument("--tta", action="store_true",
                   help="evaluate at --tta-ratios of the scale, each also mirrored (multi-scale + flip)")
    g.add_argument("--tta-ratios", type=List[float], default=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    add_schedule_flags(p)
    flags.add_hardware_flags(p, strategy=False)
    g = flags.add_run_flags(p, output_help="run directory (default: runs/<model>-segment)")
    g.add_argument("--ckpt-every", type=int, default=1000, help="optimizer steps between last.ckpt saves")
    return p


def add_schedule_flags(p):
    """The recipe's optimization: batch plan, length in iterations (or epochs), poly schedule, AdamW."""
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=16, help="images per device per step (2 at least)")
    g.add_argument("--effective-batch", type=Optional[int], default=16,
                   help="images per optimizer step; sets --accumulate from the device count unless that is given")
    g.add_argument("--accumulate", type=Optional[int], default=None, help="gradient accumulation steps")
    g.add_argument("--iterations", type=int, default=160_000, help="the length: optimizer steps")
    g.add_argument("--epochs", type=Optional[int], default=None,
                   help="the length in passes over the training images instead of --iterations")
    g.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimizer steps (the schedule still spans the length); -1: no limit")
    g.add_argument("--warmup-iterations", type=int, default=1500,
                   help="linear warmup from 0. The recipe's value is scaled to a shorter run (its share of the "
                        "recipe's iterations); a value you pass is kept")
    g.add_argument("--lr", type=float, default=1e-4, help="peak lr (absolute: not scaled with the batch)")
    g.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the poly decay")
    g.add_argument("--power", type=float, default=1.0, help="the poly decay's power")
    g.add_argument("--weight-decay", type=float, default=0.05, help="not on biases, norm weights, GRN gamma/beta")
    g.add_argument("--betas", type=List[float], default=[0.9, 0.999], help="AdamW's betas")
    g.add_argument("--layer-decay", type=float, default=0.9, help="layer-wise lr decay over the encoder (1: off)")
    g.add_argument("--layer-decay-type", type=Literal["single", "group"], default="single",
                   help="single: an id per block; group: the third stage three blocks at a time (base and larger)")
    g.add_argument("--aux-weight", type=float, default=0.4, help="loss weight of the auxiliary FCN head")
    g.add_argument("--clip-grad", type=Optional[float], default=None,
                   help="clip the gradients' total norm to NORM before each optimizer step; null: no clipping")
    g.add_argument("--seed", type=int, default=0)
    return g


def train(cfg):
    """The whole run. Returns {"history": per-validation metrics, "output", "segmenter", "best",
    "module"} (None for --dry-run); `run` is the command, this is for tests and scripts."""
    return train_task(SegmentTask(cfg, flags.recipe_values(build_parser(), cfg)))


def run(cfg):
    train(cfg)
