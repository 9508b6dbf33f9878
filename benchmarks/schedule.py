"""Pre-training's schedule on a short run: loss and kNN top-1 of warmup choices, on one generated set.

    python benchmarks/schedule.py                                   # 3000 images, 64 px, batch 32, 3 epochs
    python benchmarks/schedule.py --fcmae /path/to/other/.venv/bin/fcmae --schedules today

The recipe gives the warmup in epochs (40 of 1600). On a run of a few epochs that warmup is
longer than the run, and the lr never rises. Each schedule here is one `fcmae pretrain` run of the
recipe (atto, blr 1.5e-4, ...) with only the data, input size, batch, epochs, the kNN monitor and
a warmup length passed:
- today: the recipe's 40 epochs as they are;
- share: the recipe's share of its own length (40 / 1600 of the run);
- fifth: the recipe's warmup, at most a fifth of the run;
- default: no --warmup-epochs at all (what the installed fcmae chooses).
Also `fcmae knn --random-init`: the floor. The data: images of one large shape (ellipse,
rectangle, triangle or cross: the class) on a random colour gradient, in a colour that hints at
the class, with a few thin random outlines; unlabelled ones to pre-train on, a labelled set of the same
kind for the kNN monitor. Prints one row per schedule (loss at the first logged steps and over
the last epoch, kNN top-1 after each epoch), then one JSON line.
"""
import argparse
import colorsys
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("ellipse", "rectangle", "triangle", "cross")


def shape_image(rng, size, kind):
    """One image (PIL RGB): a colour gradient, a few thin distractor outlines, one large filled
    `kind` at a random place and size, its hue drawn around the kind's own (90 degrees apart,
    +-70: neighbouring kinds overlap), so colour alone tells the class only in part."""
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(angle) * np.linspace(0, 1, size)[None, :] + np.sin(angle) * np.linspace(0, 1, size)[:, None]
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = Image.fromarray((c0 + ramp[..., None] * (c1 - c0)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # thin outlines of any kind
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline=tuple(int(c) for c in rng.integers(0, 256, 3)), width=1)
    r = int(rng.integers(size // 5, size * 2 // 5))
    x, y = (int(v) for v in rng.integers(r, size - r, 2))
    hue = (KINDS.index(kind) * 0.25 + rng.uniform(-70, 70) / 360) % 1.0
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1), rng.uniform(0.5, 1)))
    if kind == "ellipse":
        draw.ellipse([x - r, y - int(r * 0.8), x + r, y + int(r * 0.8)], fill=colour)
    elif kind == "rectangle":
        draw.rectangle([x - r, y - r // 2, x + r, y + r // 2], fill=colour)
    elif kind == "triangle":
        draw.polygon([(x - r, y + r), (x + r, y + r), (x, y - r)], fill=colour)
    else:
        draw.rectangle([x - r, y - r // 4, x + r, y + r // 4], fill=colour)
        draw.rectangle([x - r // 4, y - r, x + r // 4, y + r], fill=colour)
    return img


def write_sets(root, images, labelled_per_class, size, seed=0):
    """root/unlabelled/*.png (kinds drawn at random) and root/labelled/train/<kind>/*.png."""
    rng = np.random.default_rng(seed)
    unlabelled = root / "unlabelled"
    unlabelled.mkdir(parents=True)
    for i in range(images):
        shape_image(rng, size, KINDS[int(rng.integers(len(KINDS)))]).save(unlabelled / f"{i:05d}.png")
    for kind in KINDS:
        folder = root / "labelled" / "train" / kind
        folder.mkdir(parents=True)
        for i in range(labelled_per_class):
            shape_image(rng, size, kind).save(folder / f"{i:04d}.png")
    return unlabelled, root / "labelled"


def losses(run):
    """train/loss as TensorBoard logged it: [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def knn_curve(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], round(r["eval/knn_top1"], 2)) for r in rows if "eval/knn_top1" in r]


def warmup_flags(name, epochs):
    return {"today": ["--warmup-epochs", "40"], "share": ["--warmup-epochs", f"{40 * epochs / 1600:g}"],
            "fifth": ["--warmup-epochs", f"{min(40, epochs / 5):g}"], "default": []}[name]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fcmae", default=str(Path(sys.executable).parent / "fcmae"), help="the fcmae executable to run")
    p.add_argument("--schedules", nargs="+", default=["today", "share", "fifth"], choices=["today", "share", "fifth",
                                                                                             "default"])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--labelled-per-class", type=int, default=200, help="a quarter is held out for validation")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--work", default=None, help="folder for the data and runs (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fcmae-schedule-"))
    if (work / "unlabelled").is_dir():
        unlabelled, labelled = work / "unlabelled", work / "labelled"
    else:
        unlabelled, labelled = write_sets(work, args.images, args.labelled_per_class, args.size)
    common = ["--data", unlabelled, "--input-size", args.size, "--batch-size", args.batch_size, "--epochs", args.epochs,
              "--workers", args.workers, "--eval-data", labelled, "--eval-val-split", "0.25", "--log-every", "5"]
    floor = subprocess.run([args.fcmae, "knn", "--random-init", "--model", "atto", "--data", labelled, "--input-size",
                            str(args.size), "--val-split", "0.25", "--workers", str(args.workers), "--device", "cpu",
                            "--output", str(work / "random.json")], capture_output=True, text=True)
    record = {"random_init_knn_top1": round(json.loads((work / "random.json").read_text())["top1"], 2)
              if floor.returncode == 0 else floor.stderr.strip()[-300:], "runs": {}}
    print(f"random init: kNN top-1 {record['random_init_knn_top1']}", flush=True)
    for name in args.schedules:
        run = work / f"run-{name}"
        cmd = [args.fcmae, "pretrain", *map(str, common), *warmup_flags(name, args.epochs), "--output", str(run)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        curve = losses(run)
        per_epoch = max(s for s, _ in curve) // args.epochs
        first = [v for s, v in curve if s <= 25]
        last = [v for s, v in curve if s > curve[-1][0] - per_epoch]
        row = {"warmup": " ".join(warmup_flags(name, args.epochs)) or "(default)",
               "loss_first_25_steps": round(float(np.mean(first)), 4), "loss_last_epoch": round(float(np.mean(last)), 4),
               "loss_min": round(min(v for _, v in curve), 4), "steps": curve[-1][0], "knn_top1": knn_curve(run)}
        record["runs"][name] = row
        print(f"{name:8s} {row['warmup']:22s} loss {row['loss_first_25_steps']:.4f} -> {row['loss_last_epoch']:.4f} "
              f"(min {row['loss_min']:.4f}, {row['steps']} steps)  kNN top-1 by step {row['knn_top1']}", flush=True)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
