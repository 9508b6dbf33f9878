"""The one run layer of every training task: from parsed flags to a trained, saved run.

A task is a `Task` subclass (pre-training: fcmae/training/pretrain.py; classification:
finetune/task.py). Its command (fcmae/commands/<name>.py, registered in fcmae/cli.py COMMANDS,
and in RECIPE_COMMANDS if it has configs/<name>/<size>.yaml) builds the parser from
training.flags' groups plus its own flags, and runs
`train(SomeTask(cfg, training.flags.recipe_values(build_parser(), cfg)))`. The task contributes
only what is its own:

    command             class attribute ("pretrain", "finetune", ...): the kind of checkpoint a
                        resume accepts (read_run_checkpoint), and its recipes' folder
    __init__(cfg, recipe)   put defaults that depend on other flags (the output folder) into cfg;
                        `recipe`: what the recipe alone gives, to tell flags the user passed
    check()             cheap checks of the flags before any data is read; call
                        training.flags.check(cfg, *its own counts) for the shared ones
    resume_values()     {hyperparameter: this run's value} a checkpoint must agree with to resume
    data(output, world) the LightningDataModule: finds and checks the data now; serves each rank
                        its share itself (the Trainer has use_distributed_sampler=False; any
                        (train, val) datasets: fcmae.data.modules.LabelledData); has
                        `batches_per_epoch(world)` for the lr schedule; its batches are named
                        tuples with a `skipped` field (fcmae.data.labelled.Labelled, ...)
    plan(world, data)   the resolved configuration, a dict of plain values (it is printed,
                        written to config.yaml and kept in checkpoints): `base_plan(cfg, world,
                        accumulate, values)` (flags, world size, accumulation, effective batch,
                        precision, the lr rule), then the schedule fitted to the data and `notes`
                        (one line per change to the recipe; `few_steps_warning`). It must hold
                        "epochs" and "accumulate". Called again with cfg.accumulate set when a
                        resume keeps the checkpoint's effective batch
    callbacks(resolved, output)    its own callbacks (the Trainer already has checkpoint IO, progress,
                        last.ckpt on a signal, skipped files, RNG state and TensorBoard)
    trainer_options(resolved)      more L.Trainer arguments (gradient clipping, no validation)
    on_device(resolved, trainer)   values that depend on the device the Trainer picked
    module(resolved, data)         the LightningModule, built by keyword from a settings
                        dataclass whose fields are its hyper_parameters (fcmae.module.PretrainSettings);
                        fcmae.optim.StepSchedule gives it the lr schedule
    finish(trainer, module, resolved)   the final outputs (exports, reports; rank 0 writes them):
                        what `train` returns

Every file name of a run directory is fcmae.rundir's (add a new one there); metrics rows go
through rundir.append_metrics. Library code raises fcmae.errors.SettingError naming settings,
which reads as the flags of the same name; a task words the others (`e.worded(flags)`).

What the run layer does once for all of them (`train`): choose the loader workers for
`--workers auto` (training.trainer.auto_workers), check the run directory, find the checkpoint to
resume (`resume_checkpoint`, refusing another model's; an unreadable last.ckpt gives way to the
run's newest readable checkpoint), keep the checkpoint's effective batch on another device count
(`keep_effective_batch`), build the Trainer (training.trainer: its progress output is a bar in a
terminal, a plain line every --log-every steps otherwise), print the resolved configuration (and
stop there with --dry-run), print the notes, seed, build the module (its weights channels-last
with --channels-last), write config.yaml and fit (`fit`: a non-finite loss names the last good
checkpoint, a signal leaves last.ckpt and raises `Stopped`).
A task's plan is a pure function of its flags and data, so a resumed run plans the same
schedule again.
"""
import math
import os
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_only

from fcmae.checkpoints import read_run_checkpoint
from fcmae.errors import NonFiniteLoss, UserError
from fcmae.precision import auto_precision, resolve_precision, use_tf32
from fcmae.rundir import RunDir, read_scalars, write_config
from fcmae.training.callbacks import LastCheckpoint
from fcmae.training.trainer import auto_workers, make_trainer, training_threads, world_size


class Task:
    """One training task, as `train` drives it (see the module docstring for each member)."""
    command = None

    def __init__(self, cfg, recipe=None):
        self.cfg = cfg  # the parsed flags, the recipe file's values in them
        self.recipe = recipe  # what the recipe alone gives (training.flags.recipe_values)

    def check(self):
        raise NotImplementedError

    def resume_values(self):
        return {}

    def data(self, output, world):
        raise NotImplementedError

    def plan(self, world, data):
        raise NotImplementedError

    def callbacks(self, resolved, output):
        return []

    def trainer_options(self, resolved):
        return {}

    def on_device(self, resolved, trainer):
        pass

    def module(self, resolved, data):
        raise NotImplementedError

    def finish(self, trainer, module, resolved):
        return None


