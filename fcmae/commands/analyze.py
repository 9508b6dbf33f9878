"""`fcmae analyze`: feature collapse per layer, the ConvNeXt V2 paper's analysis.

    fcmae analyze --checkpoint runs/atto-demo --random-init --data DIR --output analysis/

For every block, the feature cosine distance (fcmae.features.cosine_distance) of its MLP
expansion layer (the 4C channels after GELU, where GRN acts) and of its output, averaged over
--images images spread over DIR's classes. Higher means more diverse channels; values near 0 mean
redundant or collapsed channels. Writes distances.csv / .json, collapse.png (distance against
normalized layer index, one line per encoder) and activations.png (64 channels of one expansion
layer for one image: dead channels show dark, saturated ones flat bright).
"""
import csv
import io
import json
import time
from collections import defaultdict
from itertools import zip_longest
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import ArgumentParser
from torch.utils.data import DataLoader, Dataset
from fcmae.checkpoints import size_name
from fcmae.data.labelled import check_in_chans
from fcmae.data.reading import ARRAY_EXTENSIONS, holds_arrays, load_image, read_array, read_or_skip
from fcmae.data.sources import list_files
from fcmae.data.transforms import eval_transform
from fcmae.encoders import SIZES
from fcmae.errors import UserError
from fcmae.features import cosine_distance, load_encoder, pick_device
from fcmae.files import save_figure, write_atomic
from fcmae.masking import PATCH_SIZE, check_input_size
from fcmae.rundir import is_last, run_dir_of


def build_parser():
    p = ArgumentParser(prog="fcmae analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", type=str, default=None,
                   help="weights to analyze (repeat for several): a run directory, .ckpt, export or release checkpoint")
    p.add_argument("--random-init", action="store_true", help="also analyze a randomly initialized --model")
    p.add_argument("--model", type=Optional[Literal[tuple(SIZES)]], default=None,
                   help="size for --random-init (default: the first checkpoint's architecture, else atto)")
    p.add_argument("--in-chans", type=int, default=3, help="input channels for --random-init without --checkpoint")
    p.add_argument("--data", type=str, required=True,
                   help="images: DIR/val/<class>/..., DIR/train/<class>/..., DIR/<class>/... or a flat folder")
    p.add_argument("--images", type=int, default=1000, help="images to average over, spread over the classes")
    p.add_argument("--input-size", type=Optional[int], default=None,
                   help=f"eval crop side in pixels, a multiple of {PATCH_SIZE} (default: the first checkpoint's training "
                        "size, "
                        "else 224)")
    p.add_argument("--layer", type=Optional[str], default=None,
                   help="STAGE.BLOCK whose expansion layer activations.png shows (default: the middle block of stage 2, "
                        "0-based: the third stage)")
    p.add_argument("--output", type=str, default="analysis", help="folder for the table and the plots")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--device", type=str, default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="for --random-init")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a torch file that needs full unpickling: runs code from the file, so only for files you trust")
    return p


# ----------------------------------------------------------------------------- images

