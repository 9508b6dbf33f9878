"""WebDataset shards: `fcmae shard` writes a folder's files as they are, and `fcmae pretrain
--data SHARDS` reads them from a folder, over HTTP or through a pipe, split across ranks and
workers, resumes exactly mid-epoch, and skips (or stops at) bad data naming shard and key.

Most tests identify samples by colour: image i is a flat colour whose red value is 4 * i, so a
view (any crop, flip and resize of it) says which sample it came from."""
import functools
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset.writer import TarWriter

from fcmae.cli import main
from fcmae.commands.pretrain import DEFAULT_MODEL, build_parser, fit
from fcmae.data.modules import PretrainData
from fcmae.data.reading import load_image
from fcmae.data.shards import EpochLoader, read_shard, write_shards
from fcmae.errors import UserError
from fcmae.training.flags import with_recipe

TINY = ["--input-size", "64", "--batch-size", "4", "--decoder-dim", "32", "--accelerator", "cpu", "--devices", "1",
        "--precision", "32", "--backend", "sparse", "--log-every", "1", "--vis-every", "1000", "--ckpt-every", "2",
        "--no-export"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Runs every test here with one compute thread (tests/conftest.py)."""


def coloured(i, size=40):
    return Image.fromarray(np.full((size, size + 8, 3), (4 * i, 200, 100), np.uint8))


def folder(root, n, classes=("cat", "dog")):
    """n flat-colour PNGs in class folders (ImageNet layout, train/), named with dots."""
    for i in range(n):
        path = root / "train" / classes[i % len(classes)] / f"img.{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        coloured(i).save(path)
    return root


def sample_ids(views):
    """(B, 3, S, S) uint8 views of flat-colour images, as the loader yields them -> their sample numbers."""
    red = views[:, 0].float()  # (B, S, S)
    return [round(r / 4) for r in red.mean(dim=(1, 2)).tolist()]


def shards_of(tmp_path, n=32, per_shard=4):
    write_shards(folder(tmp_path / "src", n), tmp_path / "shards", samples_per_shard=per_shard, progress=False)
    return tmp_path / "shards"


def views(data, batch_size=4, workers=0, rank=0, world=1, epoch=0, done=0, **kwargs):
    """The sample numbers one rank's loader yields in one epoch (after `done` batches), and the skipped counts."""
    pd = PretrainData(str(data), 64, batch_size=batch_size, workers=workers, **kwargs)
    pd.dataset.place(rank, world)
    loader = EpochLoader(pd.dataset, lambda: epoch, (epoch, done), batch_size=batch_size, drop_last=True,
                         num_workers=workers)
    ids, skipped = [], 0
    for view, mask, skip in loader:
        assert view.shape == (batch_size, 3, 64, 64) and mask.shape == (batch_size, 2, 2)
        ids += sample_ids(view)
        skipped += int(skip.sum())
    return ids, skipped


# ----------------------------------------------------------------------------- writing

def test_shards_hold_the_folders_files_as_they_are(tmp_path, capsys):
    src = folder(tmp_path / "src", 10)
    main(["shard", str(src), str(tmp_path / "out"), "--samples-per-shard", "4"])
    assert "wrote 10 samples in 3 shards" in capsys.readouterr().out
    index = (tmp_path / "out" / "index.json").read_text()
    samples = [s for i in range(3) for s in read_shard(str(tmp_path / "out" / f"shard-{i:06d}.tar"))]
    assert len(samples) == 10 and '"samples": 10' in index and '"kind": "images"' in index
    for s in samples:
        cls, name = s["__key__"].split("/")
        path = src / "train" / cls / (name.replace("_", ".") + ".png")
        assert s["png"] == path.read_bytes()  # the original bytes, not re-encoded
        assert int(s["cls"]) == ["cat", "dog"].index(cls)
        assert np.array_equal(np.asarray(load_image(io.BytesIO(s["png"]))), np.asarray(load_image(path)))
    # the folder reads as the same samples, shards or not
    folder_views = PretrainData(str(src), 64).dataset
    from_folder = sample_ids(torch.stack([folder_views[k][0] for k in range(10)]))
    assert sorted(views(tmp_path / "out", batch_size=2)[0]) == sorted(from_folder) == list(range(10))


def test_a_rerun_continues_or_rewrites_cleanly(tmp_path):
    src = folder(tmp_path / "src", 10)
    write_shards(src, tmp_path / "out", samples_per_shard=4, progress=False)
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    # a run killed while writing shard 1: shard 0 whole, shard 1 half-written under its temporary name
    (tmp_path / "out" / "index.json").unlink()
    (tmp_path / "out" / "shard-000002.tar").unlink()
    (tmp_path / "out" / "shard-000001.tar").rename(tmp_path / "out" / "shard-000001.tar.tmp")
    (tmp_path / "out" / ".plan.json").write_text(
        f'{{"source": "{(src / "train").resolve()}", "files": 10, "counts": [4, 4, 2]}}')
    mtime = (tmp_path / "out" / "shard-000000.tar").stat().st_mtime_ns
    write_shards(src, tmp_path / "out", samples_per_shard=4, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == first  # no .tmp, no plan left
    assert (tmp_path / "out" / "shard-000000.tar").stat().st_mtime_ns == mtime  # kept, not rewritten
    write_shards(src, tmp_path / "out", samples_per_shard=6, progress=False)  # other options: starts over
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json", "shard-000000.tar",
                                                                    "shard-000001.tar"]


def test_max_size_bounds_each_shard(tmp_path):
    src = folder(tmp_path / "src", 12)
    write_shards(src, tmp_path / "out", max_size="20kB", progress=False)
    sizes = [p.stat().st_size for p in (tmp_path / "out").glob("shard-*.tar")]
    assert len(sizes) > 1 and max(sizes) <= 20_000


# ----------------------------------------------------------------------------- reading

def test_arrays_shard_and_read_back_with_their_channels(tmp_path):
    (tmp_path / "bands").mkdir()
    for i in range(4):
        np.save(tmp_path / "bands" / f"{i}.npy", np.full((5, 40, 40), i, np.float32))
    index = write_shards(tmp_path / "bands", tmp_path / "out", samples_per_shard=2, progress=False)
    assert (index["kind"], index["in_chans"], index["classes"]) == ("arrays", 5, None)
    data = PretrainData(str(tmp_path / "out"), 64, in_chans=5, batch_size=2, workers=0)
    batch = [v for v, m, s in data.dataset]
    assert all(v.shape == (5, 64, 64) for v in batch)
    assert sorted(round(v.mean().item()) for v in batch) == [0, 1, 2, 3]  # used as stored
    with pytest.raises(UserError, match="holds 5-channel arrays but --in-chans is 3: pass --in-chans 5"):
        PretrainData(str(tmp_path / "out"), 64, in_chans=3)



@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_see_disjoint_samples_covering_the_epoch(tmp_path, workers):
    """Two ranks (passed explicitly, as DDP would): 32 samples in 8 shards of 4, batch 4 -> 4 batches
    each; every sample once; a new epoch, a new order."""
    data = shards_of(tmp_path)
    ranks = [views(data, workers=workers, rank=r, world=2)[0] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 16
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == list(range(32))
    assert views(data, workers=workers, rank=0, world=2)[0] == ranks[0]  # deterministic
    assert views(data, workers=workers, rank=0, world=2, epoch=1)[0] != ranks[0]


def test_streams_over_http_and_pipes(tmp_path):
    data = shards_of(tmp_path, n=16)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(data))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000003}}.tar"
        local = views(data, workers=2)
        assert views(url, workers=2, samples_per_epoch=16) == local
    finally:
        server.shutdown()
        server.server_close()
    assert views(f"pipe:cat {data}/shard-{{000000..000003}}.tar", workers=2, samples_per_epoch=16) == local
    assert sorted(local[0]) == list(range(16))


