"""WebDataset shards: writing them from a data folder, and reading them for pre-training.

Writing (`write_shards`, the `fcmae shard` command): every sample's original file bytes go into
`shard-NNNNNN.tar` under their extension (`KEY.jpg`, `KEY.npy`, ...; no re-encoding), with its
class index as `KEY.cls` when the folder has class folders, and `index.json` lists the shards,
their sample counts and what they hold. Each shard is written to a temporary name, fsynced and
renamed, so a killed run leaves only whole shards; the plan (which file goes to which shard) is
a pure function of the folder and the size options, so a rerun keeps the shards already written
and writes the rest, or starts over when the options changed.

Reading (`ShardViews`, what pre-training's `data` SHARDS uses): SHARDS is a directory with
index.json, a brace pattern (`/data/shard-{000000..000099}.tar`) or URLs as WebDataset opens them
(`https://...`, `pipe:aws s3 cp s3://bucket/shard-{000000..000099}.tar -`). Per epoch:
- the shard list is permuted from (seed, epoch), split across ranks (`order[rank::world]`), then
  across loader workers (`[worker::workers]`): at least ranks x workers shards are needed, fewer
  is refused at the start (`need_shards`);
- each worker streams its shards, shuffles samples within a buffer drawn from (seed, epoch, rank,
  worker), and yields exactly its share of the epoch's batches; an epoch is `samples_per_epoch`
  samples (the index's total by default), drawn from every shard;
- a sample's augmentation and mask are drawn from (seed, epoch, key), as for folders.
A resumed loader continues exactly where the interrupted one stopped, for the same devices, batch
size, accumulation and workers (`start(epoch, batches_done)`; how: docs/internals.md).

Bad data: a sample whose image does not decode, a sample without an image, and a shard that cannot
be opened or ends early (truncated tar: the rest of it) are skipped with a warning naming the shard
and key, and counted in the batch's skipped count (`data/skipped`), or fatal with `strict`.
"""
import hashlib
import io
import json
import warnings
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator
from webdataset.writer import TarWriter

from fcmae.data.reading import (ARRAY_EXTENSIONS, MAX_SKIP, BadFile, BadFileWarning, holds_arrays, note_skipped,
                                read_array, read_image, reason)
from fcmae.data.views import MaskedView, augment
from fcmae.errors import SettingError
from fcmae.files import atomic_write, write_atomic
from fcmae.masking import PATCH_SIZE

INDEX = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
PLAN = ".plan.json"  # the write plan of an unfinished `fcmae shard`, to continue it on a rerun
IMAGE_EXTS = {e.lstrip(".") for e in IMG_EXTENSIONS}
SAMPLE_EXTS = IMAGE_EXTS | {e.lstrip(".") for e in ARRAY_EXTENSIONS}
TAR_OVERHEAD = 1024  # bytes per member beyond its data: a 512-byte header, padding to 512
TAR_END = 1024 + 10240  # two zero blocks end a tar, then padding to a 10 kB record


# ----------------------------------------------------------------------------- writing

def parse_size(text):
    """'1GB', '500MB', '64k', '1000' -> bytes."""
    units = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    s = str(text).strip().lower().removesuffix("b").removesuffix("i")
    number, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise SettingError(f"`max_size` '{text}' is not a size: pass e.g. 1GB, 500MB or 64kB") from None


def source_files(src):
    """A folder `fcmae pretrain` reads -> (files, class index of each or None, class names or None)."""
    from fcmae.data.sources import list_files
    root = Path(src).expanduser()
    if not root.is_dir():
        raise SettingError(f"source folder '{src}' does not exist: pass a folder of images or .npy files "
                           f"(DIR/train/<class>/<file>, DIR/<class>/<file> or DIR/<file>)")
    if (root / "train").is_dir():
        root = root / "train"
    listed = list_files(root)
    if not len(listed):
        raise SettingError(f"no images or .npy files in '{root}': expected DIR/train/<class>/<file>, "
                           f"DIR/<class>/<file> or files directly in DIR")
    holds_arrays(listed, f"'{src}'")  # one kind per folder
    paths = [listed[i] for i in range(len(listed))]  # writing shards is one pass: a plain list is fine
    if listed.classes is None:
        return root, paths, None, None
    return root, paths, listed.labels.tolist(), list(listed.classes)


def sample_key(root, path):
    """A WebDataset key from the file's path: the tar member is KEY.EXT, and WebDataset splits a
    member name at the first dot of its last component, so dots in the name become '_'."""
    rel = path.relative_to(root).with_suffix("")
    return "/".join(part.replace(".", "_") for part in rel.parts)


