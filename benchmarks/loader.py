"""Pre-training loader throughput: views per second in ONE process (what each `--workers` process
makes), for a folder of JPEGs and for the same files as shards, before and after the faster path,
beside the decode-only rate of the same files (the bound: decoding alone takes that long).

    python benchmarks/loader.py                      # 200 generated 500x375 quality-90 JPEGs
    python benchmarks/loader.py --images 400 --rounds 5

A view is what the training loader makes of one file: decode, RandomResizedCrop 224 (scale 0.2-1,
bicubic, antialiased), horizontal flip, (before) to float and normalized, and its 60% mask.
- before: Pillow decodes (then a PIL -> tensor copy), the float conversion and normalization are
  two passes (v2.ToDtype + v2.Normalize), and each view's seed goes through torch.manual_seed:
  the loader as it was, kept here (`before`) to compare against;
- after: torchvision's decode_jpeg straight to a tensor (the same pixels), crop and resize on
  uint8, the view left uint8 (normalized on the training device: transforms.ToFloat), the CPU
  generator seeded alone (fcmae.data: reading.read_image, transforms.pretrain_transform,
  views.augment).
Rounds are interleaved and the median is reported, so load on the machine hits all rows alike.
Run single-threaded, as DataLoader workers are.
"""
import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2

import fcmae.data.shards as shards
import fcmae.data.sources as sources
import fcmae.data.views as views
from fcmae.data.reading import load_image
from fcmae.data.shards import ShardViews, write_shards
from fcmae.data.sources import DemoImages, FileSamples
from fcmae.data.transforms import normalization, pretrain_transform
from fcmae.data.views import MaskedViews
from fcmae.masking import random_mask

SIZE = 224


def make_jpegs(folder, n, seed=0):
    """ImageNet-like files: 500x375, quality 90, with shapes, gradients and sensor-like noise."""
    folder.mkdir(parents=True, exist_ok=True)
    demo, rng = DemoImages(num=n, size=500), np.random.default_rng(seed)
    for i in range(n):
        img = np.asarray(demo[i][0].resize((500, 375), Image.BICUBIC)).astype(np.int16)
        img = Image.fromarray((img + rng.integers(-10, 11, img.shape)).clip(0, 255).astype(np.uint8))
        img.filter(ImageFilter.GaussianBlur(0.7)).save(folder / f"{i:05d}.jpg", quality=90)
    return sorted(folder.iterdir())


def before_transform(size, norm):
    """The loader's transform before the speed-up."""
    return v2.Compose([v2.ToImage(),
                       v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC,
                                            antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(*norm)])


@contextlib.contextmanager
def before():
    """The loader before the speed-up: Pillow decodes every image, and each view is seeded with
    torch.manual_seed (which also queues a CUDA seed, with a stack trace, on every call)."""
    def pil(raw, mode="RGB", name="image"):
        return load_image(io.BytesIO(raw), mode, name)
    def augment(transform, sample, grid, mask_ratio, seed):  # seeded through torch.manual_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transform(sample), random_mask(1, grid, grid, mask_ratio)[0]
    with mock.patch.object(sources, "read_image", pil), mock.patch.object(shards, "read_image", pil), \
            mock.patch.object(views, "augment", augment), mock.patch.object(shards, "augment", augment):
        yield


def folder_views(paths, transform):
    dataset = MaskedViews(FileSamples(paths, 3), transform, SIZE, 0.6, seed=0)
    return lambda: [dataset.item(k) for k in range(len(paths))]


def shard_views(urls, n, transform):
    def run():
        ds = ShardViews(urls, n, "images", 3, transform, SIZE, 0.6, seed=0, batch_size=1, shuffle_buffer=100)
        return list(ds)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    norm = normalization(3, False)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp) / "jpegs", args.images)
        raw = [path.read_bytes() for path in paths]
        index = write_shards(Path(tmp) / "jpegs", Path(tmp) / "shards", samples_per_shard=50, progress=False)
        urls = [str(Path(tmp) / "shards" / s["name"]) for s in index["shards"]]
        n = len(paths)
        cases = {
            "decode only, Pillow": lambda: [Image.open(io.BytesIO(r)).convert("RGB") for r in raw],
            "decode only, torchvision decode_jpeg": lambda: [
                decode_jpeg(torch.frombuffer(bytearray(r), dtype=torch.uint8), mode=ImageReadMode.RGB) for r in raw],
            "folder, before": ("before", lambda: folder_views(paths, before_transform(SIZE, norm))),
            "folder, after": ("after", lambda: folder_views(paths, pretrain_transform(SIZE))),
            "shards, before": ("before", lambda: shard_views(urls, n, before_transform(SIZE, norm))),
            "shards, after": ("after", lambda: shard_views(urls, n, pretrain_transform(SIZE))),
        }
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, case in cases.items():
                if isinstance(case, tuple):
                    mode, build = case
                    with before() if mode == "before" else contextlib.nullcontext():
                        fn = build()
                        start = time.perf_counter()
                        fn()
                else:
                    start = time.perf_counter()
                    case()
                times[name].append(time.perf_counter() - start)
    rate = {name: n / statistics.median(t) for name, t in times.items()}
    kb = sum(len(r) for r in raw) / n / 1e3
    print(f"{n} JPEGs 500x375 q90 ({kb:.0f} kB each), one process, one thread, median of {args.rounds} rounds\n")
    print("| path | views/s | vs before | of decode_jpeg's rate |")
    print("|---|---:|---:|---:|")
    bound = rate["decode only, torchvision decode_jpeg"]
    for name, r in rate.items():
        base = rate.get(name.replace("after", "before")) if "after" in name else None
        speedup = f"{r / base:.2f}x" if base else ""
        print(f"| {name} | {r:.0f} | {speedup} | {r / bound:.0%} |")


if __name__ == "__main__":
    main()
