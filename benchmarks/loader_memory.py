"""Loader worker memory at millions of files: the file list as a Python list of Paths (what
FileSamples kept) against the flat PathList (fcmae/data/filelist.py), and how long listing takes.

    python benchmarks/loader_memory.py                  # memory table, 2M paths, 4 workers (~2 min on 2 cores)
    python benchmarks/loader_memory.py --listing        # time listing 1000 x 1281 empty files, cold and cached

Memory: a dataset of N synthetic paths (n<class>/n<class>_<i>.JPEG; the files need not exist)
whose reads go to 8 real 16x16 PNGs (index % 8), read like FileSamples does: look the path up,
hand it to the opener (which takes os.fspath of it), decode. 4 forked DataLoader workers draw a
random sample order, as training does. Per worker, from /proc/<pid>/smaps_rollup: RSS, PSS
(shared pages split among the processes sharing them) and USS (private pages), once the first
batch has arrived and again after `--samples` samples; then again after the lookups of the rest
of the epoch. Those lookups are what copies the list into a worker (each touched object's
reference count is written, and its page with it); the image reads they come with do not
change the list's pages, so the sweep does the lookups of the whole epoch without decoding 2M
images (it would take an hour here).
"""
import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from fcmae.data.filelist import PathList
from fcmae.data.reading import load_image
from fcmae.data.sources import list_files

SWEEP = 1 << 40  # sample keys from here on are sweep tasks, not samples
SWEEP_TASKS = 2048  # an epoch's lookups in this many tasks: 32 batches of 64, shared by the workers


class Samples(Dataset):
    """index -> (16x16 image tensor, 0); `paths` a list of Paths (old) or a PathList (new)."""

    def __init__(self, paths, real):
        self.paths, self.real = paths, real
        self.chunk = -(-len(paths) // SWEEP_TASKS)  # path lookups per sweep task

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        if key >= SWEEP:
            return self.sweep(key - SWEEP)
        path = self.paths[key]
        os.fspath(path)  # what Image.open(path) does with it
        image = load_image(self.real[key % len(self.real)])  # the synthetic paths do not exist
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), 0

    def sweep(self, task):
        """The path lookups of `chunk` random samples (an epoch is SWEEP_TASKS tasks)."""
        rng = np.random.default_rng(task)
        for i in rng.integers(0, len(self.paths), self.chunk).tolist():
            os.fspath(self.paths[i])
        return torch.zeros(3, 16, 16, dtype=torch.uint8), 0


class Keys(Sampler):
    """A random order of `samples` keys, or (after `sweep()`) the sweep tasks of one epoch."""

    def __init__(self, size, samples):
        self.size, self.samples, self.tasks = size, samples, 0

    def __iter__(self):
        if self.tasks:
            return iter(range(SWEEP, SWEEP + self.tasks))
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(0))[:self.samples].tolist())

    def __len__(self):
        return self.tasks or self.samples


def memory(pid):
    """(RSS, PSS, USS) of a process in MB, from /proc/<pid>/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return fields["Rss"], fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]


def measure(paths, real, samples, batch_size, workers):
    """Per worker: memory once started, after `samples` samples, after the epoch's lookups."""
    keys = Keys(len(paths), samples)
    loader = DataLoader(Samples(paths, real), batch_size=batch_size, sampler=keys, num_workers=workers,
                        multiprocessing_context="fork", persistent_workers=True)
    it = iter(loader)
    next(it)
    pids = [w.pid for w in it._workers]  # the worker processes (DataLoader keeps them here)
    start = [memory(p) for p in pids]
    t = time.perf_counter()
    for _ in it:
        pass
    read_s = time.perf_counter() - t
    after = [memory(p) for p in pids]
    keys.tasks = SWEEP_TASKS
    t = time.perf_counter()
    for _ in loader:  # the same workers (persistent), now sweeping
        pass
    sweep_s = time.perf_counter() - t
    epoch = [memory(p) for p in pids]
    del it, loader
    return start, after, epoch, read_s, sweep_s


def synthetic(n, classes=1000):
    return [f"n{i % classes:08d}/n{i % classes:08d}_{i}.JPEG" for i in range(n)]


def memory_table(args):
    tmp = Path(tempfile.mkdtemp(prefix="loader_memory_"))
    try:
        rng = np.random.default_rng(0)
        real = []
        for i in range(8):
            real.append(str(tmp / f"{i}.png"))
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(real[-1])
        root = Path("/data/imagenet/train")  # never read: the reads go to `real`
        rows = []
        # new first, so that the old list's millions of objects are not yet in the parent
        for name in ("new: PathList", "old: list of Path"):
            rel = synthetic(args.files)
            t = time.perf_counter()
            paths = PathList.from_paths(rel, root=root) if name.startswith("new") else [root / r for r in rel]
            build_s = time.perf_counter() - t
            del rel
            gc.collect()
            start, after, epoch, read_s, sweep_s = measure(paths, real, args.samples, args.batch_size, args.workers)
            rows.append((name, build_s, start, after, epoch, read_s, sweep_s))
            print(f"{name}: built in {build_s:.1f} s, {args.samples} samples in {read_s:.1f} s, "
                  f"epoch lookups in {sweep_s:.1f} s", file=sys.stderr)
            del paths
            gc.collect()
    finally:
        shutil.rmtree(tmp)
    print(f"\n{args.files:,} paths, {args.workers} forked workers, batch {args.batch_size}; "
          f"growth per worker in MB (RSS / PSS / USS) from the first batch to:\n")
    print(f"| list | worker | after {args.samples:,} samples | after the epoch's lookups |")
    print("|---|---|---|---|")
    for name, _, start, after, epoch, _, _ in rows:
        for w, (s, a, e) in enumerate(zip(start, after, epoch)):
            grow = lambda x: " / ".join(f"{x[k] - s[k]:+.0f}" for k in range(3))  # noqa: E731
            print(f"| {name} | {w} | {grow(a)} | {grow(e)} |")


def listing_times(args):
    tmp = Path(tempfile.mkdtemp(prefix="listing_"))
    try:
        t = time.perf_counter()
        for c in range(args.classes):
            folder = tmp / "train" / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(args.per_class):
                os.close(os.open(folder / f"n{c:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
        print(f"created {args.classes * args.per_class:,} empty files in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
        past = time.time() - 60  # as a dataset copied a while ago (just-modified folders are not cached)
        for folder, _, _ in os.walk(tmp):
            os.utime(folder, (past, past))
        cache = tmp / "cache"
        for what in ("listing (no cache)", "listing, writing the cache", "loading the cache"):
            t = time.perf_counter()
            paths = list_files(tmp / "train", None if what.endswith("(no cache)") else cache)
            print(f"{what}: {len(paths):,} files in {time.perf_counter() - t:.2f} s")
        (file,) = cache.glob("*.npz")
        print(f"cache file: {file.stat().st_size / 2**20:.0f} MB; list in memory: "
              f"{(paths.data.nbytes + paths.offsets.nbytes + paths.labels.nbytes) / 2**20:.0f} MB")
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
        t = time.perf_counter()
        old = [Path(p) for p, _ in make_dataset(str(tmp / "train"), find_classes(tmp / "train")[1], IMG_EXTENSIONS)]
        print(f"before (torchvision make_dataset + Paths): {len(old):,} files in {time.perf_counter() - t:.2f} s")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2_000_000)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--listing", action="store_true", help="time listing a folder instead")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=1281)
    args = parser.parse_args()
    torch.set_num_threads(1)
    listing_times(args) if args.listing else memory_table(args)
