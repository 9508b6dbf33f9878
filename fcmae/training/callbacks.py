"""Trainer add-ons every training task may use: which steps write logs, crash-safe checkpoint
files, last.ckpt upkeep, images/s, counts of unreadable files skipped, the RNG states in the
checkpoint, and progress output (a bar in a terminal, plain lines in a log)."""
import datetime
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar

from fcmae.checkpoints import load, save_torch
from fcmae.data.reading import SKIPPED_FILES_ENV
from fcmae.files import atomic_write
from fcmae.rundir import LAST


# ----------------------------------------------------------------------------- logging

def writes_logs(trainer):
    """Whether Lightning writes the values logged at this optimizer step (every --log-every
    steps; Lightning's own rule, the same in every hook of the step). Tasks log only then: a
    value logged at another step is never written, and still costs the device its copies (a
    Python number becomes a device tensor; a progress-bar value is read back at every batch)."""
    return trainer._logger_connector.should_update_logs


# ----------------------------------------------------------------------------- checkpoints

class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files through fcmae.checkpoints: saved atomically with fsync (a
    crash or a full disk during a save leaves the previous checkpoint intact; Lightning's own
    writer renames but never fsyncs), loaded without running code from the file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save_torch(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Lightning passes weights_only False only when the caller trusts the file (--trust-checkpoint).
        return load(path, trust=weights_only is False)


def file_size(size):
    """Bytes as people read them: 1.2 GB, 41.9 MB, 950 kB (powers of 1000, as `df -H`)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


class LastCheckpoint(Callback):
    """Keeps `<dirpath>/last.ckpt` current: every `every_n_steps` optimizer steps and at the
    final step. Saving at a batch end (never in on_train_end, which Lightning records as a
    finished epoch) lets a resumed run continue inside the epoch where this one stopped. Its
    first save prints the size of one checkpoint and, with `keep` periodic checkpoints kept
    beside it, what the folder will take."""

    def __init__(self, dirpath, every_n_steps=1000, keep=0):
        self.path, self.every_n_steps, self.keep = Path(dirpath) / LAST, every_n_steps, keep
        self.saved_step, self.told_size = None, False

    def save(self, trainer):
        if trainer.global_step != self.saved_step and trainer.global_step > 0:
            trainer.save_checkpoint(self.path, weights_only=False)  # all ranks call it; the strategy writes
            self.saved_step = trainer.global_step
            if not self.told_size and trainer.is_global_zero:
                self.told_size = True
                size = self.path.stat().st_size
                more = "" if self.keep == 0 else (
                    "; every periodic step*.ckpt is kept (--keep-checkpoints -1)" if self.keep < 0 else
                    f"; with the latest {self.keep} periodic step*.ckpt kept: up to {file_size(size * (self.keep + 1))}")
                trainer.lightning_module.print(f"checkpoint size: {file_size(size)} ({self.path.name}){more}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        final_step = 0 < trainer.max_steps <= step
        final_batch = (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
                       and trainer.current_epoch + 1 >= trainer.max_epochs)
        if step % self.every_n_steps == 0 or final_step or final_batch:
            self.save(trainer)

    def on_train_start(self, trainer, pl_module):
        self.saved_step = trainer.global_step  # a resumed run: this step is on disk already

    def on_train_end(self, trainer, pl_module):
        self.save(trainer)  # only if stopped some other way (e.g. a callback) since the last save


# ----------------------------------------------------------------------------- skipped files

class SkippedFiles(Callback):
    """Sums the files skipped as unreadable over each training epoch: logs `data/skipped` and,
    when there were any, prints a line. Every batch counts them in its `skipped` field (counted
    in whichever process loaded the sample: fcmae.data.views.MaskedView, fcmae.data.labelled.Labelled).
    `path`: where the loaders list the skipped files by name, whatever the warnings filter
    (fcmae.data.reading.note_skipped; the environment variable
    reaches loader workers and other ranks of this node as they start)."""

    def __init__(self, path=None):
        self.count, self.path, self.previous = 0, path, None

    def setup(self, trainer, pl_module, stage):
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.previous = os.environ.get(SKIPPED_FILES_ENV)
            os.environ[SKIPPED_FILES_ENV] = str(Path(self.path).absolute())

    def teardown(self, trainer, pl_module, stage):
        if self.path is not None and trainer.is_global_zero and Path(self.path).is_file():
            # Each process lists a file once; several processes may have met the same one.
            lines = Path(self.path).read_text(errors="surrogateescape").splitlines()
            unique = "".join(f"{line}\n" for line in dict.fromkeys(lines))
            atomic_write(self.path, lambda tmp: tmp.write_text(unique, errors="surrogateescape"))
        self.restore()

    def on_exception(self, trainer, pl_module, exception):
        self.restore()  # Lightning skips teardown when the run fails

    def restore(self):
        if self.path is not None:
            if self.previous is None:
                os.environ.pop(SKIPPED_FILES_ENV, None)
            else:
                os.environ[SKIPPED_FILES_ENV] = self.previous

    def on_train_epoch_start(self, trainer, pl_module):
        self.count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.count = self.count + batch.skipped.sum()  # stays on the device: no sync per step

    def on_train_epoch_end(self, trainer, pl_module):
        count = torch.as_tensor(self.count, dtype=torch.float32, device=pl_module.device)
        total = int(trainer.strategy.reduce(count, reduce_op="sum"))  # over all ranks
        pl_module.log("data/skipped", float(total))
        if total:
            where = f"listed in {self.path}" if self.path is not None else "named in the warnings above"
            pl_module.print(f"epoch {trainer.current_epoch}: skipped {total} unreadable files ({where}); "
                            f"--strict-data makes a bad file fatal")


# ----------------------------------------------------------------------------- throughput

class Throughput(Callback):
    """Logs images/s over all ranks (`train/images_per_sec`) at the steps that write logs
    (`writes_logs`): the images of all ranks since the previous such step over the time they
    took, data loading included. Host time: the step's finite check (fcmae/module.py) keeps the
    host in step with the device."""

    # Not Lightning's ThroughputMonitor: its names are fixed (`train/samples_per_sec`, logged only
    # with more than one rank; `train/device/samples_per_sec` otherwise) and it writes straight to
    # the logger only once its window (100 batches) is full.

    def __init__(self):
        self.start, self.images, self.step = None, 0, None

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = None  # the gap between epochs is not a training step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now, stepped = time.perf_counter(), trainer.global_step != self.step
        self.step = trainer.global_step
        if self.start is None:
            self.start, self.images = now, 0
            return
        self.images += batch[0].shape[0] * trainer.world_size
        if stepped and writes_logs(trainer):  # the batch that ends an accumulation window
            pl_module.log("train/images_per_sec", self.images / (now - self.start))
            self.start, self.images = now, 0


# ----------------------------------------------------------------------------- progress

def progress_output(every, accumulate, stream=None):
    """The run's progress callback: in a terminal, Lightning's bar, refreshed every `every`
    optimizer steps (`accumulate` batches each); otherwise (a log file, a pipe, a scheduler's
    output) `ProgressLines`, which never rewrites a line. Both read the logged tensors only
    when they show them, so progress output adds no host-device sync to the other steps."""
    if (stream or sys.stdout).isatty():
        return TQDMProgressBar(refresh_rate=every * accumulate)
    return ProgressLines(every, stream)


def clock(seconds):
    """Seconds as h:mm:ss."""
    return str(datetime.timedelta(seconds=round(seconds)))


class ProgressLines(ProgressBar):
    """Progress for logs: one plain line every `every` optimizer steps, on rank 0:

        step 150/936  epoch 0  loss 0.9841  lr 1.2e-05  37.9 images/s  0:03:21 left

    loss: the latest logged `train/loss` (read here, once per line); lr: the largest of the
    optimizer's groups; images/s over all ranks since the previous line; time left at that
    rate. Lines end in a newline only: a 500k-step run at --log-every 50 writes 10k lines."""

    def __init__(self, every, stream=None):
        super().__init__()
        self.every, self.stream, self.is_enabled = every, stream, True
        self.shown_step, self.mark, self.images = None, None, 0

    def disable(self):
        self.is_enabled = False

    def enable(self):
        self.is_enabled = True

    def on_train_start(self, trainer, pl_module):
        self.shown_step, self.mark, self.images = trainer.global_step, time.perf_counter(), 0
        self.total = trainer.estimated_stepping_batches  # optimizer steps of the whole run (max_steps too)

    def on_train_epoch_start(self, trainer, pl_module):
        self.total = trainer.estimated_stepping_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[0]) * trainer.world_size  # a shape: no device sync
        step = trainer.global_step
        if not self.is_enabled or step == self.shown_step or step % self.every:
            return
        now = time.perf_counter()
        seconds, steps = now - self.mark, step - self.shown_step
        loss = trainer.callback_metrics.get("train/loss")
        lr = max(group["lr"] for group in trainer.optimizers[0].param_groups)
        left = clock((self.total - step) * seconds / steps) if self.total != float("inf") else "?"
        print(f"step {step}/{self.total}  epoch {trainer.current_epoch}  "
              f"loss {float(loss) if loss is not None else float('nan'):.4f}  lr {lr:.3g}  "
              f"{self.images / seconds:.1f} images/s  {left} left", file=self.stream or sys.stdout, flush=True)
        self.shown_step, self.mark, self.images = step, now, 0

    def print(self, *args, **kwargs):
        print(*args, **kwargs, file=self.stream or sys.stdout, flush=True)


# ----------------------------------------------------------------------------- random state

class RandomState(Callback):
    """Keeps the training process's RNG states in every checkpoint and restores them on resume,
    so what draws from them (drop path from torch's, Mixup/CutMix from numpy's) continues as in
    an uninterrupted run. The loaders' augmentations are seeded per sample instead
    (fcmae/data/views.py `seeded`). Stored as tensors and numbers: checkpoints still load without unpickling code."""

    def state_dict(self):
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        states = {"torch": torch.get_rng_state(),
                  "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                            "gauss": gauss},
                  "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                             "gauss_next": gauss_next}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state()  # this rank's device
        return states

    def load_state_dict(self, states):
        torch.set_rng_state(states["torch"])
        n = states["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = states["python"]
        random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
