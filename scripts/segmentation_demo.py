"""A small generated segmentation set to try `fcmae segment` on (README, "Segmentation").

    .venv/bin/python scripts/segmentation_demo.py data/shapes-seg [--train 64 --val 16 --size 64]
        [--classify data/shapes-cls] [--unlabelled data/shapes-raw]

Writes DIR/train/images/*.png with DIR/train/masks/<stem>.png, DIR/val/... the same and
DIR/classes.txt (background, disc, square, triangle): one to three shapes of random colour, place
and size on a noisy gray background, so that only the shape tells the class. --classify also
writes the same images as class folders (DIR2/{train,val}/<class of the largest shape>/), for
`fcmae finetune`; --unlabelled the training images alone (for `fcmae pretrain`)."""
import argparse
import colorsys
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["background", "disc", "square", "triangle"]


def shapes_image(rng, size):
    """(RGB image, label map uint8, label of the largest shape) with one to three shapes."""
    image = Image.fromarray(rng.integers(100, 156, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    largest = (0, 1)
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.integers(1, len(CLASSES)))
        r = int(rng.integers(size // 8, size // 4))
        x, y = (int(v) for v in rng.integers(r, size - r, 2))
        colour = tuple(round(255 * v) for v in colorsys.hsv_to_rgb(*rng.uniform((0, 0.6, 0.7), (1, 1, 1))))
        box = [x - r, y - r, x + r, y + r]
        for draw, fill in ((ImageDraw.Draw(image), colour), (ImageDraw.Draw(mask), label)):
            if label == 1:
                draw.ellipse(box, fill=fill)
            elif label == 2:
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), (x, box[1])], fill=fill)
        largest = max(largest, (r, label))
    return image, mask, largest[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path)
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--val", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classify", type=Path, default=None, help="also write the images as class folders here")
    p.add_argument("--unlabelled", type=Path, default=None, help="also copy the training images alone here")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    for split, n in (("train", args.train), ("val", args.val)):
        for folder in ("images", "masks"):
            (args.output / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, mask, largest = shapes_image(rng, args.size)
            stem = f"{split}_{i:04d}"
            image.save(args.output / split / "images" / f"{stem}.png")
            mask.save(args.output / split / "masks" / f"{stem}.png")
            if args.classify:
                folder = args.classify / split / CLASSES[largest]
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{stem}.png")
            if args.unlabelled and split == "train":
                args.unlabelled.mkdir(parents=True, exist_ok=True)
                shutil.copy(args.output / split / "images" / f"{stem}.png", args.unlabelled)
    (args.output / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    print(f"wrote {args.train} train / {args.val} val pairs of {args.size} px to {args.output}"
          + (f", class folders to {args.classify}" if args.classify else "")
          + (f", unlabelled images to {args.unlabelled}" if args.unlabelled else ""))


if __name__ == "__main__":
    main()