def pick_images(data, n):
    """Up to n image (or .npy) files of `data`, taken round-robin over its class folders (val/
    first, else train/, else the folder itself), so even a small n covers many classes."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise UserError(f"--data {data} is not a directory: pass a folder of images or of class folders")
    for split in ("val", "train"):
        if (root / split).is_dir():
            root = root / split
            break
    listed = list_files(root)
    if not len(listed):
        raise UserError(f"no images in {root}: pass a folder of images or of class folders (jpg, png, ..., or .npy)")
    try:
        holds_arrays(listed, f"--data {data}")
    except UserError as e:
        raise UserError(str(e)) from None
    paths = list(listed)
    by_class = defaultdict(list)
    for p in paths:
        by_class[p.parent].append(p)
    spread = [p for group in zip_longest(*by_class.values()) for p in group if p is not None]
    return spread[:n]


class Images(Dataset):
    """Image or .npy files through an eval transform: index -> (image, files skipped)."""

    def __init__(self, paths, transform, in_chans):
        self.paths, self.transform, self.in_chans = paths, transform, in_chans

    def __len__(self):
        return len(self.paths)

    def read(self, i):
        path = self.paths[i]
        if path.suffix.lower() in ARRAY_EXTENSIONS:
            return self.transform(read_array(path, self.in_chans))
        return self.transform(load_image(path, "RGB" if self.in_chans == 3 else "L"))

    def __getitem__(self, i):
        return read_or_skip(self.read, i, len(self), lambda j: self.paths[j])


# ----------------------------------------------------------------------------- measurement

def blocks(encoder):
    """[("STAGE.BLOCK", block)] in depth order."""
    return [(f"{s}.{b}", block) for s, stage in enumerate(encoder.stages) for b, block in enumerate(stage)]


@torch.inference_mode()
def layer_distances(encoder, loader, device="cpu"):
    """{"S.B": {"expansion": mean distance, "output": mean distance}} over the loader's images.
    Forward hooks reduce each activation to one number per image at once: nothing is kept."""
    sums = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
    hooks = []
    for name, block in blocks(encoder):
        def on_act(module, args, out, name=name):  # out (N, H, W, 4C), channels last
            sums[name, "expansion"] += cosine_distance(out.permute(0, 3, 1, 2)).sum().double().cpu()

        def on_block(module, args, out, name=name):  # out (N, C, H, W)
            sums[name, "output"] += cosine_distance(out).sum().double().cpu()
        hooks += [block.act.register_forward_hook(on_act), block.register_forward_hook(on_block)]
    count = 0
    try:
        for imgs, _ in loader:
            encoder.forward_features(imgs.to(device))
            count += imgs.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return {name: {kind: sums[name, kind].item() / count for kind in ("expansion", "output")}
            for name, _ in blocks(encoder)}


@torch.inference_mode()
def expansion_maps(encoder, image, layer, channels=64):
    """The first `channels` expansion-layer maps (channels, H, W) of block `layer` for one image (C, H, W)."""
    found = dict(blocks(encoder))
    if layer not in found:
        raise UserError(f"--layer {layer}: no such block; pass STAGE.BLOCK from 0.0 to {blocks(encoder)[-1][0]}")
    maps = []
    hook = found[layer].act.register_forward_hook(lambda m, a, out: maps.append(out[0].permute(2, 0, 1)))
    try:
        encoder.forward_features(image[None])
    finally:
        hook.remove()
    return maps[0][:channels].float().cpu()


# ----------------------------------------------------------------------------- output

def table(results):
    """Rows for the CSV and the printed table: one per (encoder, block)."""
    rows = []
    for label, per_block in results.items():
        n = len(per_block)
        for i, (name, d) in enumerate(per_block.items()):
            rows.append({"encoder": label, "block": name, "layer_index": round(i / max(n - 1, 1), 4),
                         "expansion": round(d["expansion"], 4), "output": round(d["output"], 4)})
    return rows


def print_table(results):
    labels = list(results)
    names = list(dict.fromkeys(name for per_block in results.values() for name in per_block))  # encoders may differ
    print("feature cosine distance per block (expansion layer / block output), higher = more diverse")
    print(f"{'block':>6}  " + "  ".join(f"{label[:24]:>24}" for label in labels))
    for name in names:
        cells = [f"{results[lb][name]['expansion']:.3f} / {results[lb][name]['output']:.3f}" if name in results[lb]
                 else "" for lb in labels]
        print(f"{name:>6}  " + "  ".join(f"{c:>24}" for c in cells))
    means = [[sum(d[k] for d in results[lb].values()) / len(results[lb]) for k in ("expansion", "output")]
             for lb in labels]
    print(f"{'mean':>6}  " + "  ".join(f"{f'{e:.3f} / {o:.3f}':>24}" for e, o in means))


def plot_distances(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind, title in zip(axes, ("expansion", "output"), ("MLP expansion layer (after GELU)", "block output")):
        for label, per_block in results.items():
            n = len(per_block)
            ax.plot([i / max(n - 1, 1) for i in range(n)], [d[kind] for d in per_block.values()], marker=".", label=label)
        ax.set(title=title, xlabel="normalized layer index", xlim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("feature cosine distance")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def plot_maps(maps, layer, path):
    """One 8x8 grid per encoder; each grid on its own shared scale, so a dead channel is dark and
    a saturated one uniformly bright next to the others."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid
    fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4.3), squeeze=False)
    for ax, (label, m) in zip(axes[0], maps.items()):
        m = (m - m.min()) / (m.max() - m.min() + 1e-8)  # (64, H, W) in [0, 1]
        grid = make_grid(m[:, None], nrow=8, padding=1, pad_value=1.0)[0]
        ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{label}\nblock {layer}, {m.shape[0]} expansion channels", fontsize=8)
        ax.axis("off")
    save_figure(fig, path)
    plt.close(fig)


