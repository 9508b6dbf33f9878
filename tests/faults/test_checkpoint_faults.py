"""Fault catalog, checkpoints and runs: bad checkpoint files are one clear error wherever they
are given; a kill during a save or mid-epoch loses at most the checkpoint interval; a non-finite
loss stops the run with the last good checkpoint kept; a full disk is one line, previous
checkpoint intact."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import warmup_cosine

from fcmae.commands.pretrain import fit
from fcmae.model import FCMAE
from fcmae.training.callbacks import AtomicCheckpointIO

from .conftest import FINETUNE, PRETRAIN, checkpoint_step, error_line, labeled_folder, run_command

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    """A last.ckpt of a 2-step tiny run, as `fcmae pretrain` writes it."""
    from fcmae.commands.pretrain import build_parser
    from fcmae.training.flags import with_recipe
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fit(build_parser().parse_args(with_recipe("pretrain", [*PRETRAIN, "--max-steps", "2", "--output", str(out)], "atto")))
    torch.set_num_threads(threads)
    return out / "checkpoints" / "last.ckpt"


def bad_checkpoint(kind, real, folder):
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":  # the first half of a real last.ckpt
        data = real.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "foreign dict":
        torch.save({"step": 3, "weights": torch.zeros(4)}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(4), path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "text", "foreign dict", "tensor"])
@pytest.mark.parametrize("where", ["pretrain --resume", "pretrain auto-resume", "export", "finetune --pretrained",
                                   "finetune --resume", "eval"])
def test_a_bad_checkpoint_file_is_one_clear_error(fcmae, real_checkpoint, tmp_path, kind, where):
    path = bad_checkpoint(kind, real_checkpoint, tmp_path)
    run, data = tmp_path / "run", labeled_folder(tmp_path / "data")
    pretrain = ["pretrain", *PRETRAIN, "--dry-run", "--output", run]
    if where == "pretrain --resume":
        argv = [*pretrain, "--resume", path]
    elif where == "pretrain auto-resume":
        (run / "checkpoints").mkdir(parents=True)
        path = path.rename(run / "checkpoints" / "last.ckpt")
        argv = pretrain
    elif where == "export":
        argv = ["export", path, "--output", tmp_path / "encoder.safetensors"]
    elif where == "finetune --pretrained":
        argv = ["finetune", *FINETUNE, "--data", data, "--pretrained", path, "--output", run]
    elif where == "finetune --resume":
        argv = ["finetune", *FINETUNE, "--data", data, "--resume", path, "--dry-run", "--output", run]
    else:
        argv = ["eval", "--checkpoint", path, "--data", data, "--workers", "0", "--accelerator", "cpu"]
    code, err = fcmae(*argv)
    line = error_line(err)
    assert code == 2 and str(path) in line and ": pass " in line, line  # names the file, then the fix
    assert not (tmp_path / "encoder.safetensors").exists()


class Touch:
    """Unpickling this calls pathlib.Path.touch(marker): code run by merely loading the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


@pytest.mark.parametrize("where", ["export", "eval", "finetune --pretrained", "pretrain --resume", "knn", "analyze",
                                   "export --trust-checkpoint"])
