"""`fcmae knn`: weighted kNN accuracy of an encoder's frozen features on a small labelled set.

    fcmae knn --checkpoint runs/atto-demo --data DIR          # DIR/train/<class>/..., DIR/val/<class>/...
    fcmae knn --random-init --model atto --data DIR           # the floor to compare with

A monitor of feature quality, not the accuracy fine-tuning will reach. Features: the dense
encoder, unmasked, last stage global-average pooled and L2-normalized; each val image is
classified by its k most cosine-similar train images, weighted exp(sim / T) (DINO's protocol).
Images go through fine-tuning's eval transform (resize, center crop) at --input-size.
"""
import json
import math
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import ArgumentParser
from torch.utils.data import Subset

from fcmae.encoders import SIZES
from fcmae.errors import UserError
from fcmae.features import dense_encoder, embed, knn_accuracy
from fcmae.files import write_atomic
from fcmae.finetune.data import (check_classes, check_in_chans, eval_transform, image_folder, loader,
                                 stratified_split)
from fcmae.runs import make_precision


def build_parser():
    p = ArgumentParser(prog="fcmae knn", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Optional[str], default=None,
                   help="weights: a run directory, .ckpt, export or release checkpoint")
    p.add_argument("--random-init", action="store_true", help="a randomly initialized encoder of --model instead")
    p.add_argument("--model", type=Literal[tuple(SIZES)], default="atto", help="size for --random-init")
    p.add_argument("--in-chans", type=int, default=3, help="input channels for --random-init (3 RGB, 1 grayscale)")
    add_knn_flags(p, KNN_FLAGS)
    p.add_argument("--input-size", type=Optional[int], default=None,
                   help="eval crop side in pixels, a multiple of 32 (default: the checkpoint's training size, else 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--precision", type=Literal["auto", "32", "bf16-mixed", "16-mixed"], default="auto",
                   help="auto = bf16-mixed on GPUs that support it, else 32")
    p.add_argument("--device", type=str, default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--output", type=Optional[str], default="knn.json", help="JSON file for the result")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a torch file that needs full unpickling: runs code from the file, so only for files you trust")
    p.add_argument("--seed", type=int, default=0, help="for --val-split, --max-train and --random-init")
    return p


# The kNN options under `fcmae knn`'s names (`fcmae pretrain` names them --eval-* and --knn-*).
KNN_FLAGS = {"data": "--data", "val_split": "--val-split", "max_train": "--max-train", "k": "--k",
             "temperature": "--temperature"}


def add_knn_flags(parser, flags, required=True):
    """The labelled set and the kNN protocol, under the names `flags` gives them."""
    parser.add_argument(flags["data"], type=str if required else Optional[str], required=required,
                        default=None,
                        help=f"labelled images: DIR/train/<class>/<image> and DIR/val/<class>/<image>, or train/ "
                             f"alone (a stratified {flags['val_split']} is held out)")
    parser.add_argument(flags["val_split"], type=float, default=0.1, help="fraction of train/ held out when DIR has no val/")
    parser.add_argument(flags["max_train"], type=Optional[int], default=None,
                        help="cap the labelled train images (stratified); default: all")
    parser.add_argument(flags["k"], type=int, default=20, help="neighbours that vote")
    parser.add_argument(flags["temperature"], type=float, default=0.07, help="vote weight exp(cosine similarity / T)")


def check_knn(k, temperature, val_split, max_train, flag=("k", "temperature", "val-split", "max-train")):
    if k < 1:
        raise UserError(f"--{flag[0]} {k}: must be at least 1 (20 is the usual choice)")
    if temperature <= 0:
        raise UserError(f"--{flag[1]} {temperature}: must be positive (0.07 is the usual choice)")
    if not 0 < val_split < 1:
        raise UserError(f"--{flag[2]} {val_split}: pass a fraction in (0, 1), e.g. 0.1")
    if max_train is not None and max_train < 1:
        raise UserError(f"--{flag[3]} {max_train}: pass a positive number of images, or leave it out for all")


def targets(dataset):
    """Labels of an ImageFolder or a Subset of one."""
    if isinstance(dataset, Subset):
        return [dataset.dataset.targets[i] for i in dataset.indices]
    return list(dataset.targets)


