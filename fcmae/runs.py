"""What every training command shares about a run: the hardware, optimization and run-directory
flags and their checks, the device count, the Trainer (precision, strategy, crash-safe
checkpoint files, TensorBoard), resuming, printing the resolved configuration (where --dry-run
stops), the run directory's config.yaml, and where a non-finite loss left the run.

A training command adds the flag groups to its parser (`add_hardware_flags`,
`add_optimization_flags`, `add_run_flags`, then its own flags), and its run calls `check`,
`resume_checkpoint`, `print_config` (returning there with --dry-run), `make_trainer` and `fit`.
"""
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only

from fcmae.callbacks import AtomicCheckpointIO, LastCheckpoint, RandomState, SkippedFiles
from fcmae.checkpoints import read_run_checkpoint
from fcmae.files import atomic_write
from fcmae.errors import NonFiniteLoss, UserError
from fcmae.preemption import StopOnSignal

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
STRATEGIES = ("auto", "ddp", "fsdp")


# ----------------------------------------------------------------------------- flags

def add_hardware_flags(parser, devices="auto", strategy=True):
    """--accelerator, --devices, --num-nodes, --strategy (if `strategy`), --precision, --workers."""
    g = parser.add_argument_group("hardware")
    g.add_argument("--accelerator", type=str, default="auto", help="auto | cpu | gpu | ...")
    g.add_argument("--devices", type=Union[int, str], default=devices, help="devices per node: N, 'auto' or '0,1'")
    g.add_argument("--num-nodes", type=int, default=1)
    if strategy:
        g.add_argument("--strategy", type=Literal[STRATEGIES], default="auto",
                       help="auto = DDP when more than one device; fsdp shards large/huge")
    g.add_argument("--precision", type=Literal[PRECISIONS], default="auto",
                   help="auto = bf16-mixed on GPUs that support it, else 32")
    g.add_argument("--workers", type=int, default=8, help="data loader processes per device")
    return g


def add_optimization_flags(parser, batch_size, epochs, blr, min_lr, warmup_epochs):
    """The flags of the lr schedule and AdamW every training command has, with its defaults.
    Returns the group for the command's own (accumulation, betas, layer decay, ...)."""
    g = parser.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per device per step")
    g.add_argument("--epochs", type=int, default=epochs, help="length of the lr schedule")
    g.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimizer steps (the schedule still spans --epochs); -1: no limit")
    g.add_argument("--blr", type=float, default=blr, help="base lr, per 256 images of effective batch")
    g.add_argument("--lr", type=Optional[float], default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=min_lr, help="lr at the end of the cosine")
    g.add_argument("--warmup-epochs", type=float, default=warmup_epochs, help="linear warmup length")
    g.add_argument("--weight-decay", type=float, default=0.05, help="not on biases, norm weights, GRN gamma/beta")
    g.add_argument("--seed", type=int, default=0)
    return g


def add_run_flags(parser, output_help):
    """--output, --resume, --no-resume, --trust-checkpoint, --log-every, --dry-run. Returns the
    group for the command's own (what it writes, and how often)."""
    g = parser.add_argument_group("run directory")
    g.add_argument("--output", type=Optional[str], default=None, help=output_help)
    g.add_argument("--resume", type=str, default="auto",
                   help="'auto': continue from <output>/checkpoints/last.ckpt if present; or a .ckpt path")
    g.add_argument("--no-resume", action="store_true",
                   help="start from scratch even if <output> holds checkpoints (they are overwritten)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoint/weights files that need full unpickling: this runs code from the file; "
                        "only for files you trust")
    g.add_argument("--log-every", type=int, default=50, help="steps between scalar logs")
    g.add_argument("--dry-run", action="store_true",
                   help="print the fully resolved configuration (devices, batch, lr, ...) and exit")
    return g


def recipe_values(parser, cfg):
    """What the recipe file(s) of `cfg` alone give (the parser's defaults without one), to tell
    the user's flags from the recipe's values."""
    args = []
    for path in cfg.get("config") or []:
        args += ["--config", str(path)]
    return parser.parse_args(args)


def check(cfg, *at_least_one):
    """Cheap checks of the shared flags, and of the command's `at_least_one` counts."""
    for name in ("batch_size", "epochs", "log_every", *at_least_one):
        if cfg[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} {cfg[name]}: must be at least 1")
    if cfg.workers < 0:
        raise UserError(f"--workers {cfg.workers}: must be 0 (load in the training process) or more")


# ----------------------------------------------------------------------------- steps per epoch

# Fewer optimizer steps per epoch than this and an epoch-based schedule (warmup, cosine, EMA,
# one validation per epoch) has too few points to do its job: a small dataset at the recipe's
# effective batch of 1024 gets one step per epoch.
MIN_STEPS_PER_EPOCH = 20