def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(fcmae, tmp_path, where):
    """A .pth of real-looking weights whose pickle creates a marker file when loaded: no command
    that takes weights loads it, only --trust-checkpoint gets past (and then the code does run)."""
    from fcmae.encoders import ConvNeXtV2
    marker, path = tmp_path / "marker", tmp_path / "downloaded.pth"
    torch.save({"model": ConvNeXtV2("atto", num_classes=2).state_dict(), "payload": Touch(marker)}, path)
    data = labeled_folder(tmp_path / "data")
    if where.startswith("export"):
        argv = ["export", path, "--output", tmp_path / "out.safetensors", *where.split()[1:]]
    elif where == "eval":
        argv = ["eval", "--checkpoint", path, "--data", data, "--workers", "0", "--accelerator", "cpu"]
    elif where == "pretrain --resume":
        argv = ["pretrain", *PRETRAIN, "--resume", path, "--output", tmp_path / "run"]
    elif where == "knn":
        argv = ["knn", "--checkpoint", path, "--data", data, "--workers", "0", "--device", "cpu",
                "--output", tmp_path / "out.safetensors"]
    elif where == "analyze":
        argv = ["analyze", "--checkpoint", path, "--data", data, "--workers", "0", "--device", "cpu",
                "--output", tmp_path / "run"]
    else:
        argv = ["finetune", *FINETUNE, "--model", "atto", "--data", data, "--pretrained", path,
                "--output", tmp_path / "run"]
    code, err = fcmae(*argv)
    if where == "export --trust-checkpoint":
        assert code == 0 and marker.exists() and (tmp_path / "out.safetensors").is_file()
        return
    line = error_line(err)
    assert code == 2 and not marker.exists(), line
    assert str(path) in line and "--trust-checkpoint (runs code from the file)" in line
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finetune_checkpoint(tmp_path_factory):
    """A last.ckpt of a 2-step tiny fine-tuning run with its EMA, as `fcmae finetune` writes it."""
    from fcmae.commands.finetune import build_parser, train
    from fcmae.training.flags import recipe_path
    out = tmp_path_factory.mktemp("ft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = [recipe_path("finetune", "atto") if a == "__ATTO__" else a for a in FINETUNE]
    result = train(build_parser().parse_args([*args, "--data", str(labeled_folder(out / "data")), "--max-steps", "2",
                                              "--output", str(out / "run")]))
    torch.set_num_threads(threads)
    return out / "run" / "checkpoints" / "last.ckpt", result["module"]


def test_our_lightning_checkpoints_load_without_unsafe_unpickling(real_checkpoint, finetune_checkpoint):
    """Both kinds of last.ckpt (EMA, timm scheduler, callbacks' state, hyper_parameters) need
    nothing beyond torch's weights_only types: they read through read_weights and resume."""
    from fcmae.checkpoints import read_run_checkpoint, read_weights
    assert torch.serialization.get_unsafe_globals_in_checkpoint(real_checkpoint) == []
    w = read_weights(real_checkpoint)
    assert (w.kind, w.model, w.num_classes, w.meta["steps"]) == ("pretrain-checkpoint", "atto", 0, 2)
    assert read_run_checkpoint(real_checkpoint, "pretrain")["global_step"] == 2

    path, module = finetune_checkpoint
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    for ema, source in ((False, module.model), (True, module.model_ema.module)):
        w = read_weights(path.parent.parent, ema=ema)  # the run directory
        assert (w.kind, w.classes, w.has_ema, w.meta["steps"]) == ("finetune-checkpoint", ["a", "b"], True, 2)
        assert all(torch.equal(w.state[k], v) for k, v in source.state_dict().items())
    assert read_run_checkpoint(path, "finetune")["hyper_parameters"]["classes"] == ["a", "b"]


SLOW_SAVE = textwrap.dedent("""
    import sys, time, torch
    from fcmae.training.callbacks import AtomicCheckpointIO

    class SlowFile:  # a slow disk: each write of torch.save's takes a while
        def __init__(self, f):
            self.f = f
        def write(self, data):
            n = self.f.write(data)
            self.f.flush()
            time.sleep(0.05)
            return n
        def flush(self):
            self.f.flush()

    real_save = torch.save
    torch.save = lambda obj, f: real_save(obj, SlowFile(f))
    AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.randn(2_000_000)}, sys.argv[1])
""")


def test_sigkill_during_a_checkpoint_save_leaves_the_previous_one_intact(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(2_000_000)}, path)
    before = path.read_bytes()
    tmp = path.with_name("last.ckpt.tmp")
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)])
    deadline = time.time() + 60
    while not (tmp.exists() and tmp.stat().st_size > 0) and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert child.poll() is None, "the save ended before it could be killed"
    child.send_signal(signal.SIGKILL)  # mid-write
    child.wait()
    assert 0 < tmp.stat().st_size and path.read_bytes() == before  # the kill hit the write; the old file is whole
    assert torch.load(path)["step"] == 1
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)  # and the next save goes through
    assert torch.load(path)["step"] == 3


