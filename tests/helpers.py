"""Small shared test helpers (imported by test modules; tests/ is on sys.path under pytest)."""
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


def free_port():
    """A TCP port free on this machine now, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