def steps_per_epoch(images, batch_size, world, accumulate):
    """Optimizer steps in an epoch of `images` shared by `world` processes: each rank gets an
    equal share (the distributed sampler pads), drops its last partial batch, and steps once per
    `accumulate` batches (a partial window at the epoch's end steps too)."""
    batches = math.ceil(images / world) // batch_size
    return math.ceil(batches / accumulate)


def few_steps_warning(steps, images, fix):
    """The warning line when an epoch has fewer than MIN_STEPS_PER_EPOCH optimizer steps (else
    None); `fix` says which flags change it. Goes into the run's notes (`print_notes`)."""
    if steps < MIN_STEPS_PER_EPOCH:
        return (f"warning: {images:,} training images give {steps} optimizer step{'s' * (steps != 1)} per epoch "
                f"(fewer than {MIN_STEPS_PER_EPOCH}), too few for the schedule to work with; {fix}")
    return None


# ----------------------------------------------------------------------------- hardware

def make_precision(precision):
    """`auto` -> bf16-mixed on GPUs that support it, else 32; other values pass through."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32"


def make_strategy(name, accelerator):
    if name != "fsdp":
        return name  # "auto": Lightning picks DDP when there is more than one device
    if accelerator == "cpu" or not torch.cuda.is_available():
        raise UserError("--strategy fsdp needs CUDA GPUs (Lightning's FSDP is GPU-only): use --strategy ddp here")
    from lightning.pytorch.strategies import FSDPStrategy

    from fcmae.encoders.convnextv2 import Block
    # One FSDP unit per ConvNeXt V2 block; the original parameters keep their weight-decay groups.
    return FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True)


@contextmanager
def _quiet_lightning():
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def world_size(cfg):
    """Processes the run trains on (devices per node x nodes), counted by Lightning itself from
    the hardware flags (`--devices auto` on a node of 4 GPUs: 4), for plans made before the
    Trainer can be built (it needs the accumulation they give). Builds no process group."""
    with _quiet_lightning():  # its device lines are printed by the run's own Trainer
        return hardware_trainer(cfg, logger=False, enable_checkpointing=False, enable_progress_bar=False).world_size


def make_trainer(cfg, output, callbacks, epochs, accumulate, **kwargs):
    """The run's Trainer: the hardware flags, crash-safe checkpoint files, TensorBoard under
    <output>/tensorboard, SkippedFiles (our data loaders end every batch with a skip count; the
    files are listed in <output>/skipped_files.txt),
    StopOnSignal (a scheduler's signal saves <output>/checkpoints/last.ckpt and stops the run),
    RandomState (the RNG states travel with the checkpoint),
    `epochs` and `accumulate` as the command resolved them; `kwargs` go to L.Trainer."""
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # What Lightning would pick under srun, without its auto-requeue: StopOnSignal saves the
        # one checkpoint to resume from, the job script requeues (README, "When things go wrong").
        plugins.append(SLURMEnvironment(auto_requeue=False))
    stop = StopOnSignal(Path(output) / "checkpoints" / "last.ckpt")
    return hardware_trainer(
        cfg, precision=make_precision(cfg.precision), max_epochs=epochs, max_steps=cfg.max_steps,
        accumulate_grad_batches=accumulate,
        logger=TensorBoardLogger(output, name="tensorboard", version="", default_hp_metric=False),
        callbacks=[SkippedFiles(Path(output) / "skipped_files.txt"), stop, RandomState(), *callbacks], plugins=plugins,
        log_every_n_steps=cfg.log_every,
        default_root_dir=output, **kwargs)


def hardware_trainer(cfg, **kwargs):
    """L.Trainer on the hardware flags (and `kwargs`); Lightning's refusal of them is one line."""
    strategy = make_strategy(cfg.get("strategy", "auto"), cfg.accelerator)
    try:
        return L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                         strategy=strategy, **kwargs)
    except (MisconfigurationException, TypeError, ValueError) as e:
        raise UserError(f"--accelerator {cfg.accelerator} --devices {cfg.devices} --num-nodes {cfg.num_nodes}: "
                        f"{str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- run directory

def resume_checkpoint(command, cfg, output, expected):
    """The checkpoint a run continues from, or None.

    --resume is "auto" (OUTPUT/checkpoints/last.ckpt if present) or a path; --no-resume: None.
    `expected` maps hyperparameter names to this run's values: a checkpoint that disagrees is
    refused.
    """
    check_output(output)
    if cfg.no_resume:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not path.is_file():
            raise UserError(f"--resume {cfg.resume}: no such checkpoint file: pass a .ckpt path, or --resume auto")
    else:
        path = Path(output) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            return None
    saved = read_run_checkpoint(path, command, trust=cfg.trust_checkpoint).get("hyper_parameters", {})
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise UserError(f"{path} was trained with {key}={saved[key]}, this run asks for {value}: "
                            f"use another --output, or --no-resume to start over")
    return str(path)


def check_output(output):
    """The run directory may exist (a resumed run), but must not be a file."""
    if Path(output).exists() and not Path(output).is_dir():
        raise UserError(f"--output {output} is a file, not a folder: pass a run directory (new or existing)")


def keep_effective_batch(command, cfg, ckpt_path, accumulate, world=None):
    """The gradient accumulation that gives a resumed run the effective batch its checkpoint was
    trained with, on this run's `world` processes (default: as the hardware flags give) and
    --batch-size: a cluster may give a requeued job another number of GPUs, and the effective
    batch sets the lr, the steps per epoch and so the whole schedule. The checkpoint wins over
    `accumulate` (given or not); one line says what changed. None: a new run, `accumulate` as is.

    What stays exact: the lr schedule and optimizer state (from the checkpoint), and, for
    pre-training on a folder and fine-tuning, which samples every later optimizer step trains on
    (each rank takes every world-th key of one permutation, so the union over ranks of a step's
    batches is the same set); only the summation order of the gradient changes. Shards are split
    by rank, so the rest of an interrupted epoch differs there."""
    if ckpt_path is None:
        return accumulate
    saved = read_run_checkpoint(ckpt_path, command, trust=cfg.trust_checkpoint)["hyper_parameters"]
    saved = saved.get("config") or {}
    effective = saved.get("effective_batch")
    world = world or world_size(cfg)
    per_step = cfg.batch_size * world
    if effective is None or per_step * accumulate == effective:
        return accumulate
    if effective % per_step:
        raise UserError(f"{ckpt_path} was trained with an effective batch of {effective}, which --batch-size "
                        f"{cfg.batch_size} x {world} device(s) does not divide: pass a --batch-size that divides "
                        f"{effective} / {world}, or resume on {saved.get('world_size')} device(s)")
    kept = effective // per_step
    if rank_zero_only.rank == 0:
        print(f"resuming on {world} device(s) with --batch-size {cfg.batch_size} (the checkpoint: "
              f"{saved.get('world_size')} x {saved.get('batch_size')}): --accumulate {accumulate} -> {kept} keeps its "
              f"effective batch of {effective}, so lr and schedule stay as they were", flush=True)
    return kept


def print_config(resolved):
    """Print the run's resolved configuration as YAML (once, on rank 0); with --dry-run the
    command stops after this."""
    if rank_zero_only.rank == 0:
        print(yaml.safe_dump(resolved, sort_keys=False), end="", flush=True)


def print_notes(resolved):
    """The resolved configuration's `notes` (what the run changed in the recipe, or doubts about
    it), one printed line each, after print_config: printed, not Python warnings, which job
    scripts often filter. --dry-run shows them inside the YAML instead."""
    if rank_zero_only.rank == 0:
        for line in resolved.get("notes", []):
            print(line, flush=True)


def write_config(output, resolved):
    """<output>/config.yaml, atomically (a crash leaves the previous one or none)."""
    atomic_write(Path(output) / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(resolved, sort_keys=False)))


