"""The host-device syncs a training step makes.

    counter = StepSyncs()
    trainer = L.Trainer(..., callbacks=[counter])   # counter.counts: {step: syncs}, through Lightning

A sync makes a CUDA host wait until the device has caught up: the host stops queueing work
ahead, and CUDA graphs and `torch.compile` graphs break there. On CPU the same ops are counted
as the profiler's operator events (`SYNC_OPS`), so a CPU run shows what would block a CUDA host;
on CUDA, `torch.cuda.set_sync_debug_mode("warn")` names every one (scripts/gpu_check.py).
"""
import warnings
from collections import Counter

import torch
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile

from fcmae.training.callbacks import writes_logs

# Ops that make a CUDA host wait for the device: a tensor read into Python, or an output whose
# size depends on the data.
SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")

# Profiler scopes whose syncs are not the device's: loading a batch in the training process
# (--workers 0; torchvision's transforms read their random numbers with .item(), on the CPU
# wherever training runs), and on CPU the fused AdamW kernel (fcmae.optim.adamw), which reads each
# parameter's step count, a host tensor there; on CUDA the counts stay on the device.
HOST_SCOPES = ("enumerate(DataLoader)", "aten::_fused_adam")


class StepSyncs(Callback):
    """Counts the host-device syncs of every training step: `counts[step]` covers one whole
    cycle of the loop, from the end of the previous step's batch to the end of this one's (the
    previous step's logging, fetching and moving the batch, forward, backward, optimizer, lr
    schedule, callbacks); `quiet[step]`: neither step wrote logs. The first step has no count.

    CPU: the profiler's SYNC_OPS events outside HOST_SCOPES, one per read. CUDA: the warnings of
    `torch.cuda.set_sync_debug_mode("warn")`; `places` counts them by the Python line that made
    them ("file:line")."""

    def __init__(self):
        self.counts, self.quiet, self.places = {}, {}, Counter()
        self.window, self.cuda, self.logged = None, False, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logged = writes_logs(trainer)
        if self.window is not None:
            step = trainer.global_step
            self.counts[step] = self.close()
            self.quiet[step] = not (logged or self.logged)
        self.logged = logged
        self.open(pl_module.device.type == "cuda")

    def on_train_end(self, trainer, pl_module):
        if self.window is not None:
            self.close()

    def open(self, cuda):
        self.cuda = cuda
        if cuda:
            self.window = warnings.catch_warnings(record=True)
            self.caught = self.window.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self.window = profile(activities=[ProfilerActivity.CPU])
            self.window.start()

    def close(self):
        """The count of the window open now, which it closes."""
        window, self.window = self.window, None
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            syncs = [f"{w.filename}:{w.lineno}" for w in self.caught if "synchroniz" in str(w.message).lower()]
            window.__exit__(None, None, None)
            self.places.update(syncs)
            return len(syncs)
        window.stop()
        # One read nests several sync ops (is_nonzero -> item -> _local_scalar_dense): the outermost counts.
        return sum(e.name in SYNC_OPS and not in_scope(e.cpu_parent, SYNC_OPS) and not in_scope(e, HOST_SCOPES)
                   for e in window.events())


def in_scope(event, prefixes):
    """Whether a profiler event runs inside a scope (an enclosing event) named with one of `prefixes`."""
    while event is not None:
        if event.name.startswith(prefixes):
            return True
        event = event.cpu_parent
    return False