def labels_for(checkpoints):
    """Short distinct names: the run directory's or file's name, with a number when repeated."""
    out = []
    for c in checkpoints:
        p = Path(c)
        name = run_dir_of(p).name if is_last(p) and not p.is_dir() else p.name
        out.append(name if name not in out else f"{name} ({len(out) + 1})")
    return out


def run(cfg):
    analyze(cfg)


def analyze(cfg):
    """`fcmae analyze`; returns the JSON record."""
    checkpoints = cfg.checkpoint or []
    if not checkpoints and not cfg.random_init:
        raise UserError("nothing to analyze: pass --checkpoint FILE_OR_RUN_DIR (repeatable) and/or --random-init")
    if cfg.images < 1:
        raise UserError(f"--images {cfg.images}: must be at least 1 (the paper uses 1000)")
    device = pick_device(cfg.device)
    encoders, trained_sizes = {}, []
    for label, c in zip(labels_for(checkpoints), checkpoints):
        encoders[label], _, meta = load_encoder(c, False, None, None, trust=cfg.trust_checkpoint)
        trained_sizes.append(meta.get("trained_input_size"))
    input_size = cfg.input_size or next((s for s in trained_sizes if s), None) or 224
    check_input_size(input_size)
    if cfg.random_init:  # by default the first checkpoint's architecture: the same layers, untrained
        first = next(iter(encoders.values()), None)
        model = cfg.model or (({"depths": list(first.depths), "dims": list(first.dims)}) if first else "atto")
        in_chans = first.in_chans if first and not cfg.model else cfg.in_chans
        name = model if isinstance(model, str) else (
            size_name(model["depths"], model["dims"]) or "dims " + "-".join(map(str, model["dims"])))
        encoders[f"random init ({name})"] = load_encoder(None, True, model, in_chans, cfg.seed)[0]
    in_chans = {e.in_chans for e in encoders.values()}
    if len(in_chans) > 1:
        raise UserError(f"the encoders take different input channels ({sorted(in_chans)}): analyze them separately")
    in_chans = in_chans.pop()
    check_in_chans(in_chans, cfg.data)

    paths = pick_images(cfg.data, cfg.images)
    dataset = Images(paths, eval_transform(input_size, in_chans), in_chans)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers)
    results, seconds = {}, {}
    for label, encoder in encoders.items():
        start = time.perf_counter()
        results[label] = layer_distances(encoder.to(device), loader, device)
        seconds[label] = time.perf_counter() - start
        print(f"{label}: {len(dataset)} images in {seconds[label]:.1f}s "
              f"({1000 * seconds[label] / len(dataset):.0f}s per 1000 images)", flush=True)

    first = next(iter(encoders.values()))
    layer = cfg.layer or f"2.{first.depths[2] // 2}"
    image = dataset[0][0].to(device)
    maps = {label: expansion_maps(e, image, layer) for label, e in encoders.items()}

    out = Path(cfg.output)
    rows = table(results)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "distances.csv", buf.getvalue())
    record = {"data": cfg.data, "images": len(dataset), "input_size": input_size, "layer": layer,
              "encoders": {label: {"checkpoint": c, "seconds": round(seconds[label], 2), "blocks": results[label]}
                           for label, c in zip_longest(encoders, checkpoints)}}
    write_atomic(out / "distances.json", json.dumps(record, indent=2) + "\n")
    plot_distances(results, out / "collapse.png")
    plot_maps(maps, layer, out / "activations.png")
    print_table(results)
    print(f"wrote {out / 'distances.csv'}, distances.json, collapse.png, activations.png (block {layer})")
    return record