def test_epoch_length_and_splits_are_checked(tmp_path):
    data = shards_of(tmp_path, n=8)  # 2 shards
    with pytest.raises(UserError, match="has no index.json .* --samples-per-epoch"):
        PretrainData(f"{data}/shard-{{000000..000001}}.tar", 64)
    with pytest.raises(UserError, match="--samples-per-epoch 9 but .* counts 8"):
        PretrainData(str(data), 64, samples_per_epoch=9)
    with pytest.raises(UserError, match="2 shards cannot be split over 1 ranks x 4 loader workers: need at least 4"):
        views(data, workers=4)
    # without an index, an epoch of --samples-per-epoch reads the shards again where it needs more
    ids, _ = views(f"{data}/shard-{{000000..000001}}.tar", samples_per_epoch=12, workers=2)
    assert len(ids) == 12 and set(ids) == set(range(8))


# ----------------------------------------------------------------------------- bad data

def bad_shards(tmp_path):
    """Two shards: the first holds samples 0-3, where sample 1's bytes do not decode and sample 2
    has no image; the second holds 4-7 but is truncated inside sample 6 (6 and 7 lost)."""
    out = tmp_path / "bad"
    out.mkdir()
    for s in range(2):
        buf = io.BytesIO()
        with TarWriter(buf, encoder=False) as tar:
            for i in range(4 * s, 4 * s + 4):
                png = io.BytesIO()
                coloured(i).save(png, "PNG")
                sample = {"__key__": f"s{i}", "png": png.getvalue()}
                if i == 1:
                    sample["png"] = b"not a png"
                if i == 2:
                    sample = {"__key__": "s2", "txt": b"a caption, no image"}
                tar.write(sample)
        data = buf.getvalue()
        if s == 1:
            members = tarfile.open(fileobj=io.BytesIO(data)).getmembers()
            data = data[:members[2].offset_data + 100]  # into sample 6's image
        (out / f"shard-{s:06d}.tar").write_bytes(data)
    return out


