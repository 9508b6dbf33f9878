"""File lists that stay flat at millions of files, and a cache of folder listings.

Loader workers are forked, and a Python list of millions of paths is millions of objects: a
worker that reads an item writes to its reference count, so page by page the parent's shared
memory becomes a private copy in every worker (gigabytes per worker at ImageNet-22K scale).
`PathList` keeps the paths in numpy arrays instead (their bytes back to back, plus offsets, plus
labels): reading an item writes nothing shared, and the list pickles as three buffers.

Listing a folder of millions of files takes seconds to minutes; `cached_listing` keeps the
listing in a cache folder, valid while the folders it read are unchanged (adding, removing or
renaming a file changes its folder's modification time).
"""
import hashlib
import os
import time
import warnings
from array import array
from pathlib import Path

import numpy as np

from fcmae.errors import UserError
from fcmae.files import atomic_write

CACHE_VERSION = 1
# A folder modified this recently is not cached: a file added in the same clock tick as the
# listing would leave its modification time unchanged (coarse timestamps: NFS, FAT: 2 s).
RACY_NS = 2_000_000_000


class PathList:
    """Paths under `root`, stored relative to it as os.fsencode'd bytes in one uint8 buffer:
    `paths[i]` -> Path(root, relative path i). Optional `labels[i]` (int array) index `classes`."""

    def __init__(self, root, data, offsets, labels=None, classes=None):
        self.root = os.fspath(root)
        self.data = data  # (total bytes,) uint8
        self.offsets = offsets  # (n + 1,) int64: path i is data[offsets[i]:offsets[i + 1]]
        self.labels, self.classes = labels, classes

    @classmethod
    def from_paths(cls, paths, root="", labels=None, classes=None):
        """From path-like objects (relative to `root`; with root "" stored as given)."""
        encoded = [os.fsencode(p) for p in paths]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        data = np.frombuffer(b"".join(encoded), np.uint8).copy()  # writable, owns its memory
        return cls(root, data, offsets, None if labels is None else np.asarray(labels), classes)

    def __len__(self):
        return len(self.offsets) - 1

    def relative(self, i):
        """Path i relative to root, as a str."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        i %= n
        return os.fsdecode(self.data[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def __getitem__(self, i):
        return Path(self.root, self.relative(i))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        return f"PathList({len(self)} paths under {self.root!r}, {self.data.nbytes} bytes)"

    def has_suffix(self, suffix):
        """(n,) bool: whether Path(path i).suffix.lower() == suffix (an ASCII suffix like ".npy"),
        for all paths at once instead of decoding each one."""
        pattern = np.frombuffer(suffix.lower().encode(), np.uint8)
        k = len(pattern)
        starts, ends = self.offsets[:-1], self.offsets[1:]
        # pathlib: the name must be longer than its suffix (".npy" alone has none)
        match = ends - starts > k
        name_start = np.zeros_like(match)
        name_start[match] = self.data[ends[match] - k - 1] == ord("/")
        match &= ~name_start
        for j in range(k):
            at = ends[match] - k + j
            byte = self.data[at]
            byte = np.where((byte >= ord("A")) & (byte <= ord("Z")), byte + 32, byte)  # ASCII lower()
            match[match] = byte == pattern[j]
        return match


# ----------------------------------------------------------------------------- listing folders

class Listing:
    """Collects the files of a folder tree (relative to `root`, with labels) and every folder read,
    each with its (mtime, ctime, inode) taken before reading it: a later change shows."""

    def __init__(self, root):
        self.root = os.fspath(root)
        self.data, self.ends, self.labels = bytearray(), array("q"), array("q")
        self.dirs, self.stats = [], []  # relative folder names; (mtime_ns, ctime_ns, inode)
        self.classes = None
        self.started = time.time_ns()

    def read_dir(self, rel):
        """The os.DirEntry list of folder `rel` ("" for root), or None when it cannot be read
        (skipped without a word, as os.walk does)."""
        path = os.path.join(self.root, rel) if rel else self.root
        try:
            st = os.stat(path)
        except OSError:
            self.dirs.append(rel), self.stats.append((-1, -1, 0))
            return None
        self.dirs.append(rel), self.stats.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        try:
            with os.scandir(path) as entries:
                return list(entries)
        except OSError:
            return None

    def add(self, rel, label=0):
        self.data += os.fsencode(rel)
        self.ends.append(len(self.data))
        self.labels.append(label)

    def add_classes(self, class_to_idx, extensions, allow_empty):
        """torchvision's make_dataset, without a list of tuples: every file under each class
        folder (`add_tree`), labelled with its class index. An empty class is a
        FileNotFoundError with torchvision's message unless `allow_empty`."""
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        found_any = set()
        for name in sorted(class_to_idx):
            if os.path.isdir(os.path.join(self.root, name)) and \
                    self.add_tree(name, lambda file: file.lower().endswith(extensions), class_to_idx[name]):
                found_any.add(name)
        empty = set(class_to_idx) - found_any
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}. "
                                    f"Supported extensions are: {', '.join(extensions)}")

    def add_tree(self, top, match, label=0):
        """Every file under folder `top` ("" for root), recursively, following symlinks (folders
        and files in sorted order, as os.walk's sorted), whose name `match(name)` accepts,
        labelled `label`. Returns how many."""
        found, stack = [], [top]
        while stack:  # every folder below `top`
            rel = stack.pop()
            entries = self.read_dir(rel)
            if entries is None:
                continue
            files = sorted(e.name for e in entries if not is_dir(e) and match(e.name))
            found.append((rel, files))
            stack.extend(os.path.join(rel, e.name) for e in entries if is_dir(e))
        count = 0
        for rel, files in sorted(found):  # os.walk's folders, sorted by path
            for file in files:
                self.add(os.path.join(rel, file), label)
            count += len(files)
        return count

    def result(self):
        offsets = np.zeros(len(self.ends) + 1, np.int64)
        offsets[1:] = np.frombuffer(self.ends, np.int64)
        labels = None
        if self.classes is not None:
            labels = np.frombuffer(self.labels, np.int64).astype(label_dtype(len(self.classes)))
        return PathList(self.root, np.frombuffer(self.data, np.uint8).copy(), offsets, labels, self.classes)