def plan_shards(sizes, max_size=None, samples_per_shard=None):
    """File sizes -> the number of files in each shard: at most `samples_per_shard` files, or
    files adding up to at most `max_size` bytes in the tar (at least one file per shard)."""
    counts, n, total = [], 0, 0
    for size in sizes:
        size += 2 * TAR_OVERHEAD  # the file and its cls member
        full = (n == samples_per_shard) if samples_per_shard else (n > 0 and total + size > max_size - TAR_END)
        if full:
            counts.append(n)
            n, total = 0, 0
        n, total = n + 1, total + size
    return counts + [n] if n else counts


def kind_and_chans(path):
    """('arrays', C) for .npy files, ('images', 3 or 1) for images (1 when the first is grayscale)."""
    if path.suffix.lower() in ARRAY_EXTENSIONS:
        return "arrays", read_array(path).shape[0]
    from PIL import Image
    with Image.open(path) as img:
        return "images", 1 if img.mode in ("L", "1", "I", "I;16", "I;16B", "I;16L", "LA") else 3


def write_shards(src, out, max_size="1GB", samples_per_shard=None, progress=True):
    """Write SRC's files as shards in OUT; returns the index (a dict, also OUT/index.json)."""
    from tqdm import tqdm
    if Path(out).exists() and not Path(out).is_dir():
        raise SettingError(f"`out` {out} is a file, not a folder: pass a folder for the shards (a new one, or the "
                           f"one an interrupted run was writing)")
    root, paths, labels, classes = source_files(src)
    try:
        kind, in_chans = kind_and_chans(paths[0])
    except (OSError, ValueError, BadFile) as e:
        raise SettingError(f"cannot read {paths[0]} ({e}): fix or remove it") from None
    if samples_per_shard is not None and samples_per_shard < 1:
        raise SettingError(f"`samples_per_shard` {samples_per_shard}: must be at least 1")
    limit = None if samples_per_shard else parse_size(max_size)
    counts = plan_shards([p.stat().st_size if p.exists() else 0 for p in paths], limit, samples_per_shard)
    plan = {"source": str(root.resolve()), "files": len(paths), "counts": counts}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index_path, plan_path = out / INDEX, out / PLAN
    done_before = plan_path.is_file() and json.loads(plan_path.read_text()) == plan
    if not done_before:  # a new plan: shards from another one are stale
        index_path.unlink(missing_ok=True)
        for old in out.glob("shard-*.tar*"):
            old.unlink()
        write_atomic(plan_path, json.dumps(plan))
    keys = [sample_key(root, p) for p in paths]
    if len(set(keys)) != len(keys):  # a.b.jpg and a_b.jpg: tell them apart by their position
        keys = [f"{k}_{i}" for i, k in enumerate(keys)]
    bar = tqdm(total=len(paths), unit="file", desc=f"shards -> {out}", disable=not progress)
    start = 0
    for s, n in enumerate(counts):
        path = out / SHARD_NAME.format(s)
        if not path.is_file():
            write_shard(path, paths[start:start + n], keys[start:start + n],
                        None if labels is None else labels[start:start + n])
        start += n
        bar.update(n)
    bar.close()
    index = {"format": "fcmae-shards", "kind": kind, "in_chans": in_chans, "samples": len(paths),
             "classes": classes, "shards": [{"name": SHARD_NAME.format(s), "samples": n} for s, n in enumerate(counts)]}
    write_atomic(index_path, json.dumps(index, indent=1))
    plan_path.unlink()
    return index


def write_shard(path, files, keys, labels):
    """One shard, atomically (fcmae/files.py)."""
    def write(tmp):
        with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0) as tar:  # mtime 0: same files, same bytes
            for i, (file, key) in enumerate(zip(files, keys)):
                try:
                    data = file.read_bytes()
                except OSError as e:  # copied as is otherwise: pretraining skips undecodable bytes
                    warnings.warn(f"skipping unreadable file {file} ({reason(e)})", BadFileWarning, stacklevel=2)
                    continue
                sample = {"__key__": key, file.suffix.lower().lstrip("."): data}
                if labels is not None:
                    sample["cls"] = str(labels[i]).encode()
                tar.write(sample)
    atomic_write(path, write)


# ----------------------------------------------------------------------------- reading

def is_shards(data):
    """Whether `--data` names shards rather than a folder or the demo."""
    data = str(data)
    return (data.startswith(("pipe:", "http://", "https://", "gs://", "s3://")) or ".tar" in data
            or (Path(data).expanduser() / INDEX).is_file())


