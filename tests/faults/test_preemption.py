"""Fault catalog, preemption: a scheduler's SIGTERM (to the training process, to its whole
process group, twice, or to one DDP rank) stops `fcmae pretrain` after the step in flight with
last.ckpt at that step, one line and exit code 143; the same command then continues to the
weights of an uninterrupted run."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from .conftest import PRETRAIN, run_command

pytestmark = pytest.mark.faults

STEPS = 8
# PRETRAIN with loader workers (they must survive a signal to the process group), no periodic
# last.ckpt before the signal, and the encoder export on (a stopped run must not export).
ARGS = [*[a for a in PRETRAIN if a != "--no-export"], "--max-steps", STEPS]
ARGS[ARGS.index("--workers") + 1] = "2"
ARGS[ARGS.index("--ckpt-every") + 1] = "1000"


def shown_step(log):
    """The last optimizer step the progress lines printed (stdout is a file: one line a step)."""
    counts = re.findall(rb"^step (\d+)/", log.read_bytes(), re.M) if log.exists() else []
    return int(counts[-1]) if counts else 0


def wait_for_step(log, child, step, timeout=120):
    deadline = time.time() + timeout
    while shown_step(log) < step and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert child.poll() is None and shown_step(log) >= step, log.read_text(errors="replace")[-3000:]
    return shown_step(log)


def stopped_line(log):
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("fcmae: stopped")]
    assert len(lines) == 1, log.read_text(errors="replace")[-3000:]  # one line, from rank 0 only
    return lines[0]


def saved_step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_sigterm_mid_run_saves_the_step_reached_and_the_rerun_ends_as_if_uninterrupted(tmp_path, pretrain_cfg):
    run, log = tmp_path / "run", tmp_path / "first.log"
    last = run / "checkpoints" / "last.ckpt"
    with open(log, "wb") as f:
        child = run_command(["pretrain", *ARGS, "--output", run], stdout=f, stderr=subprocess.STDOUT)
        seen = wait_for_step(log, child, 3)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 143  # 128 + SIGTERM
    k = saved_step(last)
    assert seen < k <= seen + 2 and k < STEPS  # the step in flight (or the one after it) was finished and saved
    assert shown_step(log) == k - 1  # ... and nothing after it ran
    assert stopped_line(log) == (f"fcmae: stopped by SIGTERM at step {k}; checkpoint saved to {last}; "
                                 f"rerun the same command to continue")
    assert not (run / "encoder.safetensors").exists()  # a stopped run exports nothing
    assert sorted(os.listdir(last.parent)) == ["last.ckpt"]  # ours alone: no hpc_ckpt, no .tmp

    with open(tmp_path / "second.log", "wb") as f:
        rerun = run_command(["pretrain", *ARGS, "--output", run], stdout=f, stderr=subprocess.STDOUT)
        assert rerun.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-3000:]
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == STEPS and (run / "encoder.safetensors").is_file()
    from fcmae.commands.pretrain import fit

    # In this process, without loader workers: the views and masks do not depend on them.
    _, straight = fit(pretrain_cfg("--max-steps", STEPS, "--output", tmp_path / "straight"))
    expected = straight.state_dict()
    assert max((resumed["state_dict"][n] - expected[n]).abs().max().item() for n in expected) <= 1e-6


# `fcmae` with a slow disk: every write of a checkpoint file takes a while, so a second signal
# can arrive in the middle of the save.
SLOW_DISK = textwrap.dedent("""
    import sys, time, torch
    from fcmae.cli import main

    class SlowFile:
        def __init__(self, f):
            self.f = f
        def write(self, data):
            time.sleep(0.002)
            return self.f.write(data)
        def flush(self):
            self.f.flush()

    real_save = torch.save
    torch.save = lambda obj, f: real_save(obj, SlowFile(f))
    main(sys.argv[1:])
""")


def test_sigterm_to_the_process_group_and_again_during_the_save_stops_cleanly(tmp_path):
    """As SLURM signals a job step: the training process and its loader workers at once; then a
    second SIGTERM to all of them while last.ckpt is being written."""
    script, run, log = tmp_path / "slow_disk.py", tmp_path / "run", tmp_path / "run.log"
    script.write_text(SLOW_DISK)
    last = run / "checkpoints" / "last.ckpt"
    tmp = last.with_name("last.ckpt.tmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "wb") as f:
        child = subprocess.Popen([sys.executable, str(script), "pretrain", *map(str, ARGS), "--output", str(run)],
                                 env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            seen = wait_for_step(log, child, 3)
            os.killpg(child.pid, signal.SIGTERM)  # the process group: loader workers included
            deadline = time.time() + 60
            while not (tmp.exists() and tmp.stat().st_size > 0) and child.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            assert child.poll() is None, "the save ended before the second signal"
            os.killpg(child.pid, signal.SIGTERM)  # again, mid-save
            assert child.wait(timeout=60) == 143, log.read_text(errors="replace")[-3000:]
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "killed by signal" not in text, text[-3000:]
    k = saved_step(last)
    assert seen < k <= seen + 2
    assert stopped_line(log).startswith(f"fcmae: stopped by SIGTERM at step {k}; ")
    assert sorted(os.listdir(last.parent)) == ["last.ckpt"]


# 2-process CPU DDP; each rank writes its pid, so the test can signal one of them.
DDP = textwrap.dedent("""
    import os, sys
    out = sys.argv[sys.argv.index("--output") + 1]
    os.makedirs(out, exist_ok=True)
    with open(f"{out}/pid{os.environ.get('LOCAL_RANK', '0')}", "w") as f:
        f.write(str(os.getpid()))
    from fcmae.cli import main
    main(sys.argv[1:])