def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint(tmp_path, pretrain_cfg):
    """SIGKILL a run (a checkpoint every 2 steps, 256 steps per epoch) once its first
    checkpoint exists, rerun the same command: it goes on from that step and ends with the
    weights of an uninterrupted run, so step, lr schedule, optimizer state and data order all
    continued."""
    steps = 12
    args = [*PRETRAIN, "--max-steps", steps, "--output", tmp_path / "run"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with open(tmp_path / "first.log", "w") as log:
        child = run_command(["pretrain", *args], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not last.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert child.poll() is None, "the run ended before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()
    saved = torch.load(last, weights_only=False)
    k = saved["global_step"]
    assert 2 <= k < steps and k % 2 == 0  # a checkpoint of the 2-step interval: at most 2 steps lost
    assert saved["optimizer_states"][0]["state"][0]["step"] == k
    config = saved["hyper_parameters"]["config"]  # the lr schedule stood at step k too
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(
        1e-3 * warmup_cosine(k, config["warmup_steps"], config["total_steps"]))

    with open(tmp_path / "second.log", "w") as log:
        rerun = run_command(["pretrain", *args], stdout=log, stderr=subprocess.STDOUT)
        assert rerun.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert f"resume_from: {last}" in (tmp_path / "second.log").read_text()
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == steps and resumed["optimizer_states"][0]["state"][0]["step"] == steps
    _, straight = fit(pretrain_cfg(*args[:-1], tmp_path / "straight"))
    expected = straight.state_dict()
    assert max((resumed["state_dict"][n] - expected[n]).abs().max().item() for n in expected) <= 1e-6


def inject(monkeypatch, at_call, kind):
    """Make the model's `at_call`-th forward give a NaN loss, or a finite loss whose gradient is
    NaN (sqrt's infinite slope at 0 times the zero gradient of torch.where's unused branch)."""
    real, calls = FCMAE.forward, []

    def forward(self, imgs, mask, visible_per_sample=None):
        loss, pred, m = real(self, imgs, mask, visible_per_sample)
        calls.append(1)
        if len(calls) == at_call:
            if kind == "loss":
                loss = loss * float("nan")
            else:
                z = (pred - pred.detach()).sum()  # 0, with gradient 1
                loss = loss + torch.where(z >= 0, torch.zeros_like(z), torch.sqrt(z))
        return loss, pred, m
    monkeypatch.setattr(FCMAE, "forward", forward)


@pytest.mark.parametrize("kind", ["loss", "gradient norm"])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(fcmae, pretrain_cfg, monkeypatch,
                                                                             tmp_path, kind):
    run = tmp_path / "run"
    # A checkpoint every step for the gradient case: without its check, step 5's NaN update would be saved.
    every = "2" if kind == "loss" else "1"
    args = [*PRETRAIN, "--max-steps", "8", "--ckpt-every", every, "--output", run]
    inject(monkeypatch, 5, kind)
    code, err = fcmae("pretrain", *args)
    last = run / "checkpoints" / "last.ckpt"
    assert code == 2 and error_line(err) == (
        f"fcmae: error: non-finite {kind} (nan) at step 5: training stopped; the last good checkpoint is {last} "
        f"(step 4). Rerun the same command with a lower lr to resume from it, e.g. --lr 0.0005 (half of 0.001)")
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 4 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())

    monkeypatch.undo()
    args[args.index("--lr") + 1] = "5e-4"  # as the message says
    trainer, module = fit(pretrain_cfg(*args[len(PRETRAIN):], "--lr", "5e-4"))
    assert trainer.global_step == 8
    # the resumed run follows the new lr: base lr and the schedule's current value
    scheduler, optimizer = trainer.lr_scheduler_configs[0].scheduler, trainer.optimizers[0]
    assert scheduler.base_values == [5e-4, 5e-4]
    hp = module.hparams.config  # the resolved configuration the run printed
    assert optimizer.param_groups[1]["lr"] == pytest.approx(
        5e-4 * warmup_cosine(8, hp["warmup_steps"], hp["total_steps"]))


def fail_on_save(monkeypatch, at_call, seen):
    """torch.save that, at its `at_call`-th call, writes part of the file and then finds the
    disk full, as a write would; `seen` gets the bytes of last.ckpt at that moment."""
    real, calls = torch.save, []

    def save(obj, f):
        calls.append(1)
        if len(calls) < at_call:
            return real(obj, f)
        seen.append(Path(f.name).with_name("last.ckpt").read_bytes())  # f is last.ckpt.tmp
        f.write(b"PK\x03\x04" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(fcmae, monkeypatch, tmp_path):
    run = tmp_path / "run"
    seen = []
    fail_on_save(monkeypatch, 2, seen)  # the save at step 4 fails, the one at step 2 is on disk
    code, err = fcmae("pretrain", *PRETRAIN, "--max-steps", "8", "--output", run)
    last = run / "checkpoints" / "last.ckpt"
    assert code == 2 and error_line(err) == (
        f"fcmae: error: no space left on device while saving {last}: free space or point --output elsewhere; "
        f"the previous checkpoint is intact")
    monkeypatch.undo()
    assert last.read_bytes() == seen[0] and checkpoint_step(last) == 2
    assert os.listdir(last.parent) == ["last.ckpt"]  # the partial .tmp is gone


@pytest.fixture
def small_filesystem(tmp_path):
    """A 64 MiB tmpfs: room for one tiny-run checkpoint (about 42 MB) but not for its successor
    beside it. Needs root (mount); skipped elsewhere, where the test above covers it."""
    mount = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk(fcmae, small_filesystem):
    run = small_filesystem / "run"
    code, err = fcmae("pretrain", *PRETRAIN, "--max-steps", "8", "--output", run)
    last = run / "checkpoints" / "last.ckpt"
    assert code == 2 and error_line(err) == (
        f"fcmae: error: no space left on device while saving {last}: free space or point --output elsewhere; "
        f"the previous checkpoint is intact")
    assert checkpoint_step(last) == 2 and os.listdir(last.parent) == ["last.ckpt"]


def test_keep_checkpoints_keeps_the_latest_k_and_removes_only_after_the_new_one_is_written(
        tmp_path, pretrain_cfg, monkeypatch, capsys):
    """Periodic step*.ckpt every epoch (2 steps), --keep-checkpoints 2: at every removal the new
    file is already on disk beside the two kept; at the end the latest two and last.ckpt remain.
    The first save prints the size of one checkpoint."""
    from .conftest import write_images
    data, run = write_images(tmp_path / "data", 8, size=64), tmp_path / "run"
    seen = []
    real = AtomicCheckpointIO.remove_checkpoint

    def remove(self, path):
        seen.append((Path(path).name, sorted(p.name for p in Path(path).parent.glob("step*.ckpt"))))
        real(self, path)
    monkeypatch.setattr(AtomicCheckpointIO, "remove_checkpoint", remove)
    fit(pretrain_cfg("--data", data, "--epochs", "5", "--save-every-epochs", "1", "--keep-checkpoints", "2",
                     "--output", run))
    names = [f"step{s:07d}.ckpt" for s in (2, 4, 6, 8, 10)]
    assert sorted(os.listdir(run / "checkpoints")) == ["last.ckpt", *names[-2:]]
    assert seen == [(names[i], names[i:i + 3]) for i in range(3)]  # the oldest goes once a third is written
    assert checkpoint_step(run / "checkpoints" / names[-1]) == 10
    size = (run / "checkpoints" / "last.ckpt").stat().st_size
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("checkpoint size:")]
    assert lines == [f"checkpoint size: {size / 1e6:.1f} MB (last.ckpt); with the latest 2 periodic step*.ckpt "
                     f"kept: up to {3 * size / 1e6:.1f} MB"]


def test_an_unreadable_last_ckpt_resumes_from_the_newest_readable_checkpoint(tmp_path, pretrain_cfg, capsys):
    """A last.ckpt cut short (and the newest step*.ckpt too): the rerun resumes from the newest
    readable step*.ckpt, says which and what it costs, and trains on to the end; with no readable
    checkpoint at all it is one line."""
    from .conftest import write_images
    data, run = write_images(tmp_path / "data", 8, size=64), tmp_path / "run"
    args = ["--data", data, "--epochs", "5", "--save-every-epochs", "1", "--keep-checkpoints", "3"]
    fit(pretrain_cfg(*args, "--max-steps", "6", "--output", run))  # 2 steps per epoch: step 2, 4, 6 kept
    folder = run / "checkpoints"
    for name in ("last.ckpt", "step0000006.ckpt"):
        data_bytes = (folder / name).read_bytes()
        (folder / name).write_bytes(data_bytes[: len(data_bytes) // 2])
    capsys.readouterr()
    trainer, resumed = fit(pretrain_cfg(*args, "--max-steps", "8", "--output", run))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cannot read")]
    assert len(lines) == 1 and lines[0].startswith(f"cannot read {folder / 'last.ckpt'} (")
    assert lines[0].endswith(f": resuming from {folder / 'step0000004.ckpt'}, the newest readable checkpoint of the "
                             f"run (step 4); the run had reached step 6, so 2 steps (5-6) are trained again")
    assert trainer.global_step == 8 and checkpoint_step(folder / "last.ckpt") == 8
    start = torch.load(folder / "step0000004.ckpt", weights_only=True)["state_dict"]
    trained = resumed.state_dict()
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-5  # it trained on from there

    for path in folder.glob("*.ckpt"):
        path.write_bytes(path.read_bytes()[:1000])
    from fcmae.cli import main
    with pytest.raises(SystemExit) as exit:
        main(["pretrain", *PRETRAIN, *map(str, args), "--max-steps", "10", "--output", str(run)])
    line = error_line(capsys.readouterr().err)
    assert exit.value.code == 2 and f"cannot read {folder / 'last.ckpt'}" in line
    assert line.endswith(f"(no other checkpoint in {folder} is readable either)")