def is_dir(entry):
    try:
        return entry.is_dir()  # follows symlinks, like os.walk and pathlib
    except OSError:
        return False


def label_dtype(num_classes):
    return np.int16 if num_classes <= np.iinfo(np.int16).max + 1 else np.int32


def list_classes(root, extensions, cache=None):
    """The files of the class folders under `root` (torchvision's ImageFolder rules: labels =
    index of the sorted class folder name; no class folder or an empty one is a FileNotFoundError
    with torchvision's message), as a PathList with labels and classes."""
    from torchvision.datasets.folder import find_classes

    def scan(listing):
        listing.read_dir("")  # the root's time: a class folder added or removed changes it
        _, class_to_idx = find_classes(listing.root)
        listing.add_classes(class_to_idx, extensions, allow_empty=False)
    return cached_listing(root, f"classes:{','.join(extensions)}", scan, cache)


# ----------------------------------------------------------------------------- the cache

def default_cache():
    """~/.cache/fcmae/listings (or under $XDG_CACHE_HOME): shared by every run on this machine."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fcmae" / "listings"


def cached_listing(root, kind, scan, cache=None):
    """scan(listing) fills a `Listing` of `root`; its PathList is kept in folder `cache` (None:
    no cache) under a name from the absolute root path and `kind` (what was listed, e.g. the
    extensions), and loaded instead of scanning again while every folder the scan read keeps its
    modification time, change time and inode. A cache file that is stale, unreadable or corrupt
    is replaced; one that cannot be written is a warning."""
    root = os.fspath(root)
    if cache is None:
        listing = Listing(root)
        scan(listing)
        return listing.result()
    absolute = os.path.abspath(root)
    name = hashlib.sha256(f"{absolute}\0{kind}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
    file = Path(cache) / f"{name}.npz"
    paths = load_listing(file, root, absolute, kind)
    if paths is not None:
        return paths
    listing = Listing(root)
    scan(listing)
    paths = listing.result()
    recent = any(mtime > listing.started - RACY_NS for mtime, _, _ in listing.stats)
    if not recent:
        save_listing(file, paths, listing, absolute, kind)
    return paths


def encode(text):
    return np.frombuffer(os.fsencode(text), np.uint8)


def save_listing(file, paths, listing, absolute, kind):
    dirs = PathList.from_paths(listing.dirs)
    stats = np.array(listing.stats, np.int64).reshape(-1, 3)
    arrays = dict(version=np.int64(CACHE_VERSION), root=encode(absolute), kind=encode(kind),
                  data=paths.data, offsets=paths.offsets, dir_data=dirs.data, dir_offsets=dirs.offsets,
                  dir_times=stats[:, :2], dir_inodes=np.array([s[2] for s in listing.stats], np.uint64))
    if paths.classes is not None:
        classes = PathList.from_paths(paths.classes)
        arrays.update(labels=paths.labels, class_data=classes.data, class_offsets=classes.offsets)
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    try:  # one temporary name per process: DDP ranks may list the same folder at once
        atomic_write(file, write, tmp=file.with_name(f".{file.name}.{os.getpid()}.tmp"))
    except (UserError, OSError) as e:  # a cache that cannot be written costs a slower next start, nothing else
        warnings.warn(f"cannot write the file listing cache {file} ({e}): the folder is listed again at the "
                      f"next start", stacklevel=3)


def load_listing(file, root, absolute, kind):
    """The cached PathList (rooted at `root` as the caller spells it), or None when there is no
    valid one. Never unpickles: the file holds plain arrays only."""
    try:
        with np.load(file, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 (any damage to a disposable cache file means: list again)
        return None
    try:
        if (int(a["version"]) != CACHE_VERSION or a["root"].tobytes() != os.fsencode(absolute)
                or a["kind"].tobytes() != os.fsencode(kind)):
            return None
        if not (valid_offsets(a["offsets"], a["data"]) and valid_offsets(a["dir_offsets"], a["dir_data"])):
            return None
        dirs = PathList(absolute, a["dir_data"], a["dir_offsets"])
        times, inodes = a["dir_times"], a["dir_inodes"]
        if times.shape != (len(dirs), 2) or inodes.shape != (len(dirs),):
            return None
        for i in range(len(dirs)):
            rel = dirs.relative(i)
            try:
                st = os.stat(os.path.join(absolute, rel) if rel else absolute)
                now = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            except OSError:
                now = (-1, -1, 0)
            if now != (int(times[i, 0]), int(times[i, 1]), int(inodes[i])):
                return None
        labels = classes = None
        if "labels" in a:
            if not valid_offsets(a["class_offsets"], a["class_data"]):
                return None
            names = PathList("", a["class_data"], a["class_offsets"])
            classes = [names.relative(i) for i in range(len(names))]
            labels = a["labels"]
            n = len(a["offsets"]) - 1
            if labels.shape != (n,) or labels.dtype.kind != "i":
                return None
            if n and not 0 <= labels.min() <= labels.max() < len(classes):
                return None
        return PathList(root, a["data"], a["offsets"], labels, classes)
    except (KeyError, ValueError, TypeError, IndexError):
        return None


def valid_offsets(offsets, data):
    return (offsets.ndim == 1 and offsets.dtype == np.int64 and data.ndim == 1 and data.dtype == np.uint8
            and len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == len(data)
            and bool(np.all(offsets[1:] >= offsets[:-1])))
