"""The Trainer of every training run: the hardware flags (accelerator, devices, nodes, strategy
and its DDP/FSDP settings, precision), crash-safe checkpoint files, TensorBoard, progress output,
the run layer's own callbacks, the device count Lightning gives for plans made before the Trainer
exists, and how the node's cores are shared between loader workers and the training processes."""
import logging
import os
from contextlib import contextmanager

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from fcmae.errors import UserError
from fcmae.precision import DTYPES, resolve_precision
from fcmae.preemption import StopOnSignal
from fcmae.rundir import TENSORBOARD, RunDir
from fcmae.training.callbacks import AtomicCheckpointIO, RandomState, SkippedFiles, progress_output

# `--workers auto` gives a device at most this many loader processes: more cost memory (each
# holds its own decoding buffers) and feed no GPU faster (docs/internals.md, "Threads").
MAX_AUTO_WORKERS = 16


def make_strategy(cfg, world=None, accumulate=1):
    """The strategy of --strategy on `world` processes: DDP (`ddp_strategy`) whenever it is DDP
    ("ddp", or "auto" on more than one process), FSDP (`fsdp_strategy`), else Lightning's choice
    (`world` None: Lightning's, as for counting the processes)."""
    name = cfg.get("strategy", "auto")
    if name == "fsdp":
        if cfg.accelerator == "cpu" or not torch.cuda.is_available():
            raise UserError("--strategy fsdp needs CUDA GPUs (Lightning's FSDP is GPU-only): use --strategy ddp here")
        return fsdp_strategy(resolve_precision(cfg.precision, cfg.accelerator))
    if name == "ddp" or (name == "auto" and (world or 1) > 1):
        return ddp_strategy(accumulate)
    return name  # one process


def ddp_strategy(accumulate):
    """Lightning's DDP with gradients as views into DDP's all-reduce buckets (no copy per step,
    less memory) and, without gradient accumulation, a static graph: every step uses the same
    parameters in the same order (no control flow on the data; drop path multiplies rather than
    skips; the EMA copy and a linear probe's frozen encoder hold no trainable parameter; the kNN
    monitor and the reconstruction previews run outside DDP's forward), so DDP plans its buckets
    once. torch's static graph fails when the first step's backward runs under `no_sync`, which
    is how Lightning accumulates."""
    from lightning.pytorch.strategies import DDPStrategy
    return DDPStrategy(gradient_as_bucket_view=True, static_graph=accumulate == 1)


def fsdp_mixed_precision(precision):
    """FSDP's mixed-precision policy for a Lightning precision: parameters gathered in the autocast
    dtype, gradients reduced across ranks in float32 (as DDP does) and buffers kept in float32;
    inputs not cast, at the root or at any unit, since the loss target (normalized pixels) is
    computed from them. None for "32" (Lightning's float32 policy). Without this, Lightning's
    bf16-mixed policy reduces gradients in bf16 and casts the batch at the root."""
    dtype = DTYPES[precision]
    if dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecision
    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32,
                          cast_forward_inputs=False, cast_root_forward_inputs=False)


def fsdp_strategy(precision):
    """Lightning's FSDP: one unit per ConvNeXt V2 block, the original parameters kept (their
    weight-decay groups hold), `fsdp_mixed_precision(precision)`."""
    from lightning.pytorch.strategies import FSDPStrategy

    from fcmae.encoders.convnextv2 import Block
    return FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True, mixed_precision=fsdp_mixed_precision(precision))


@contextmanager
def _quiet_lightning():
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def planning_trainer(cfg):
    """A Trainer on the hardware flags alone, to count devices before the run's own exists.
    Builds no process group and prints nothing (the run's Trainer prints its device lines)."""
    with _quiet_lightning():
        return hardware_trainer(cfg, logger=False, enable_checkpointing=False, enable_progress_bar=False)


def world_size(cfg):
    """Processes the run trains on (devices per node x nodes), counted by Lightning itself from
    the hardware flags (`--devices auto` on a node of 4 GPUs: 4), for plans made before the
    Trainer can be built (it needs the accumulation they give)."""
    return planning_trainer(cfg).world_size


def cores():
    """The CPU cores this process may run on (its affinity: a scheduler's allocation, taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_workers(cfg):
    """Loader processes per device for `--workers auto`: the node's cores shared among its
    devices, less what each training process needs itself: on a GPU one core (it drives the
    device), on the CPU half of them (its compute threads, `training_threads`); at most
    MAX_AUTO_WORKERS. 2 cores, CPU: 1 (and 1 compute thread); 96 cores, 8 GPUs: 11 per GPU."""
    trainer = planning_trainer(cfg)
    share = cores() // trainer.num_devices
    workers = share // 2 if isinstance(trainer.accelerator, CPUAccelerator) else share - 1
    return max(0, min(workers, MAX_AUTO_WORKERS))


def training_threads(workers, devices):
    """Compute threads of each training process on the CPU: its share of the node's cores less
    its loader workers' (oversubscribed OpenMP threads spin against each other)."""
    return max(1, cores() // devices - workers)


def make_trainer(cfg, output, callbacks, epochs, accumulate, **kwargs):
    """The run's Trainer: the hardware flags, crash-safe checkpoint files, TensorBoard under
    <output>/tensorboard, SkippedFiles (every batch counts its skipped files; their names are
    listed in <output>/skipped_files.txt), StopOnSignal (a scheduler's signal saves
    <output>/checkpoints/last.ckpt and stops the run), RandomState (the RNG states travel with
    the checkpoint), the progress output (`progress_output`: a bar in a terminal, a line every
    --log-every steps in a log), `epochs` and `accumulate` as the run resolved them; `kwargs` go
    to L.Trainer (`max_steps` among them replaces --max-steps: a task whose length is counted in
    steps)."""
    run = RunDir(output)
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # What Lightning would pick under srun, without its auto-requeue: StopOnSignal saves the
        # one checkpoint to resume from, the job script requeues (README, "When things go wrong").
        plugins.append(SLURMEnvironment(auto_requeue=False))
    max_steps = kwargs.pop("max_steps", cfg.max_steps)
    return hardware_trainer(
        cfg, precision=resolve_precision(cfg.precision, cfg.accelerator), max_epochs=epochs, max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=TensorBoardLogger(output, name=TENSORBOARD, version="", default_hp_metric=False),
        callbacks=[SkippedFiles(run.skipped_files), StopOnSignal(run.last), RandomState(),
                   progress_output(cfg.log_every, accumulate), *callbacks],
        plugins=plugins, log_every_n_steps=cfg.log_every, default_root_dir=output, world=world_size(cfg),
        # Every task trains at a fixed input size in full batches: cuDNN times its kernels once
        # per shape and keeps the fastest.
        benchmark=True, **kwargs)


def hardware_trainer(cfg, world=None, **kwargs):
    """L.Trainer on the hardware flags (and `kwargs`) on `world` processes (`make_strategy`);
    Lightning's refusal of them is one line."""
    strategy = make_strategy(cfg, world, kwargs.get("accumulate_grad_batches", 1))
    try:
        return L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                         strategy=strategy, **kwargs)
    except (MisconfigurationException, TypeError, ValueError) as e:
        raise UserError(f"--accelerator {cfg.accelerator} --devices {cfg.devices} --num-nodes {cfg.num_nodes}: "
                        f"{str(e).splitlines()[0]}") from None