def test_bad_samples_are_skipped_named_and_counted(tmp_path, recwarn):
    # shuffle buffer 1: in shard order, so both bad samples come before sample 3
    ids, skipped = views(bad_shards(tmp_path) / "shard-000000.tar", batch_size=1, samples_per_epoch=2,
                         shuffle_buffer=1)
    assert ids == [0, 3] and skipped == 2
    warned = "\n".join(str(w.message) for w in recwarn)
    assert "shard-000000.tar key s1 (UnidentifiedImageError" in warned
    assert "shard-000000.tar key s2 (no image or .npy in the sample, only ['txt'])" in warned


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_shard_keeps_what_came_before(tmp_path, recwarn, workers):
    # an epoch of 3: samples 4 and 5, the truncation, then the shard again for the third
    ids, skipped = views(bad_shards(tmp_path) / "shard-000001.tar", batch_size=1, samples_per_epoch=3,
                         shuffle_buffer=1, workers=workers)
    assert ids == [4, 5, 4] and skipped == 1
    if workers == 0:  # (a worker's warnings go to pytest's recorder in the worker process)
        warned = "\n".join(str(w.message) for w in recwarn)
        assert "skipping unreadable sample " in warned and "shard-000001.tar (the rest of the shard: ReadError" in warned


def test_strict_data_stops_at_the_first_bad_sample(tmp_path):
    with pytest.raises(UserError, match="unreadable sample .*shard-000000.tar key s1 .* --strict-data"):
        views(bad_shards(tmp_path) / "shard-000000.tar", batch_size=1, samples_per_epoch=2, shuffle_buffer=1,
              strict=True)


# ----------------------------------------------------------------------------- training

