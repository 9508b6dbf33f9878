"""Small shared test helpers (imported by test modules; tests/ is on sys.path under pytest)."""
import math
import os

import pytest
import torch

# A multi-block custom size that keeps tests fast.
TINY = {"depths": [2, 2, 3, 2], "dims": [8, 16, 24, 32]}


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
