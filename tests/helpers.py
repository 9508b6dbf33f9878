"""Small shared test helpers (imported by test modules; tests/ is on sys.path under pytest)."""
import colorsys
import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

# A multi-block custom size that keeps tests fast.
TINY = {"depths": [2, 2, 3, 2], "dims": [8, 16, 24, 32]}

# The mixed-precision tolerances (tests/test_mixed_precision.py, scripts/gpu_check.py): (forward,
# gradients), relative to the reference tensor's largest magnitude, per tensor. The unit
# roundoff u is 2^-8 = 3.9e-3 for bf16 (8 significant bits) and 2^-11 = 4.9e-4 for fp16. Autocast
# rounds the inputs and outputs of every convolution and linear layer, so the forward error is a
# few u after the TINY encoder's 9 blocks (measured: up to 1.1u for bf16, 1.1u for fp16): allow 5u.
# Parameter gradients pass through every block twice (forward and backward) and are sums over all
# positions of terms of both signs, so their error relative to the sum is larger (measured: up to
# 16u for bf16, the first LayerNorm's weight, 24u for fp16): allow 25u for bf16, 60u for fp16,
# which is still far below what a wrong gradient (an O(1) error) gives.
MIXED_PRECISION_TOLERANCES = {torch.bfloat16: (5 * 2 ** -8, 25 * 2 ** -8),
                              torch.float16: (5 * 2 ** -11, 60 * 2 ** -11)}