def resolve_shards(data, samples_per_epoch=None):
    """`--data` -> (shard URLs, samples per epoch, index or None)."""
    root = Path(str(data)).expanduser()
    if (root / INDEX).is_file():
        index = json.loads((root / INDEX).read_text())
        urls = [str(root / s["name"]) for s in index["shards"]]
        if samples_per_epoch is not None and samples_per_epoch != index["samples"]:
            raise SettingError(f"`samples_per_epoch` {samples_per_epoch} but {root / INDEX} counts {index['samples']} "
                               f"samples: drop `samples_per_epoch` (the index gives the epoch length)")
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise SettingError(f"{missing[0]} is listed in {root / INDEX} but missing ({len(missing)} shards missing): "
                               f"rerun fcmae shard to finish writing them")
        return urls, index["samples"], index
    urls = list(braceexpand(str(data)))
    if samples_per_epoch is None:
        raise SettingError(f"`data` {data} has no {INDEX} to say how many samples it holds: pass `samples_per_epoch` N "
                           f"(the schedule needs the epoch length)")
    if samples_per_epoch < 1:
        raise SettingError(f"`samples_per_epoch` {samples_per_epoch}: must be at least 1")
    return urls, samples_per_epoch, None


def need_shards(shards, world, workers):
    """The one-line refusal when shards cannot be split across ranks x workers, else None."""
    readers = world * max(workers, 1)
    if shards >= readers:
        return None
    return (f"{shards} shards cannot be split over {world} ranks x {max(workers, 1)} loader workers: "
            f"need at least {readers} shards; rewrite them smaller (fcmae shard `samples_per_shard` N) or lower "
            f"`workers`")


def sample_seed(seed, epoch, key):
    """A 63-bit seed from (seed, epoch, key): the same sample gets the same view and mask in
    every process, run and worker count."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BadShard:
    """A stream item standing for what could not be read: a whole or the rest of a shard."""

    def __init__(self, message):
        self.message = message


def read_shard(url):
    """Samples of one shard ({'__key__', '__url__', ext: bytes, ...}), then a BadShard if it
    cannot be opened, ends early or its pipe command fails. Samples read before a failure are
    kept, the one being read too (without the failed member: if that was its image, it is then
    skipped as a sample without one)."""
    stream, error, sample = None, None, None
    try:
        stream = gopen(url)
        for member in tar_file_iterator(stream):  # tarfile in stream mode: reads as it goes
            key, ext = base_plus_ext(member["fname"])
            if key is None:
                continue
            if sample is not None and key != sample["__key__"]:
                yield sample
                sample = None
            sample = sample or {"__key__": key, "__url__": url}
            sample[ext.lower()] = member["data"]
    except Exception as e:  # tarfile, gopen and pipe errors: all mean the rest of the shard is lost
        error = e
    finally:
        if stream is not None:
            try:
                stream.close()  # a pipe: waits for its command; a non-zero exit raises
            except Exception as e:
                error = error or e
    # not reached when the reader stops early (GeneratorExit)
    if sample is not None:
        yield sample
    if error is not None:
        yield BadShard(f"{url} (the rest of the shard: {reason(error)})")


def shuffle(items, size, rng):
    """Items in an order shuffled within a buffer of `size`."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def decode(sample, kind, in_chans):
    """A raw sample -> PIL image or (C, H, W) tensor; BadFile names the shard and key."""
    name = f"{sample['__url__']} key {sample['__key__']}"
    ext = next((e for e in sample if e in SAMPLE_EXTS), None)
    if ext is None:
        found = sorted(e for e in sample if not e.startswith("__"))
        raise BadFile(f"{name} (no image or .npy in the sample, only {found})")
    if ext == "npy":
        if kind != "arrays":
            raise SettingError(f"{name} is a .npy array but `data` is read as images: pass `in_chans` C (the arrays' "
                               f"channels), or write the shards with fcmae shard so that index.json says what they "
                               f"hold")
        return read_array(io.BytesIO(sample[ext]), in_chans, name=name)
    return read_image(sample[ext], "L" if in_chans == 1 else "RGB", name)


