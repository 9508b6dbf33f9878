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
from typing import Literal, Optional

from jsonargparse import ArgumentParser

from fcmae.data.labelled import labelled_sets
from fcmae.encoders import SIZES
from fcmae.features import knn_evaluate, load_encoder, pick_device
from fcmae.files import write_atomic
from fcmae.masking import PATCH_SIZE
from fcmae.precision import PRECISIONS, resolve_precision
from fcmae.training.monitor import KNN_FLAGS, add_knn_flags, check_knn


def build_parser():
    p = ArgumentParser(prog="fcmae knn", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Optional[str], default=None,
                   help="weights: a run directory, .ckpt, export or release checkpoint")
    p.add_argument("--random-init", action="store_true", help="a randomly initialized encoder of --model instead")
    p.add_argument("--model", type=Literal[tuple(SIZES)], default="atto", help="size for --random-init")
    p.add_argument("--in-chans", type=int, default=3, help="input channels for --random-init (3 RGB, 1 grayscale, any other: .npy class folders)")
    add_knn_flags(p, KNN_FLAGS)
    p.add_argument("--input-size", type=Optional[int], default=None,
                   help=f"eval crop side in pixels, a multiple of {PATCH_SIZE} (default: the checkpoint's training size, "
                        f"else 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--precision", type=Literal[PRECISIONS], default="auto",
                   help="auto = bf16-mixed on GPUs that support it and on CPUs with AMX or AVX-512 BF16, else 32")
    p.add_argument("--device", type=str, default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--output", type=Optional[str], default="knn.json", help="JSON file for the result")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a torch file that needs full unpickling: runs code from the file, so only for files you trust")
    p.add_argument("--seed", type=int, default=0, help="for --val-split, --max-train and --random-init")
    return p


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
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, "cpu" if device == "cpu" else "auto")
    result = knn_evaluate(encoder.to(device), train, val, len(classes), cfg.k, cfg.temperature, device, precision,
                          cfg.batch_size, cfg.workers)
    print(f"kNN (k={cfg.k}, T={cfg.temperature}) {name}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"({result['train']} train / {result['val']} val images, {len(classes)} classes, {result['seconds']:.1f}s)")
    record = {"checkpoint": cfg.checkpoint, "random_init": cfg.random_init, **meta, "data": cfg.data,
              "input_size": input_size, "k": cfg.k, "temperature": cfg.temperature, "classes": len(classes),
              **{k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items()}}
    if cfg.output:
        print(f"wrote {write_atomic(cfg.output, json.dumps(record, indent=2) + chr(10))}")
    return record