def randomize_(module, std=0.3, seed=0):
    """Give GRN gamma/beta and every bias non-zero values: at init they are zero, which would
    hide GRN and bias handling from the equality tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("grn.gamma", "grn.beta", ".bias")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def minkowski():
    """MinkowskiEngine, or skip; CI sets FCMAE_REQUIRE_MINKOWSKI=1 so a missing install fails."""
    if os.environ.get("FCMAE_REQUIRE_MINKOWSKI") == "1":
        import MinkowskiEngine
        return MinkowskiEngine
    return pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine not installed (scripts/install_minkowski.sh)")


def warmup_cosine(step, warmup_steps, total_steps, min_ratio=0.0):
    """The reference lr multiplier at optimizer step `step` (pre-training's original hand-written
    schedule): linear warmup from 0, then cosine to min_ratio."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def labelled_images(root, classes=3, per_class=8, size=64, val_per_class=0, seed=0):
    """A tiny labelled ImageFolder: class 0 red discs, 1 green squares, 2 blue triangles (then
    more colours), random position and size on a noisy gray background. root/train/<class>/
    and, with val_per_class, root/val/<class>/."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 200, 30), (200, 30, 200)]
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes if n else 0):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(100, 156, (size, size, 3), dtype=np.uint8))
                r = int(rng.integers(size // 5, size // 3))
                x, y = (int(v) for v in rng.integers(r, size - r, 2))
                box, draw = [x - r, y - r, x + r, y + r], ImageDraw.Draw(img)
                shape = c % 3
                if shape == 0:
                    draw.ellipse(box, fill=colours[c % len(colours)])
                elif shape == 1:
                    draw.rectangle(box, fill=colours[c % len(colours)])
                else:
                    draw.polygon([(x - r, y + r), (x + r, y + r), (x, y - r)], fill=colours[c % len(colours)])
                img.save(folder / f"{i:03d}.png")
    return root


SHAPE_COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 200, 30), (200, 30, 200), (30, 200, 200)]


def draw_shape(draws, kind, box, fills):
    """Draw one shape (0 disc, 1 square, 2 triangle) into every ImageDraw of `draws`, each with its fill."""
    x0, y0, x1, y1 = box
    for draw, fill in zip(draws, fills):
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)


def segmentation_images(root, layout="generic", train=8, val=4, size=64, classes=4, seed=0, mask_mode="L",
                        arrays=False, names=True, colours="fixed"):
    """A tiny segmentation set: on a noisy gray background (label 0), one to three shapes of
    labels 1..classes-1 (label c: shape (c - 1) % 3, colour SHAPE_COLOURS[c - 1], or with
    `colours` "random" a saturated colour of random hue per shape, so that the shape alone tells
    the class) at random places and sizes; the masks hold the labels. layout "generic": root/{train,val}/{images,masks}
    (.png images); "ade20k": root/images/{training,validation}/*.jpg and
    root/annotations/{training,validation}/*.png with labels stored + 1 and a border of 0
    ("other"), as ADE20K stores them (reduce_zero_label gives the labels back). `mask_mode`: "L",
    "P" (palette) or "I;16"; `arrays`: images as .npy float32 (3, H, W) in [0, 1]; `names`:
    write root/classes.txt. Returns root."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    folders = {"generic": {"train": ("train/images", "train/masks"), "val": ("val/images", "val/masks")},
               "ade20k": {"train": ("images/training", "annotations/training"),
                          "val": ("images/validation", "annotations/validation")}}[layout]
    for split, n in (("train", train), ("val", val)):
        if not n:
            continue
        image_dir, mask_dir = (root / f for f in folders[split])
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = Image.fromarray(rng.integers(100, 156, (size, size, 3), dtype=np.uint8))
            mask = Image.new("L", (size, size), 0)
            for _ in range(int(rng.integers(1, 4))):
                label = int(rng.integers(1, classes))
                r = int(rng.integers(size // 8, size // 4))
                x, y = (int(v) for v in rng.integers(r, size - r, 2))
                colour = SHAPE_COLOURS[(label - 1) % len(SHAPE_COLOURS)] if colours == "fixed" else \
                    tuple(round(255 * v) for v in colorsys.hsv_to_rgb(*rng.uniform((0, 0.6, 0.7), (1, 1, 1))))
                draw_shape([ImageDraw.Draw(img), ImageDraw.Draw(mask)], (label - 1) % 3, [x - r, y - r, x + r, y + r],
                           [colour, label])
            labels = np.asarray(mask).astype(np.int64)
            if layout == "ade20k":
                labels = labels + 1
                labels[:2], labels[:, :2] = 0, 0  # "other"
            stem = f"{split}_{i:03d}"
            if arrays:
                np.save(image_dir / f"{stem}.npy", (np.asarray(img, np.float32) / 255).transpose(2, 0, 1))
            else:
                img.save(image_dir / f"{stem}.{'jpg' if layout == 'ade20k' else 'png'}")
            if mask_mode == "P":
                out = Image.fromarray(labels.astype(np.uint8), mode="P")
                out.putpalette([v for c in range(256) for v in ((37 * c) % 256, (91 * c) % 256, (53 * c) % 256)])
            elif mask_mode == "I;16":
                out = Image.fromarray(labels.astype(np.uint16))
            else:
                out = Image.fromarray(labels.astype(np.uint8), mode="L")
            out.save(mask_dir / f"{stem}.png")
    if names:
        (root / "classes.txt").write_text("".join(f"{n}\n" for n in ["background", "disc", "square", "triangle",
                                                                      "disc2", "square2"][:classes]))
    return root


def plain_segmentation_loop(root, steps, batch_size=8, lr=1e-3, warmup=None, channels=64,
                            encoder="tu-convnextv2_atto", seed=0, **encoder_kwargs):
    """The reference for learnability: segmentation_models_pytorch's UPerNet (on timm's ConvNeXt V2
    through smp's timm-universal encoder; `encoder_kwargs` such as depths and dims go to timm) in
    a plain PyTorch loop on a `segmentation_images` set (generic layout, 3-channel images, masks
    0..K-1): whole images normalized with ImageNet's statistics, random horizontal flips, cross
    entropy, AdamW with a linear warmup then a linear decay, `steps` optimizer steps. Returns the
    val mIoU in percent, from a confusion matrix counted here (classes absent from truth and
    prediction left out), independent of fcmae."""
    import numpy as np
    import segmentation_models_pytorch as smp
    from PIL import Image

    def read(split):
        images = sorted((root / split / "images").iterdir())
        x = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in images])
        y = np.stack([np.asarray(Image.open(root / split / "masks" / f"{p.stem}.png"), np.int64) for p in images])
        mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
        return torch.from_numpy((x - mean) / std).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)

    (x, y), (vx, vy) = read("train"), read("val")
    k = int(max(y.max(), vy.max())) + 1
    torch.manual_seed(seed)
    model = smp.UPerNet(encoder_name=encoder, encoder_weights=None, classes=k, decoder_channels=channels,
                        **encoder_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = steps // 10 if warmup is None else warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / warmup if s < warmup else max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        xb, yb = x[idx].clone(), y[idx].clone()
        flip = torch.rand(batch_size, generator=g) < 0.5
        xb[flip], yb[flip] = xb[flip].flip(-1), yb[flip].flip(-1)
        loss = torch.nn.functional.cross_entropy(model(xb), yb, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = model(vx).argmax(1)
    keep = vy != 255
    confusion = torch.bincount(vy[keep] * k + predicted[keep], minlength=k * k).reshape(k, k).double()
    tp, union = confusion.diag(), confusion.sum(0) + confusion.sum(1) - confusion.diag()
    return float((tp[union > 0] / union[union > 0]).mean() * 100)


def release_checkpoint(ours):
    """Our FCMAE state dict written the way the public release stores it (docs/checkpoints.md), spelled out
    key by key here, independently of the library's converter."""
    out = {}
    for k, v in ours.items():
        if k.startswith("decoder."):
            k = k.replace("decoder.blocks.", "decoder.", 1) if ".blocks." in k else k[len("decoder."):]
            out[k] = v
            continue
        m = re.match(r"encoder\.stages\.(\d+)\.(\d+)\.(\w+)\.(\w+)$", k)
        if m:
            layer, param = m.group(3), m.group(4)
            if layer == "dwconv" and param == "weight":
                out[k.replace("weight", "kernel")] = v[:, 0].transpose(1, 2).reshape(v.shape[0], 49).t()
            elif layer == "dwconv":
                out[k] = v.reshape(1, -1)
            elif layer == "norm":
                out[k.replace("norm.", "norm.ln.")] = v
            elif layer in ("pwconv1", "pwconv2"):
                out[k.replace(f"{layer}.", f"{layer}.linear.")] = v
            elif layer == "grn":
                out[k] = v.reshape(1, -1)
            continue
        m = re.match(r"encoder\.downsample_layers\.([123])\.(\d)\.(\w+)$", k)
        if m and m.group(2) == "0":
            out[k.replace(".0.", ".0.ln.")] = v
        elif m and m.group(3) == "weight":
            c_out, c_in = v.shape[:2]
            out[k.replace("weight", "kernel")] = v.transpose(2, 3).reshape(c_out, c_in, 4).permute(2, 1, 0)
        elif m:
            out[k] = v.reshape(1, -1)
        else:
            out[k] = v  # the dense stem
    return {"model": out, "epoch": 1599}


COLORS = {"blue_triangle": (40, 70, 220), "green_square": (40, 200, 60), "red_circle": (220, 40, 40)}


def shapes_dataset(root, per_class=(32, 8), size=64, seed=0):
    """An easy labeled task: one colored shape per 64x64 image (3 classes) on a random gray-ish
    background, at a random place and size; root/train/<class>/*.png and root/val/<class>/*.png."""
    rng = random.Random(seed)
    for split, n in zip(("train", "val"), per_class):
        for name, color in COLORS.items():
            folder = Path(root, split, name)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.new("RGB", (size, size), tuple(rng.randint(90, 160) for _ in range(3)))
                draw = ImageDraw.Draw(img)
                r = rng.randint(size // 4, size * 2 // 5)
                x, y = rng.randint(r, size - r), rng.randint(r, size - r)
                if name == "red_circle":
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
                elif name == "green_square":
                    draw.rectangle([x - r, y - r, x + r, y + r], fill=color)
                else:
                    draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
                img.save(folder / f"{i:03d}.png")
    return Path(root)


# `fcmae finetune` on a custom size of one block per stage, 64 px (tests/finetune/).
SMALL = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
SMALL_FINETUNE = ["--model", json.dumps(SMALL), "--input-size", "64", "--batch-size", "16", "--effective-batch", "16",
                  "--workers", "0", "--accelerator", "cpu", "--devices", "1", "--precision", "32", "--log-every", "1"]


def finetune_small(*args):
    """Like `fcmae finetune --model atto ...`, with the atto recipe and the SMALL size."""
    from fcmae.commands.finetune import build_parser, train
    from fcmae.training.flags import recipe_path
    return train(build_parser().parse_args(["--config", recipe_path("finetune", "atto"), *SMALL_FINETUNE, *args]))


# `fcmae pretrain` small enough for 2 shared CPU cores: atto at 64 px, a 32-dim decoder, each step
# well under a second (tests/training/).
PRETRAIN_TINY = ["--input-size", "64", "--batch-size", "4", "--decoder-dim", "32", "--workers", "0",
                 "--accelerator", "cpu", "--devices", "1", "--precision", "32", "--backend", "sparse",
                 "--log-every", "1", "--vis-every", "2", "--ckpt-every", "2", "--no-export"]


def parse_pretrain(*args):
    """Like `fcmae pretrain ARGS`: the size's recipe file first, then the flags."""
    from fcmae.commands.pretrain import DEFAULT_MODEL, build_parser
    from fcmae.training.flags import with_recipe
    return build_parser().parse_args(with_recipe("pretrain", list(args), DEFAULT_MODEL))


def weights(module):
    """A detached copy of a module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# `fcmae segment` small enough for 2 shared CPU cores: the TINY size, a 16-wide UperNet, 64 px,
# batches of 2 (each step well under a second with one thread). Flags only: the atto recipe first.
SEGMENT_TINY = ["--model", json.dumps(TINY), "--input-size", "64", "--batch-size", "2", "--effective-batch", "2",
                "--channels", "16", "--aux-channels", "8", "--workers", "0", "--accelerator", "cpu", "--devices", "1",
                "--precision", "32", "--log-every", "1"]


def segment_args(*args):
    """The argv of `fcmae segment` with the atto recipe, SEGMENT_TINY and `args` (strings)."""
    from fcmae.training.flags import recipe_path
    return ["segment", "--config", recipe_path("segment", "atto"), *SEGMENT_TINY, *map(str, args)]


def segment_small(*args):
    """Like `fcmae segment --model atto ...` with SEGMENT_TINY, in this process: train()'s result
    ({"history", "output", "segmenter", "best", "module"})."""
    from fcmae.commands.segment import build_parser, train
    return train(build_parser().parse_args(segment_args(*args)[1:]))


def free_port():
    """A TCP port free on this machine now, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fcmae(capsys, *argv):
    """`fcmae ARGV` in this process -> (exit code, stdout, stderr), output captured by `capsys`."""
    from fcmae.cli import main
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv]) or 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