def parse(*args):
    return build_parser().parse_args(with_recipe("pretrain", list(args), DEFAULT_MODEL))


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_resume_from_shards_matches_a_straight_run(tmp_path):
    """20 samples in 5 shards, batch 4, 2 workers: 5 steps per epoch. Stops mid-epoch (3), at the
    epoch's end (5), inside the next (8): the weights match one straight 8-step run."""
    write_shards(folder(tmp_path / "src", 20), tmp_path / "shards", samples_per_shard=4, progress=False)
    args = [*TINY, "--data", str(tmp_path / "shards"), "--workers", "2", "--shuffle-buffer", "3", "--lr", "1e-3",
            "--warmup-epochs", "0.5", "--epochs", "4"]
    _, straight = fit(parse(*args, "--max-steps", "8", "--output", str(tmp_path / "a")))
    for stop in (3, 5, 8):
        trainer, resumed = fit(parse(*args, "--max-steps", str(stop), "--output", str(tmp_path / "b")))
        assert trainer.global_step == stop
    a, b = weights(straight), weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    key = "model.encoder.stages.0.0.pwconv1.weight"
    torch.manual_seed(0)
    from fcmae.module import PretrainModule
    assert (a[key] - weights(PretrainModule(**straight.hparams))[key]).abs().max() > 1e-4


def test_a_resumed_loader_continues_the_interrupted_order(tmp_path):
    """Loader level, fast: after d batches, a new loader yields exactly the rest of the epoch."""
    data = shards_of(tmp_path, n=32)
    for workers in (0, 2, 3):
        full, _ = views(data, workers=workers, batch_size=2)
        for done in (1, 4, 7):
            rest, _ = views(data, workers=workers, batch_size=2, done=done)
            assert rest == full[2 * done:], (workers, done)


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_shards import TINY, parse, sample_ids
from fcmae.commands.pretrain import fit
out, data = sys.argv[1], sys.argv[3]
trainer, module = fit(parse(*TINY, "--devices", "2", "--strategy", "ddp", "--workers", "1", "--data", data,
                            "--max-steps", "2", "--lr", "1e-3", "--warmup-epochs", "0.01", "--output", out))
loader = trainer.datamodule.train_dataloader()  # this rank's share of an epoch (the next one)
ids = [i for view, mask, skipped in loader for i in sample_ids(view)]
torch.save({"ids": ids, "weights": module.state_dict(), "world": trainer.world_size},
           f"{out}/rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_two_process_ddp_ranks_read_disjoint_shards(tmp_path):
    import os
    import subprocess
    import sys
    data = shards_of(tmp_path, n=16)  # 4 shards for 2 ranks x 1 worker
    script = tmp_path / "ddp_shards.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), os.path.dirname(__file__), str(data)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    assert len(ranks[0]["ids"]) == len(ranks[1]["ids"]) == 8  # 16 samples / 2 ranks, 2 batches of 4 each
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == list(range(16))  # disjoint, covering the epoch
    a, b = (r["weights"] for r in ranks)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0


# ----------------------------------------------------------------------------- the faster loader

def test_the_faster_loader_makes_the_views_it_made_before(tmp_path):
    """JPEGs decode with torchvision (to a tensor) and views are normalized in one float pass:
    the same views as Pillow + ToDtype + Normalize, seeded alike (float rounding apart)."""
    from torchvision.transforms import InterpolationMode, v2

    from fcmae.data.sources import FileSamples
    from fcmae.data.transforms import ToFloat, normalization, pretrain_transform
    from fcmae.data.views import augment
    from fcmae.masking import random_mask
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.jpg", quality=90)
    norm = normalization(3, False)
    old = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(64, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC,
                                                         antialias=True),
                      v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(*norm)])
    samples = FileSamples(sorted(tmp_path.glob("*.jpg")), 3)
    for i in range(3):
        decoded, _ = samples[i]
        assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.uint8  # the fast decoder
        view, mask = augment(pretrain_transform(64), decoded, 2, 0.5, seed=i)
        view = ToFloat(norm)(view)  # on the device, in training
        torch.manual_seed(i)
        before = old(load_image(samples.paths[i]))
        assert (view - before).abs().max() < 1e-5
        assert torch.equal(mask, random_mask(1, 2, 2, 0.5)[0])  # drawn after the view, as before
    samples.paths[0].write_bytes(samples.paths[0].read_bytes()[:2000])  # truncated: still a bad file
    assert samples[0][1] == 1