def labelled_sets(data, input_size, in_chans=3, val_split=0.1, max_train=None, seed=0, flag="--data"):
    """`data` -> (train set, val set, class names), items (image, label, files skipped), through
    fine-tuning's eval transform. Without val/ a stratified, seeded `val_split` of train/ is the
    val set; `max_train` caps the train set (stratified, seeded). `flag` names `data` in errors."""
    check_in_chans(in_chans)
    if input_size % 32:
        raise UserError(f"--input-size {input_size} is not a multiple of 32: use e.g. {max(32, round(input_size / 32) * 32)}")
    root = Path(data).expanduser()
    if not (root / "train").is_dir():
        raise UserError(f"{flag} {data}: no {root / 'train'} folder: pass a folder holding train/<class>/<image> "
                        f"(and val/<class>/<image>, or a stratified split of train/ is held out)")
    transform = eval_transform(input_size, in_chans)
    train = image_folder(root, "train", transform, in_chans)
    if (root / "val").is_dir():
        val = image_folder(root, "val", transform, in_chans)
        check_classes(train, val)
    else:
        kept, held = stratified_split(train.targets, val_split, seed)
        if not held:
            raise UserError(f"{root}/train has no class with two or more images to hold out for validation: "
                            f"add images, or a val/ folder")
        train, val = Subset(train, kept), Subset(train, held)
    if max_train is not None and len(train) > max_train:
        labels = targets(train)
        kept, _ = stratified_split(labels, 1 - max_train / len(labels), seed)
        train = Subset(train.dataset, [train.indices[i] for i in kept]) if isinstance(train, Subset) else Subset(train, kept)
    classes = (train.dataset if isinstance(train, Subset) else train).classes
    return train, val, classes


def evaluate(encoder, train, val, num_classes, k=20, temperature=0.07, device="cpu", precision="32",
             batch_size=64, workers=0):
    """Embed both sets and classify val by weighted kNN: {"top1", "top5", "seconds", "train", "val"}."""
    start = time.perf_counter()
    train_feats, train_labels = embed(encoder, loader(train, batch_size, workers, train=False), device, precision)
    feats, labels = embed(encoder, loader(val, batch_size, workers, train=False), device, precision)
    result = knn_accuracy(train_feats, train_labels, feats, labels, num_classes, k, temperature)
    return {**result, "seconds": time.perf_counter() - start, "train": len(train), "val": len(val)}


def pick_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible here: use --device cpu")
    return device


def load_encoder(checkpoint, random_init, model, in_chans, seed=0, trust=False):
    """(dense encoder, label, meta) for `--checkpoint` or `--random-init`; meta holds the
    checkpoint's kind, steps and training input size where known."""
    if random_init == (checkpoint is not None):
        raise UserError("pass exactly one of --checkpoint FILE_OR_RUN_DIR and --random-init")
    if random_init:
        return dense_encoder(None, model, in_chans, seed), f"random init ({model})", {}
    from fcmae.checkpoints import read_weights
    weights = read_weights(checkpoint, trust=trust)
    return dense_encoder(weights), str(checkpoint), {"kind": weights.kind, "steps": weights.meta.get("steps"),
                                                     "trained_input_size": weights.meta.get("input_size")}


def run(cfg):
    knn(cfg)


def knn(cfg):
    """`fcmae knn`; returns the JSON record."""
    check_knn(cfg.k, cfg.temperature, cfg.val_split, cfg.max_train)
    encoder, name, meta = load_encoder(cfg.checkpoint, cfg.random_init, cfg.model, cfg.in_chans, cfg.seed,
                                       cfg.trust_checkpoint)
    input_size = cfg.input_size or meta.get("trained_input_size") or 224
    train, val, classes = labelled_sets(cfg.data, input_size, encoder.in_chans, cfg.val_split, cfg.max_train,
                                        cfg.seed)
    device, precision = pick_device(cfg.device), make_precision(cfg.precision)
    result = evaluate(encoder.to(device), train, val, len(classes), cfg.k, cfg.temperature, device, precision,
                      cfg.batch_size, cfg.workers)
    print(f"kNN (k={cfg.k}, T={cfg.temperature}) {name}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"({result['train']} train / {result['val']} val images, {len(classes)} classes, {result['seconds']:.1f}s)")
    record = {"checkpoint": cfg.checkpoint, "random_init": cfg.random_init, **meta, "data": cfg.data,
              "input_size": input_size, "k": cfg.k, "temperature": cfg.temperature, "classes": len(classes),
              **{k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items()}}
    if cfg.output:
        print(f"wrote {write_atomic(cfg.output, json.dumps(record, indent=2) + chr(10))}")
    return record