""")


def test_ddp_sigterm_to_one_rank_stops_both_after_the_same_step(tmp_path):
    """The signal reaches rank 1 alone (Lightning's child process): rank 0 learns of it in the
    ranks' agreement after the step, both save and stop after the same step, neither hangs."""
    script, run, log = tmp_path / "ddp.py", tmp_path / "run", tmp_path / "run.log"
    script.write_text(DDP)
    args = [*map(str, ARGS), "--devices", "2", "--strategy", "ddp", "--workers", "0", "--output", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "wb") as f:
        child = subprocess.Popen([sys.executable, str(script), "pretrain", *args], env=env, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            seen = wait_for_step(log, child, 2)
            pid = int((run / "pid1").read_text())
            os.kill(pid, signal.SIGTERM)  # one rank only
            assert child.wait(timeout=60) == 143, log.read_text(errors="replace")[-3000:]  # no rank hangs
            deadline = time.time() + 30
            while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
    last = run / "checkpoints" / "last.ckpt"
    k = saved_step(last)
    assert seen < k <= seen + 2 and k < STEPS
    assert stopped_line(log).startswith(f"fcmae: stopped by SIGTERM at step {k}; ")
    assert not (run / "encoder.safetensors").exists()


def test_resuming_on_two_devices_keeps_the_effective_batch_and_the_schedule(tmp_path, pretrain_cfg):
    """2 steps on 1 device (batch 4 x accumulate 2), then the same command with --devices 2: the
    accumulation halves, so effective batch, lr, steps per epoch and schedule stay; the run goes
    on from step 2 and, each step training on the same samples, ends where 4 steps on 1 device do."""
    import yaml

    from fcmae.commands.pretrain import fit
    run = tmp_path / "run"
    args = ["--accumulate", "2", "--log-every", "1", "--output", run]
    fit(pretrain_cfg(*args, "--max-steps", "2"))
    before = yaml.safe_load((run / "config.yaml").read_text())
    with open(tmp_path / "ddp.log", "wb") as f:
        child = run_command(["pretrain", *PRETRAIN, *args, "--max-steps", "4", "--devices", "2", "--strategy", "ddp"],
                            stdout=f, stderr=subprocess.STDOUT)
        assert child.wait(timeout=120) == 0, (tmp_path / "ddp.log").read_text()[-3000:]
    log = (tmp_path / "ddp.log").read_text()
    assert ("resuming on 2 device(s) with --batch-size 4 (the checkpoint: 1 x 4): --accumulate 2 -> 1 keeps its "
            "effective batch of 8, so lr and schedule stay as they were") in log
    after = yaml.safe_load((run / "config.yaml").read_text())
    assert (after["world_size"], after["accumulate"], before["world_size"], before["accumulate"]) == (2, 1, 1, 2)
    for key in ("effective_batch", "lr", "steps_per_epoch", "total_steps", "warmup_steps"):
        assert after[key] == before[key], key
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 4 and resumed["optimizer_states"][0]["state"][0]["step"] == 4
    _, straight = fit(pretrain_cfg("--accumulate", "2", "--max-steps", "4", "--output", tmp_path / "straight"))
    expected = straight.state_dict()
    assert max((resumed["state_dict"][n] - expected[n]).abs().max().item() for n in expected) <= 1e-5


def test_resuming_on_a_device_count_that_cannot_keep_the_effective_batch_is_one_line(tmp_path, pretrain_cfg, fcmae):
    from fcmae.commands.pretrain import fit
    run = tmp_path / "run"
    fit(pretrain_cfg("--max-steps", "1", "--output", run))  # effective batch 4
    code, err = fcmae("pretrain", *PRETRAIN, "--batch-size", "3", "--max-steps", "2", "--dry-run", "--output", run)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"fcmae: error: {run / 'checkpoints' / 'last.ckpt'} was trained with an effective batch of 4, which "
        f"--batch-size 3 x 1 device(s) does not divide: pass a --batch-size that divides 4 / 1, or resume on 1 "
        f"device(s)")


def test_sigterm_stops_finetuning_with_last_ckpt_and_no_classifier(tmp_path):
    from fcmae.training.flags import recipe_path

    from .conftest import FINETUNE, labeled_folder
    data, run, log = labeled_folder(tmp_path / "data", per_class=(12, 1)), tmp_path / "run", tmp_path / "ft.log"
    args = [recipe_path("finetune", "atto") if a == "__ATTO__" else a for a in FINETUNE]
    with open(log, "wb") as f:
        child = run_command(["finetune", *args, "--data", data, "--epochs", "3", "--log-every", "1", "--output", run],
                            stdout=f, stderr=subprocess.STDOUT)
        seen = wait_for_step(log, child, 3)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 143, log.read_text(errors="replace")[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    k = saved_step(last)
    assert seen < k <= seen + 2 and k < 36  # 12 steps per epoch, 3 epochs
    assert stopped_line(log) == (f"fcmae: stopped by SIGTERM at step {k}; checkpoint saved to {last}; "
                                 f"rerun the same command to continue")
    assert not list(run.glob("classifier*.safetensors"))
