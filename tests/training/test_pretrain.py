"""`fcmae pretrain`: recipes and overrides, data formats, bad input, the optimizer, and short
end-to-end runs on CPU (atto at 64x64 with a 32-dim decoder, a few steps each)."""
import os
from importlib.resources import files

import numpy as np
import pytest
import torch
import yaml
from helpers import PRETRAIN_TINY, parse_pretrain as parse, warmup_cosine, weights
from PIL import Image

from fcmae.commands.pretrain import DEFAULT_MODEL, DEMO, fit, resolve
from fcmae.data.modules import PretrainData, ResumableSampler
from fcmae.encoders import SIZES
from fcmae.errors import UserError
from fcmae.module import PretrainModule
from fcmae.training.callbacks import AtomicCheckpointIO
from fcmae.training.pretrain import reconstruction_grid

TINY = PRETRAIN_TINY  # a run small enough for 2 shared CPU cores (tests/helpers.py)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Runs every test here with one compute thread (tests/conftest.py)."""


def image_folder(root, n, size=48, mode="RGB"):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / f"{i:03d}.png")
    return root


# ----------------------------------------------------------------------------- configuration

def test_every_size_has_the_paper_recipe():
    for size in SIZES:
        cfg = parse("--model", size)
        assert cfg.model == size
        assert (cfg.blr, cfg.epochs, cfg.warmup_epochs, cfg.mask_ratio) == (1.5e-4, 1600, 40, 0.6)
        assert (cfg.weight_decay, tuple(cfg.betas), cfg.input_size, cfg.norm_pix_loss) == (0.05, (0.9, 0.95), 224, True)
        assert (cfg.decoder_dim, cfg.decoder_depth) == (512, 1)
    assert files("fcmae.configs").joinpath("pretrain", "huge.yaml").is_file()


def test_flags_override_the_recipe_and_demo_shortens_the_schedule(tmp_path):
    base = resolve(parse("--model", "base", "--data", str(tmp_path)))
    assert (base.epochs, base.input_size, base.batch_size) == (1600, 224, 64)  # paper recipe on real data
    assert base.output == "runs/base"
    demo = resolve(parse())  # no --data: the demo, with its short schedule
    assert demo.data == "demo" and demo.model == DEFAULT_MODEL and demo.output == f"runs/{DEFAULT_MODEL}-demo"
    assert all(demo[k] == v for k, v in DEMO.items())
    mine = resolve(parse("--epochs", "3", "--batch-size", "7", "--no-norm-pix-loss"))
    assert (mine.epochs, mine.batch_size, mine.norm_pix_loss) == (3, 7, False)  # flags still win
    assert mine.input_size == DEMO["input_size"]


def test_dry_run_counts_devices_nodes_and_accumulation(capsys):
    fit(parse(*TINY, "--devices", "2", "--num-nodes", "3", "--accumulate", "5", "--blr", "1e-3",
              "--output", "unused", "--dry-run"))
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["world_size"] == 6 and resolved["effective_batch"] == 4 * 6 * 5
    assert resolved["lr"] == pytest.approx(1e-3 * 120 / 256)
    # 1024 demo images / 6 ranks / batch 4 = 42 batches per rank -> ceil(42 / 5) optimizer steps
    assert resolved["steps_per_epoch"] == 9
    assert resolved["total_steps"] == 9 * resolved["epochs"]
    assert resolved["backend"] == "sparse" and resolved["precision"] == "32"


