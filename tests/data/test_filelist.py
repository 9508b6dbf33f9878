"""Flat file lists (fcmae/data/filelist.py): exact round trips, the same listing as torchvision's
ImageFolder, a listing cache that is reused only while the folders are unchanged, and datasets
that pickle as a few buffers instead of millions of objects."""
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fcmae.data import filelist, labelled as ft_data
from fcmae.data.filelist import PathList, list_classes
from fcmae.data.reading import ARRAY_EXTENSIONS
from fcmae.data.sources import FileSamples, list_files

NAMES = ["plain.jpg", "with space.png", "ünïcödé 猫.JPEG", "emoji 🐈.webp", "semi;colon,comma.tif"]
COUNT = 3 * len(NAMES) + 2 + len(NAMES) + 2  # the files of tree(): a, b, c (+2 nested), d_link -> c


def tree(root):
    """Class folders with awkward names, a nested subfolder, a symlinked folder, files that are
    not images, and an upper-case extension."""
    for cls in ("b class", "a_ü", "c"):
        for name in NAMES:
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / name).touch()
    (root / "c" / "deep" / "er").mkdir(parents=True)
    (root / "c" / "deep" / "er" / "x.PNG").touch()
    (root / "c" / "deep" / "notes.txt").touch()
    (root / "c" / "deep z").mkdir()
    (root / "c" / "deep z" / "y.bmp").touch()
    os.symlink(root / "c", root / "d_link")
    return root


