"""Shared pieces of the fault catalog (tests/faults/, marker `faults`): tiny runs that take a
second or two on a CPU, the `fcmae` command run in-process, and image files of every kind.

Run the catalog alone with `pytest -m faults` (or `pytest tests/faults`)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

# `fcmae pretrain` small enough for 2 shared CPU cores (atto at 64 px, a 16-dim decoder).
PRETRAIN = ["--input-size", "64", "--batch-size", "4", "--decoder-dim", "16", "--workers", "0",
            "--accelerator", "cpu", "--devices", "1", "--precision", "32", "--backend", "sparse",
            "--log-every", "1", "--vis-every", "1000", "--ckpt-every", "2", "--no-export",
            "--lr", "1e-3", "--warmup-epochs", "0.5", "--epochs", "4"]
# `fcmae finetune` with a custom tiny size on 64 px images.
FINETUNE = ["--config", "__ATTO__", "--model", json.dumps({"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}),
            "--input-size", "64", "--batch-size", "2", "--effective-batch", "2", "--workers", "0",
            "--accelerator", "cpu", "--devices", "1", "--precision", "32"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Runs every test here with one compute thread (tests/conftest.py)."""


@pytest.fixture
def fcmae(capsys):
    """fcmae(*argv) -> (exit code, stderr): the `fcmae` command in this process."""
    from fcmae.cli import main
    from fcmae.training.flags import recipe_path

    def run(*argv):
        argv = [recipe_path("finetune", "atto") if a == "__ATTO__" else str(a) for a in argv]
        capsys.readouterr()
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err
    return run


def error_line(err):
    """The error `fcmae` printed: its last stderr line, checked to be a one-line error with no traceback."""
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fcmae: error: "), err
    return line


@pytest.fixture
def pretrain_cfg():
    """pretrain_cfg(*args): parsed `fcmae pretrain PRETRAIN args` (the atto recipe first)."""
    from fcmae.commands.pretrain import DEFAULT_MODEL, build_parser
    from fcmae.training.flags import with_recipe
    return lambda *args: build_parser().parse_args(with_recipe("pretrain", [*PRETRAIN, *map(str, args)], DEFAULT_MODEL))


def write_images(folder, n, size=48, start=0, mode="RGB", ext="png"):
    """n random images folder/{start + i:03d}.<ext>."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(folder / f"{i:03d}.{ext}")
    return folder


def labeled_folder(root, classes=("a", "b"), per_class=(2, 1), size=48):
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            write_images(root / split / c, n, size)
    return root


def run_command(args, **kwargs):
    """`fcmae ARGS` as a child process (Popen), in one thread, output to files in the cwd."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "fcmae.cli", *map(str, args)], env=env, **kwargs)


def checkpoint_step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