class ShardViews(IterableDataset):
    """Shards -> this loader worker's (view (C, S, S), mask (S/32, S/32), samples skipped) for one
    epoch; `place` says which rank it is and `start` where the epoch starts (module docstring)."""

    def __init__(self, urls, samples, kind, in_chans, transform, input_size, mask_ratio, seed, batch_size,
                 shuffle_buffer=1000, strict=False):
        self.urls, self.samples, self.kind, self.in_chans = urls, samples, kind, in_chans
        self.transform, self.grid, self.mask_ratio = transform, input_size // PATCH_SIZE, mask_ratio
        self.seed, self.batch_size, self.shuffle_buffer, self.strict = seed, batch_size, max(shuffle_buffer, 1), strict
        self.rank, self.world, self.epoch, self.batches_done = 0, 1, 0, 0

    def place(self, rank, world):
        self.rank, self.world = rank, world

    def start(self, epoch, batches_done=0):
        self.epoch, self.batches_done = epoch, batches_done

    def batches(self):
        """Full batches per rank per epoch."""
        return self.samples // self.world // self.batch_size

    def __len__(self):  # this rank's samples per epoch: the DataLoader's length
        return self.batches() * self.batch_size

    def shards(self, worker, workers):
        """This worker's shards this epoch: the epoch's permutation, split by rank then worker."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in order[self.rank::self.world][worker::workers]]

    def stream(self, shards, worker):
        """The worker's samples, shuffled within a buffer drawn from (seed, epoch, rank, worker); when
        they run out (a share larger than its shards), the shards again in a new order. The buffer
        empties at the end of each pass: a pass yields every sample once."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        while True:
            items = 0
            for item in shuffle(chain.from_iterable(map(read_shard, shards)), self.shuffle_buffer, rng):
                items += 1
                yield item
            if items == 0:
                raise SettingError(f"shards {shards[0]} ... hold no samples: check `data`")
            shards = [shards[i] for i in rng.permutation(len(shards))]

    def __iter__(self):
        info = get_worker_info()
        workers, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        refusal = need_shards(len(self.urls), self.world, workers)
        if refusal:
            raise SettingError(refusal)
        worker = (physical + self.batches_done) % workers  # this loader asks its worker 0 first
        total = len(range(worker, self.batches(), workers)) * self.batch_size
        skip = len(range(worker, self.batches_done, workers)) * self.batch_size
        good, skipped, in_row = 0, 0, 0
        if good == total:
            return
        for item in self.stream(self.shards(worker, workers), worker):
            try:
                if isinstance(item, BadShard):
                    raise BadFile(item.message)
                sample = decode(item, self.kind, self.in_chans)
            except BadFile as e:
                if self.strict:
                    raise SettingError(f"unreadable sample {e}: fix or remove it, or drop `strict_data` to skip "
                                       f"bad samples with a warning") from None
                in_row += 1
                if in_row > MAX_SKIP:
                    raise SettingError(f"{in_row} samples in a row cannot be read, the last {e}: check `data` "
                                       f"(the warnings name them)") from None
                if good >= skip:  # the interrupted run counted those before the resume point
                    note_skipped(e, "sample")
                    skipped += 1
                continue
            in_row = 0
            if good >= skip:
                view, mask = augment(self.transform, sample, self.grid, self.mask_ratio,
                                     sample_seed(self.seed, self.epoch, item["__key__"]))
                yield MaskedView(view, mask, skipped)
                skipped = 0
            good += 1
            if good == total:
                return

    def preview(self, n):
        """The first n readable samples of the first shards, as epoch 0 draws them."""
        views, masks = [], []
        for url in self.urls:
            for item in read_shard(url):
                if len(views) == n:
                    break
                try:
                    if not isinstance(item, BadShard):
                        view, mask = augment(self.transform, decode(item, self.kind, self.in_chans), self.grid,
                                             self.mask_ratio, sample_seed(self.seed, 0, item["__key__"]))
                        views.append(view)
                        masks.append(mask)
                except BadFile:
                    pass
            if len(views) == n:
                break
        return torch.stack(views), torch.stack(masks)


def open_shards(data, in_chans, samples_per_epoch, transform, input_size, mask_ratio, seed, batch_size,
                shuffle_buffer, strict):
    """`--data SHARDS` -> (ShardViews with the augmentation `transform`, whether it holds arrays)."""
    urls, samples, index = resolve_shards(data, samples_per_epoch)
    if index is not None:
        kind = index["kind"]
        if kind == "arrays" and index["in_chans"] != in_chans:
            raise SettingError(f"{data} holds {index['in_chans']}-channel arrays but `in_chans` is {in_chans}: "
                               f"pass `in_chans` {index['in_chans']}")
    else:  # without an index: arrays are what more or fewer than 3 (RGB) or 1 (gray) channels need
        kind = "images" if in_chans in (1, 3) else "arrays"
    views = ShardViews(urls, samples, kind, in_chans, transform, input_size, mask_ratio, seed,
                       batch_size, shuffle_buffer, strict)
    return views, kind == "arrays"


class EpochLoader(DataLoader):
    """A DataLoader over ShardViews that tells it, before each epoch's pass, which epoch it is
    and (once, after a resume) how many of its batches were trained on. Its workers are started
    per epoch (not persistent): they take the dataset's epoch with them."""

    def __init__(self, dataset, current_epoch, resume_at, **kwargs):
        super().__init__(dataset, persistent_workers=False, **kwargs)
        self.current_epoch, self.resume_at = current_epoch, resume_at

    def __iter__(self):
        epoch, done = self.current_epoch(), 0
        if self.resume_at is not None:
            start, batches = self.resume_at
            self.resume_at = None
            if start >= epoch:
                epoch, done = start, batches
        self.dataset.start(epoch, done)
        return super().__iter__()