def age(root, seconds=60):
    """Make every folder look modified a minute ago (folders touched within RACY_NS are not cached)."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def test_paths_round_trip_exactly(tmp_path):
    rel = [f"{cls}/{name}" for cls in ("a", "sub dir/nested", "ü") for name in NAMES]
    rel.append(os.fsdecode(b"raw-\xff-bytes.jpg"))  # not UTF-8: Linux allows it, fsencode keeps it
    paths = PathList.from_paths(rel, root=tmp_path)
    assert len(paths) == len(rel) and paths.data.dtype == np.uint8
    assert [paths.relative(i) for i in range(len(rel))] == rel
    assert list(paths) == [tmp_path / r for r in rel] and paths[-1] == tmp_path / rel[-1]
    with pytest.raises(IndexError):
        paths[len(rel)]
    back = pickle.loads(pickle.dumps(paths))
    assert list(back) == list(paths)


def test_suffix_test_matches_pathlib():
    names = ["a.npy", "a.NPY", "b.npy.png", ".npy", "dir/.npy", "dir.npy/x", "..npy", "x.npyz", "npy", "ü.Npy"]
    paths = PathList.from_paths(names)
    assert paths.has_suffix(".npy").tolist() == [Path(n).suffix.lower() == ".npy" for n in names]


def test_class_folders_are_listed_as_torchvision_does(tmp_path):
    root = tree(tmp_path / "data")
    paths = list_classes(root, IMG_EXTENSIONS)
    classes, class_to_idx = find_classes(root)
    expected = make_dataset(str(root), class_to_idx, IMG_EXTENSIONS)
    assert [(str(p), int(label)) for p, label in zip(paths, paths.labels)] == expected
    assert paths.classes == classes and len(paths) == COUNT
    # pre-training: the same files, labels unused, images and arrays
    everything = make_dataset(str(root), class_to_idx, IMG_EXTENSIONS + ARRAY_EXTENSIONS)
    assert [str(p) for p in list_files(root)] == [p for p, _ in everything]


def test_an_empty_class_folder_is_torchvision_error(tmp_path):
    root = tree(tmp_path / "data")
    (root / "e empty").mkdir()
    with pytest.raises(FileNotFoundError) as ours:
        list_classes(root, IMG_EXTENSIONS)
    with pytest.raises(FileNotFoundError) as theirs:
        make_dataset(str(root), find_classes(root)[1], IMG_EXTENSIONS)
    assert str(ours.value) == str(theirs.value)
    assert len(list_files(root)) == COUNT  # pre-training allows empty classes


def test_the_cache_is_reused_while_nothing_changes(tmp_path, monkeypatch):
    root, cache = tree(tmp_path / "data"), tmp_path / "cache"
    age(root)
    first = list_classes(root, IMG_EXTENSIONS, cache)
    (file,) = cache.glob("*.npz")
    scans = []
    monkeypatch.setattr(filelist.Listing, "read_dir", lambda self, rel: scans.append(rel))
    again = list_classes(root, IMG_EXTENSIONS, cache)  # from the cache: no folder read
    assert scans == [] and list(again) == list(first) and again.classes == first.classes
    assert np.array_equal(again.labels, first.labels)
    # a different spelling of the same root: same cache file, paths spelled as the caller does
    monkeypatch.chdir(tmp_path)
    relative = list_classes("data", IMG_EXTENSIONS, cache)
    assert scans == [] and str(relative[0]).startswith("data/") and len(list(cache.glob("*.npz"))) == 1


@pytest.mark.parametrize("change", ["add", "remove", "add_nested", "add_class", "move_root"])
def test_the_cache_is_rebuilt_when_a_folder_changes(tmp_path, change):
    root, cache = tree(tmp_path / "data"), tmp_path / "cache"
    age(root)
    before = [str(p) for p in list_classes(root, IMG_EXTENSIONS, cache)]
    if change == "add":
        (root / "a_ü" / "new.jpg").touch()
    elif change == "remove":
        (root / "a_ü" / NAMES[0]).unlink()
    elif change == "add_nested":
        (root / "c" / "deep" / "er" / "new.jpg").touch()
    elif change == "add_class":
        (root / "z").mkdir()
        (root / "z" / "new.jpg").touch()
    else:
        root = root.rename(tmp_path / "moved")
    after = list_classes(root, IMG_EXTENSIONS, cache)
    want = make_dataset(str(root), find_classes(root)[1], IMG_EXTENSIONS)
    assert [(str(p), int(label)) for p, label in zip(after, after.labels)] == want
    assert [str(p) for p in after] != before


def test_a_recently_changed_folder_is_listed_but_not_cached(tmp_path):
    root, cache = tree(tmp_path / "data"), tmp_path / "cache"
    assert len(list_classes(root, IMG_EXTENSIONS, cache)) > 0
    assert not list(cache.glob("*.npz"))  # a file added in the same clock tick could go unseen
    age(root)
    list_classes(root, IMG_EXTENSIONS, cache)
    assert len(list(cache.glob("*.npz"))) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "bad_offsets", "bad_labels", "pickle"])
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path, damage):
    root, cache = tree(tmp_path / "data"), tmp_path / "cache"
    age(root)
    good = [str(p) for p in list_classes(root, IMG_EXTENSIONS, cache)]
    (file,) = cache.glob("*.npz")
    intact = file.read_bytes()
    if damage == "garbage":
        file.write_bytes(b"not a zip file" * 10)
    elif damage == "truncated":
        file.write_bytes(intact[: len(intact) // 2])
    elif damage == "empty":
        file.write_bytes(b"")
    else:
        with np.load(file) as z:
            arrays = dict(z)
        if damage == "bad_offsets":
            arrays["offsets"] = arrays["offsets"][::-1].copy()
        elif damage == "bad_labels":
            arrays["labels"] = arrays["labels"] + 100
        else:  # an object array: loading it would unpickle, which we never do
            arrays["labels"] = np.array([object()] * len(arrays["labels"]), dtype=object)
        with open(file, "wb") as f:
            np.savez(f, **arrays)
    again = list_classes(root, IMG_EXTENSIONS, cache)
    assert [str(p) for p in again] == good
    assert file.read_bytes() == intact  # rewritten
    assert not list(cache.glob(".*.tmp"))


def test_an_unwritable_cache_is_a_warning(tmp_path):
    root = tree(tmp_path / "data")
    age(root)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="cannot write the file listing cache"):
        paths = list_classes(root, IMG_EXTENSIONS, tmp_path / "cache")
    assert len(paths) == COUNT


def test_datasets_pickle_as_buffers_not_objects(tmp_path):
    rel = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(100_000)]
    samples = FileSamples(PathList.from_paths(rel, root=tmp_path), 3)
    buffers = samples.paths.data.nbytes + samples.paths.offsets.nbytes
    size = len(pickle.dumps(samples))
    assert buffers <= size < buffers * 1.01 + 10_000  # the buffers, not 100k objects


def test_image_folder_keeps_imagefolder_attributes(tmp_path):
    root = tmp_path / "d"
    tree(root / "train")
    data = ft_data.image_folder(root, "train", None, cache=tmp_path / "cache")
    classes, class_to_idx = find_classes(root / "train")
    assert data.classes == classes and data.class_to_idx == class_to_idx
    assert isinstance(data.targets, np.ndarray) and data.targets.tolist() == [
        label for _, label in make_dataset(str(root / "train"), class_to_idx, IMG_EXTENSIONS)]
    assert len(pickle.dumps(data)) < 10_000


def test_a_flat_folder_listing_is_cached_and_rebuilt(tmp_path):
    root, cache = tmp_path / "flat", tmp_path / "cache"
    root.mkdir()
    for name in ("b.png", "a.JPG", ".png", "notes.txt", "x.npy"):
        (root / name).touch()
    (root / "sub").mkdir()  # a folder beside flat files: read too (the tree, whole)
    (root / "sub" / "c.png").touch()
    age(root)
    # pathlib: ".png" has no suffix
    assert [str(p.relative_to(root)) for p in list_files(root, cache)] == ["a.JPG", "b.png", "x.npy", "sub/c.png"]
    assert [str(p.relative_to(root)) for p in list_files(root, cache)] == ["a.JPG", "b.png", "x.npy", "sub/c.png"]
    (root / "c.tif").touch()
    assert [p.name for p in list_files(root, cache)] == ["a.JPG", "b.png", "c.tif", "x.npy", "c.png"]
