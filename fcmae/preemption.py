"""Stopping on a scheduler's signal without losing work.

Schedulers warn before they kill: SLURM sends SIGTERM at the time limit (or the signal chosen with
`#SBATCH --signal=USR1@120`), Kubernetes and spot instances send SIGTERM and wait a grace period,
a person presses Ctrl-C (SIGINT). On any of SIGTERM, SIGINT and SIGUSR1 a training run finishes
the optimizer step in flight, writes `last.ckpt` (atomically, like every checkpoint), and stops;
the command then prints one line and exits with `EXIT_CODES[signal]` (128 + the signal number,
what a shell reports for a process the signal killed, so job scripts that test for it keep
working). Rerunning the same command continues from that step exactly.

Under DDP the signal may reach one rank or all of them: after every optimizer step the ranks
agree (one all-reduce of the signal number) whether any of them was signalled, so all stop after
the same step and none is left waiting in a collective. Loader workers are forked after the
handlers are installed, so a signal sent to the whole process group (as SLURM does) does not kill
them mid-batch. A repeated SIGTERM or SIGUSR1 is ignored (schedulers may resend it); a second
Ctrl-C stops at once, as Ctrl-C always did. Neither can corrupt a file: every checkpoint is
written to a temporary file and renamed, so a save cut short leaves the previous one intact.

This replaces Lightning's own SIGTERM handling (which stops without saving) and its SLURM
auto-requeue (which saves a second kind of checkpoint, `hpc_ckpt_*.ckpt`): the run layer turns
the latter off so that there is one checkpoint to resume from.
"""
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_CODES = {s: 128 + int(s) for s in SIGNALS}


class StopOnSignal(Callback):
    """Installs handlers for `SIGNALS` when training starts (after Lightning's own, which it
    replaces) and restores the previous ones when it ends. After a stop, `received` is the
    signal and `saved_step` the step written to `path`."""

    def __init__(self, path):
        self.path = Path(path)
        self.received = None  # the first signal, on this process
        self.stopped_by = None  # the signal the run stopped for (any rank's), or None
        self.saved_step = None
        self._previous, self._seen_step = {}, None

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def on_train_start(self, trainer, pl_module):
        self._seen_step = trainer.global_step
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker thread): no handlers
                pass

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._seen_step:
            return  # inside a gradient accumulation cycle: no step boundary yet
        self._seen_step = trainer.global_step
        # Every rank reaches this point after the same steps, so this collective always matches.
        # The largest signal number of any rank: 0 when none was signalled.
        mine = torch.tensor(int(self.received or 0), device=pl_module.device)
        signum = int(trainer.strategy.reduce(mine, reduce_op="max"))
        if not signum:
            return
        self.stopped_by = signal.Signals(signum)
        trainer.save_checkpoint(self.path)  # all ranks call it; rank 0 writes
        self.saved_step = trainer.global_step
        trainer.should_stop = True

    def message(self):
        return (f"stopped by {self.stopped_by.name} at step {self.saved_step}; checkpoint saved to {self.path}; "
                f"rerun the same command to continue")

    @property
    def exit_code(self):
        return EXIT_CODES[self.stopped_by]