def test_cli_prints_the_recipe_and_reports_errors_in_one_line(capsys):
    from fcmae.cli import main
    with pytest.raises(SystemExit) as exit:
        main(["pretrain", "--model", "base", "--data", "/data/imagenet", "--epochs", "800", "--print_config"])
    assert exit.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["model"], printed["batch_size"], printed["epochs"], printed["blr"]) == ("base", 64, 800, 1.5e-4)
    with pytest.raises(SystemExit) as exit:
        main(["pretrain", *TINY, "--input-size", "100", "--output", "unused", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and err.startswith("fcmae: error: --input-size 100") and "\n" not in err


@pytest.mark.parametrize("args, message", [
    (["--input-size", "100"], "multiple of 32"),
    (["--data", "/no/such/dir"], "does not exist"),
    (["--batch-size", "5000"], "fewer than one batch"),
    (["--in-chans", "4"], "--in-chans 1 or 3"),
    (["--input-size", "32"], "no visible patch"),
    (["--strategy", "fsdp"], "needs CUDA GPUs"),
])
def test_bad_input_is_one_clear_error(args, message):
    with pytest.raises(UserError, match=message):
        fit(parse(*TINY, "--output", "unused", "--dry-run", *args))


def test_bad_data_folders(tmp_path):
    with pytest.raises(UserError, match="no images"):
        PretrainData(str(image_folder(tmp_path / "empty", 0)), 64)
    with pytest.raises(UserError, match="needs .npy"):
        PretrainData(str(image_folder(tmp_path / "rgb", 2)), 64, in_chans=4)
    np.save(tmp_path / "rgb" / "x.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(UserError, match="mixes"):
        PretrainData(str(tmp_path / "rgb"), 64)
    (tmp_path / "arr").mkdir()
    np.save(tmp_path / "arr" / "x.npy", np.zeros((5, 8, 8), np.float32))
    with pytest.raises(UserError, match="--in-chans 5"):
        PretrainData(str(tmp_path / "arr"), 64, in_chans=4)


def test_resume_refuses_a_run_of_another_model(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"loops": {}, "hyper_parameters": {"model": "base", "in_chans": 3}}, ckpt)
    with pytest.raises(UserError, match="model=base"):
        fit(parse(*TINY, "--output", str(tmp_path), "--dry-run"))
    fit(parse(*TINY, "--output", str(tmp_path), "--dry-run", "--no-resume"))  # fine: starts over
    torch.save({"model": {}}, tmp_path / "release.pth")
    with pytest.raises(UserError, match="not a Lightning checkpoint"):
        fit(parse(*TINY, "--output", str(tmp_path), "--dry-run", "--resume", str(tmp_path / "release.pth")))


# ----------------------------------------------------------------------------- data

def test_data_layouts_and_channels(tmp_path):
    imagenet = tmp_path / "imagenet"
    for cls in ("n01", "n02"):
        image_folder(imagenet / "train" / cls, 3)
    image_folder(imagenet / "val" / "n01", 5)  # never read by pre-training
    assert len(PretrainData(str(imagenet), 64).dataset) == 6
    flat = PretrainData(str(image_folder(tmp_path / "flat", 4)), 64, mask_ratio=0.75)
    view, mask = flat.dataset[1]
    assert view.shape == (3, 64, 64) and view.dtype == torch.uint8  # to the device as bytes
    assert flat.to_float(view).dtype == torch.float32
    assert mask.shape == (2, 2) and mask.sum() == 3  # 4 patches, int(4 * 0.25) = 1 visible
    gray = PretrainData(str(image_folder(tmp_path / "gray", 2, mode="L")), 64, in_chans=1)
    assert gray.dataset[0][0].shape == (1, 64, 64)
    (tmp_path / "bands").mkdir()
    np.save(tmp_path / "bands" / "a.npy", np.full((5, 40, 40), 255, np.uint8))  # uint8 -> [0, 1]
    bands = PretrainData(str(tmp_path / "bands"), 64, in_chans=5)
    assert bands.dataset[0][0].shape == (5, 64, 64) and torch.allclose(bands.dataset[0][0], torch.ones(1))
    assert bands.dataset[0][0].dtype == torch.float32 and torch.equal(bands.to_float(bands.dataset[0][0]),
                                                                       bands.dataset[0][0])  # arrays: as stored
    demo = PretrainData("demo", 64)
    a, b = demo.dataset[7], demo.dataset[7]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # a pure function of (seed, key)
    assert not torch.equal(demo.dataset[7][0], demo.dataset[7 + len(demo.dataset)][0])  # new epoch, new view


def test_sampler_shards_and_resumes_mid_epoch():
    ranks = [list(ResumableSampler(10, 2, r, seed=3)) for r in range(2)]
    assert len(set(ranks[0]) | set(ranks[1])) == 10 and not set(ranks[0]) & set(ranks[1])
    s = ResumableSampler(10, 2, 1, seed=3)
    s.set_epoch(4)
    full = list(s)
    s.skip = 2
    assert list(s) == full[2:] and list(s) == full  # skip applies to one pass only
    assert all(k // 10 == 4 for k in full)  # keys carry the epoch


# ----------------------------------------------------------------------------- optimization

def test_weight_decay_groups_and_schedule():
    module = PretrainModule(model={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}, input_size=64, decoder_dim=16,
                            lr=1.0)
    opt = module.make_optimizer()
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in module.named_parameters():
        excluded = name.endswith((".bias", "grn.gamma", "grn.beta")) or p.ndim == 1
        assert (id(p) in decay) != excluded, name
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.defaults["fused"]  # fcmae.optim.adamw on CPU
    assert [warmup_cosine(s, 10, 110) for s in (0, 5, 10, 60, 110, 200)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0])


def test_reconstruction_keeps_visible_patches():
    from fcmae.model import FCMAE
    model = FCMAE({"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}, img_size=64, decoder_dim=16).eval()
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[[1.0, 0], [1, 1]], [[0, 1], [1, 1]]])
    grid = reconstruction_grid(model, imgs, mask, norm=((0.5,) * 3, (0.25,) * 3))
    assert grid.shape == (3, 2 + 3 * 66, 2 + 2 * 66)  # 3 rows x 2 images, 2-px padding
    original, recon = grid[:, 2:66, 2:66], grid[:, 2 + 2 * 66:4 * 66, 2:66]  # image 0, rows 1 and 3
    visible = (slice(None), slice(0, 32), slice(32, 64))  # its visible patch: top right
    assert torch.allclose(original[visible], recon[visible])
    assert not torch.allclose(original[:, :32, :32], recon[:, :32, :32])


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(Exception):  # a save that dies half-way: the lambda cannot be pickled
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "bad": lambda: 0}, path)
    assert torch.load(path)["step"] == 1 and os.listdir(tmp_path) == ["last.ckpt"]


