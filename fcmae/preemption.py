"""Stopping on a scheduler's signal without losing work.

On any of SIGTERM, SIGINT and SIGUSR1 (SLURM's time limit or `--signal`, Kubernetes, spot
instances, Ctrl-C) a training run finishes the optimizer step in flight (on every DDP rank: they
agree after each step), writes `last.ckpt` (atomically, like every checkpoint) and stops by
raising `Stopped`; the command prints its one line and exits with 128 + the signal number (143
for SIGTERM, 130 for SIGINT, 138 for SIGUSR1: what a shell reports for a process the signal
killed). Rerunning the same command continues from that step exactly. Loader workers ignore the
signals (`worker_init`); a repeated SIGTERM or SIGUSR1 is ignored, a second Ctrl-C stops at once.
Why it works this way rather than through Lightning's own handling: docs/internals.md.
"""
import os
import signal
from pathlib import Path

import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.callbacks import Callback

from fcmae.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def worker_init(worker_id):
    """worker_init_fn of every loader used while training: the worker ignores `SIGNALS` (the
    training process decides when to stop), then seeds itself as Lightning's own worker_init_fn
    would have (`seed_everything(workers=True)`), which setting one replaces."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id)  # its rank: this process's global rank, as Lightning's


class StopOnSignal(Callback):
    """Installs handlers for `SIGNALS` for the duration of `trainer.fit` and restores the
    previous ones after; on a signal, saves the run to `path` at the next step boundary and
    raises `Stopped`."""

    def __init__(self, path):
        self.path = Path(path)
        self.received = None  # the first signal, on this process
        self._previous, self._seen_step = {}, None

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def setup(self, trainer, pl_module, stage):
        # Lightning installs its own SIGTERM handler right after `setup` (and forks the loader
        # workers after that): keep it from doing so, on this trainer only.
        trainer._signal_connector.register_signal_handlers = lambda: None
        self.received = None
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker thread): no handlers
                pass

    def teardown(self, trainer, pl_module, stage):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def on_train_start(self, trainer, pl_module):
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._seen_step:
            return  # inside a gradient accumulation cycle: no step boundary yet
        self._seen_step = trainer.global_step
        if trainer.world_size == 1:
            signum = int(self.received or 0)  # no tensor: no device sync per step
        else:
            # Every rank reaches this point after the same steps, so this collective always
            # matches. The largest signal number of any rank: 0 when none was signalled.
            mine = torch.tensor(int(self.received or 0), device=pl_module.device)
            signum = int(trainer.strategy.reduce(mine, reduce_op="max"))
        if not signum:
            return
        trainer.save_checkpoint(self.path)  # all ranks call it; rank 0 writes
        raise Stopped(signal.Signals(signum), trainer.global_step, self.path, trainer.global_rank)