def train(task):
    """Run `task` from its flags to its final outputs: returns `task.finish(...)`, or None with
    --dry-run (which stops after printing the resolved configuration)."""
    task.check()
    if task.cfg.workers == "auto":  # what this machine has: the resolved configuration says how many
        task.cfg = task.cfg.clone()
        task.cfg.workers = auto_workers(task.cfg)
    cfg = task.cfg
    output = Path(cfg.output)
    world = world_size(cfg)
    data = task.data(output, world)
    ckpt_path = resume_checkpoint(task.command, cfg, output, task.resume_values())
    resolved = task.plan(world, data)
    accumulate = keep_effective_batch(task.command, cfg, ckpt_path, resolved["accumulate"], world)
    if accumulate != resolved["accumulate"]:  # resumed on another device count: the checkpoint's effective batch
        task.cfg = cfg = cfg.clone()
        cfg.accumulate = accumulate
        resolved = task.plan(world, data)
    resolved["resume_from"] = ckpt_path
    trainer = make_trainer(cfg, output, task.callbacks(resolved, output), epochs=resolved["epochs"],
                           accumulate=resolved["accumulate"],
                           use_distributed_sampler=False,  # our data modules shard per rank (resumable)
                           **task.trainer_options(resolved))
    task.on_device(resolved, trainer)
    print_config(resolved)
    print_precision(cfg)
    if cfg.dry_run:
        return None
    print_notes(resolved)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = task.module(resolved, data)
    if cfg.get("channels_last"):  # before the strategy wraps it: DDP's buckets take the parameters' strides
        module = module.to(memory_format=torch.channels_last)
    fit(trainer, module, resolved, ckpt_path, datamodule=data)
    return task.finish(trainer, module, resolved)


# ----------------------------------------------------------------------------- resolving

def lr_for(cfg, blr, effective_batch):
    """The lr rule: --lr as given, else blr x effective batch / 256."""
    return cfg.lr if cfg.lr is not None else blr * effective_batch / 256