# ----------------------------------------------------------------------------- end to end

def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc, [e.value for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_run_directory_and_falling_loss(tmp_path):
    out = tmp_path / "run"
    trainer, module = fit(parse(*TINY, "--input-size", "96", "--batch-size", "8", "--max-steps", "30", "--lr", "3e-3",
                                "--warmup-epochs", "0.05", "--vis-every", "15", "--ckpt-every", "100",
                                "--output", str(out), "--export"))
    assert trainer.global_step == 30
    acc, loss = scalars(out, "train/loss")
    assert len(loss) == 30 and np.mean(loss[-6:]) < np.mean(loss[:6]) - 0.05
    for tag in ("train/lr", "train/grad_norm", "train/images_per_sec"):
        assert len(scalars(out, tag)[1]) > 0, tag
    assert [e.step for e in acc.Images("reconstruction")] == [15, 30]
    assert sorted(os.listdir(out / "reconstructions")) == ["step0000015.png", "step0000030.png"]
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "encoder.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["total_steps"] == 128 * DEMO["epochs"]


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_channels_last_trains_and_exports(tmp_path, monkeypatch, backend):
    from lightning.pytorch.callbacks import Callback

    from fcmae.training.pretrain import PretrainTask

    class Formats(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen = {name: p.is_contiguous(memory_format=torch.channels_last)
                         for name, p in pl_module.named_parameters() if p.ndim == 4}
    formats, callbacks = Formats(), PretrainTask.callbacks
    monkeypatch.setattr(PretrainTask, "callbacks", lambda self, *a: [*callbacks(self, *a), formats])
    trainer, module = fit(parse(*TINY, "--backend", backend, "--channels-last", "--max-steps", "2", "--export",
                                "--output", str(tmp_path)))
    assert formats.seen and all(formats.seen.values())  # every convolution weight, while training
    assert trainer.global_step == 2 and all(torch.isfinite(p).all() for p in module.parameters())
    assert (tmp_path / "encoder.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("extra, stops", [([], [3, 3, 6]), (["--accumulate", "2"], [2, 3, 5])],
                         ids=["mid-epoch", "epoch-end"])
def test_resume_matches_a_straight_run(tmp_path, extra, stops):
    """Stopping after N steps and rerunning the command with a larger --max-steps ends with the
    same weights as one straight run: same data order, augmentations, masks, lr schedule and
    optimizer state. mid-epoch: demo data, 256 steps per epoch; the second run of the 3-step
    command finds the run finished and must leave it resumable. epoch-end: 20 images / batch 4 /
    accumulate 2 = 3 steps per epoch (the last accumulates a single batch): stops mid-epoch (2),
    at the epoch's end (3), then inside the next epoch (5)."""
    data = ["--data", str(image_folder(tmp_path / "images", 20))] if extra else []
    args = [*TINY, *data, *extra, "--lr", "1e-3", "--warmup-epochs", "0.5", "--epochs", "4"]
    _, straight = fit(parse(*args, "--max-steps", str(stops[-1]), "--output", str(tmp_path / "a")))
    for stop in stops:
        trainer, resumed = fit(parse(*args, "--max-steps", str(stop), "--output", str(tmp_path / "b")))
        assert trainer.global_step == stop
    a, b = weights(straight), weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6  # tolerance: float32 round-off
    torch.manual_seed(0)  # the run's seed: the initial weights
    init = weights(PretrainModule(**straight.hparams))
    key = "model.encoder.stages.0.0.pwconv1.weight"
    assert (a[key] - init[key]).abs().max() > 1e-4  # and training did move the weights
    trainer, _ = fit(parse(*args, "--max-steps", str(stops[-1]), "--output", str(tmp_path / "b")))
    assert trainer.global_step == stops[-1]  # a finished run stays finished
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stops[-1]


def test_reconstruction_preview_is_spread_over_the_classes(tmp_path):
    for c in range(4):  # 4 class folders of 5 images: the first 8 files would be classes 0 and 1 only
        image_folder(tmp_path / f"class{c}", 5, size=64)
    data = PretrainData(str(tmp_path), input_size=64, batch_size=4, workers=0)
    keys = data.preview_keys(8)
    paths = data.dataset.source.paths
    assert sorted({paths[k].parent.name for k in keys}) == ["class0", "class1", "class2", "class3"]
    assert len(set(keys)) == 8
    views, masks = data.preview(8)
    again, masks_again = data.preview(8)  # fixed across the run: grids stay comparable over time
    assert torch.equal(views, again) and torch.equal(masks, masks_again)
    assert torch.equal(views[1], data.to_float(data.dataset[keys[1]][0]))  # normalized as training batches are
    small = PretrainData(str(tmp_path / "class0"), input_size=64, batch_size=4, workers=0)
    assert small.preview_keys(8) == [0, 1, 2, 3, 4]  # fewer samples than the grid: all of them