# ----------------------------------------------------------------------------- training

def fit(trainer, module, resolved, ckpt_path=None, **data):
    """Write config.yaml and train: `trainer.fit(module, **data, ckpt_path=...)`. A non-finite
    loss comes out as NonFiniteLoss naming the last good checkpoint (LastCheckpoint's), if any;
    a scheduler's signal as `Stopped` (fcmae.errors), after last.ckpt was saved: the command
    writes no final files then (no encoder export, no classifier), the rerun does."""
    output = Path(resolved["output"])
    if trainer.is_global_zero:
        write_config(output, resolved)
    if trainer.strategy.root_device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave the loader workers their cores: oversubscribed OpenMP threads spin against each
        # other (measured: 2 threads + 1 worker on 2 busy cores ran 5x slower than 1 thread).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores - resolved["workers"]) // trainer.num_devices))
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    try:
        # Lightning reads the checkpoint through AtomicCheckpointIO.load_checkpoint, which
        # unpickles fully only when told the file is trusted.
        trainer.fit(module, ckpt_path=ckpt_path, weights_only=not resolved.get("trust_checkpoint", False), **data)
    except NonFiniteLoss as e:
        last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
        if last is not None and last.saved_step and last.path.is_file():
            e.checkpoint = (last.path, last.saved_step)
        raise