def batch_plan(cfg, world=None):
    """(accumulate, effective batch) on `world` processes (default: as the hardware flags give):
    --accumulate wins; else it comes from --effective-batch (fine-tuning, segmentation)."""
    world = world or world_size(cfg)
    per_step = cfg.batch_size * world
    accumulate = cfg.accumulate
    if accumulate is None:
        target = cfg.effective_batch or per_step
        if target % per_step:
            raise UserError(f"--effective-batch {target} is not a multiple of --batch-size {cfg.batch_size} x "
                            f"{world} device(s): change one, or pass --accumulate")
        accumulate = max(1, target // per_step)
    return accumulate, per_step * accumulate


def base_plan(cfg, world, accumulate, values=None):
    """What every run resolves the same way: its flags (the recipe file's path dropped: its values
    are in), `values` (the task's values in force, e.g. its probe recipe's blr), the accumulation,
    world size, effective batch, precision and lr."""
    values = dict(values or {})
    effective_batch = cfg.batch_size * world * accumulate
    flags = {k: v for k, v in cfg.clone().as_dict().items() if k != "config"}
    blr = values["blr"] if "blr" in values else cfg.get("blr")  # none: the task's lr is absolute (--lr)
    return {**flags, **values, "accumulate": accumulate, "effective_batch": effective_batch, "world_size": world,
            "precision": resolve_precision(cfg.precision, cfg.accelerator), "lr": lr_for(cfg, blr, effective_batch)}


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


# ----------------------------------------------------------------------------- resuming

def resume_checkpoint(command, cfg, output, expected):
    """The checkpoint a run continues from, or None.

    --resume is "auto" (OUTPUT/checkpoints/last.ckpt if present) or a path; --no-resume: None.
    An unreadable last.ckpt (a disk fault, a copy cut short) gives way to the newest readable
    other checkpoint of the run (`fallback_checkpoint`). `expected` maps hyperparameter names to
    this run's values: a checkpoint that disagrees is refused.
    """
    check_output(output)
    if cfg.no_resume:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not path.is_file():
            raise UserError(f"--resume {cfg.resume}: no such checkpoint file: pass a .ckpt path, or --resume auto")
        checkpoint = read_run_checkpoint(path, command, trust=cfg.trust_checkpoint)
    else:
        path = RunDir(output).last
        if not path.is_file():
            return None
        try:
            checkpoint = read_run_checkpoint(path, command, trust=cfg.trust_checkpoint)
        except UserError as e:
            if "--trust-checkpoint" in str(e):
                raise
            path, checkpoint = fallback_checkpoint(command, cfg, output, e)
    saved = checkpoint.get("hyper_parameters", {})
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise UserError(f"{path} was trained with {key}={saved[key]}, this run asks for {value}: "
                            f"use another --output, or --no-resume to start over")
    return str(path)


def fallback_checkpoint(command, cfg, output, error):
    """(path, checkpoint) of the run's newest readable checkpoint other than its unreadable
    last.ckpt (`error` says why): the periodic step*.ckpt (or best.ckpt) files of
    OUTPUT/checkpoints, by their step. One line says which, and how many steps that costs (as
    far as the run's TensorBoard log shows the step it had reached); none readable: `error`."""
    run = RunDir(output)
    found = []
    for path in sorted(run.checkpoints.glob("*.ckpt")):
        if path.name == run.last.name:
            continue
        try:
            found.append((read_run_checkpoint(path, command, trust=cfg.trust_checkpoint), path))
        except UserError:
            continue
    if not found:
        raise UserError(f"{error} (no other checkpoint in {run.checkpoints} is readable either)") from None
    checkpoint, path = max(found, key=lambda f: f[0].get("global_step", 0))
    step, reached = checkpoint.get("global_step", 0), logged_step(run)
    cost = (f"the run had reached step {reached}, so {reached - step} step{'s' * (reached - step > 1)} "
            f"({step + 1}-{reached}) are trained again" if reached > step else f"the steps after {step} are trained again")
    if rank_zero_only.rank == 0:
        fact = str(error).split(": pass ")[0]  # "cannot read PATH (why)", without the advice for --resume
        print(f"{fact}: resuming from {path}, the newest readable checkpoint of the run (step {step}); {cost}",
              flush=True)
    return path, checkpoint


def logged_step(run):
    """How many optimizer steps the run had done, as its TensorBoard log tells (0 if it does
    not): the training loss is logged during a step, under the count of steps done before it."""
    losses = read_scalars(run.tensorboard, "train/loss")
    return losses[-1][0] + 1 if losses else 0


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


# ----------------------------------------------------------------------------- printing and fitting

def print_config(resolved):
    """Print the run's resolved configuration as YAML (once, on rank 0); with --dry-run the
    command stops after this."""
    if rank_zero_only.rank == 0:
        print(yaml.safe_dump(resolved, sort_keys=False), end="", flush=True)


def print_precision(cfg):
    """One line (rank 0) with what `--precision auto` picked here and why."""
    if cfg.precision == "auto" and rank_zero_only.rank == 0:
        precision, why = auto_precision(cfg.accelerator)
        print(f"--precision auto -> {precision}: {why}", flush=True)


def print_notes(resolved):
    """The resolved configuration's `notes` (what the run changed in the recipe, or doubts about
    it), one printed line each, after print_config: printed, not Python warnings, which job
    scripts often filter. --dry-run shows them inside the YAML instead."""
    if rank_zero_only.rank == 0:
        for line in resolved.get("notes", []):
            print(line, flush=True)


def fit(trainer, module, resolved, ckpt_path=None, **data):
    """Write config.yaml and train: `trainer.fit(module, **data, ckpt_path=...)`. A non-finite
    loss comes out as NonFiniteLoss naming the last good checkpoint (LastCheckpoint's), if any;
    a scheduler's signal as `Stopped` (fcmae.errors), after last.ckpt was saved: the task
    writes no final files then (no export, no classifier), the rerun does."""
    if trainer.is_global_zero:
        write_config(resolved["output"], resolved)
    if trainer.strategy.root_device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Leave the loader workers their cores (docs/internals.md, "Threads").
        torch.set_num_threads(training_threads(resolved["workers"], trainer.num_devices))
    use_tf32()
    try:
        with warnings.catch_warnings():
            # Our data modules resume inside an epoch themselves (they skip what the checkpoint's
            # step count says was trained on); Lightning cannot see that and would warn each time.
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            # Shards: each loader worker yields exactly its share of the epoch, so the length holds.
            warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
            # Lightning reads the checkpoint through AtomicCheckpointIO.load_checkpoint, which
            # unpickles fully only when told the file is trusted.
            trainer.fit(module, ckpt_path=ckpt_path, weights_only=not resolved.get("trust_checkpoint", False), **data)
    except NonFiniteLoss as e:
        last = next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
        if last is not None and last.saved_step and last.path.is_file():
            e.checkpoint = (last.path, last.saved_step)
        raise
