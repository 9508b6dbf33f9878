"""The Trainer of every training run: the hardware flags (accelerator, devices, nodes, strategy,
precision), crash-safe checkpoint files, TensorBoard, the run layer's own callbacks, and the
device count Lightning gives for plans made before the Trainer exists."""
import logging
from contextlib import contextmanager

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from fcmae.errors import UserError
from fcmae.precision import resolve_precision
from fcmae.preemption import StopOnSignal
from fcmae.rundir import TENSORBOARD, RunDir
from fcmae.training.callbacks import AtomicCheckpointIO, RandomState, SkippedFiles


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
    <output>/tensorboard, SkippedFiles (every batch counts its skipped files; their names are
    listed in <output>/skipped_files.txt), StopOnSignal (a scheduler's signal saves
    <output>/checkpoints/last.ckpt and stops the run), RandomState (the RNG states travel with
    the checkpoint), `epochs` and `accumulate` as the run resolved them; `kwargs` go to L.Trainer
    (`max_steps` among them replaces --max-steps: a task whose length is counted in steps)."""
    run = RunDir(output)
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # What Lightning would pick under srun, without its auto-requeue: StopOnSignal saves the
        # one checkpoint to resume from, the job script requeues (README, "When things go wrong").
        plugins.append(SLURMEnvironment(auto_requeue=False))
    max_steps = kwargs.pop("max_steps", cfg.max_steps)
    return hardware_trainer(
        cfg, precision=resolve_precision(cfg.precision), max_epochs=epochs, max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=TensorBoardLogger(output, name=TENSORBOARD, version="", default_hp_metric=False),
        callbacks=[SkippedFiles(run.skipped_files), StopOnSignal(run.last), RandomState(), *callbacks],
        plugins=plugins, log_every_n_steps=cfg.log_every, default_root_dir=output, **kwargs)


def hardware_trainer(cfg, **kwargs):
    """L.Trainer on the hardware flags (and `kwargs`); Lightning's refusal of them is one line."""
    strategy = make_strategy(cfg.get("strategy", "auto"), cfg.accelerator)
    try:
        return L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                         strategy=strategy, **kwargs)
    except (MisconfigurationException, TypeError, ValueError) as e:
        raise UserError(f"--accelerator {cfg.accelerator} --devices {cfg.devices} --num-nodes {cfg.num_nodes}: "
                        f"{str(e).splitlines()[0]}") from None
