"""What every training command optimizes with: one rule for AdamW's parameter groups (weight decay,
optional layer-wise lr scales), one AdamW implementation per device (`adamw`) and one lr schedule per optimizer step (linear warmup from 0, then a
cosine to min_lr: timm's CosineLRScheduler), with the LightningModule hooks that drive it."""
import math

import torch
from timm.scheduler import CosineLRScheduler

# GRN's gamma/beta are (1, 1, 1, C) in the public layout, so the 1-D rule alone would miss them.
NO_DECAY_SUFFIXES = (".bias", "grn.gamma", "grn.beta")


def no_weight_decay(model):
    """Names of the parameters AdamW must not decay: biases, 1-D parameters (norm weights), and
    GRN gamma/beta, which are per-channel gains (the release's later fix). Decided on the
    unwrapped model: FSDP later flattens every parameter to 1-D."""
    return {name for name, p in model.named_parameters() if p.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)}


def param_groups(model, weight_decay, skip=None, lr_scale=None):
    """AdamW parameter groups of `model`'s trainable parameters.

    skip: names never decayed (default: no_weight_decay(model); pass it computed before FSDP
    wraps the model). lr_scale(name) -> float: a per-parameter lr multiplier (layer decay), kept
    as each group's `lr_scale`, which timm's schedulers apply; default 1.
    """
    skip = no_weight_decay(model) if skip is None else skip
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.replace("_fsdp_wrapped_module.", "")
        decay = weight_decay if name not in skip else 0.0
        scale = lr_scale(name) if lr_scale is not None else 1.0
        groups.setdefault((scale, decay), {"params": [], "weight_decay": decay, "lr_scale": scale})["params"].append(p)
    return list(groups.values())


def adamw(groups, device, **kwargs):
    """torch's AdamW over `groups` of parameters on `device`: the fused implementation where torch
    has one (CUDA, CPU: one kernel over all tensors of a group), else foreach. On CPU its step
    takes a quarter of foreach's (docs/internals.md)."""
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, fused=fused, foreach=None if fused else True, **kwargs)


def schedule_steps(batches_per_epoch, accumulate, epochs, warmup_epochs):
    """(optimizer steps per epoch, schedule length, warmup length), in optimizer steps. The
    schedule spans `epochs` whatever --max-steps stops at, so a stopped run resumes on it."""
    per_epoch = math.ceil(batches_per_epoch / accumulate)
    return per_epoch, epochs * per_epoch, round(warmup_epochs * per_epoch)


def cosine_schedule(optimizer, total_steps, warmup_steps, min_lr):
    """The lr at optimizer step t (`step_update(t)`): lr * t / warmup_steps during the warmup,
    then a cosine from lr down to min_lr at `total_steps`, min_lr after; times each group's
    lr_scale. Sets the lr of step 0."""
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr,
                                  warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    scheduler.step_update(num_updates=0)
    return scheduler


class StepSchedule:
    """LightningModule hooks for `cosine_schedule`, stepped once per optimizer step.

    The schedule is a function of the step and of this run's values (lr, epochs, warmup), so on
    resume it is rebuilt from them rather than restored: a rerun with another --lr (e.g. lower,
    after a non-finite loss) follows the new lr from the step it resumes at."""

    def lr_schedule(self, optimizer, warmup_epochs, min_lr):
        """The scheduler config for configure_optimizers; its length comes from the trainer."""
        _, total, warmup = schedule_steps(self.batches_per_epoch(), self.trainer.accumulate_grad_batches,
                                          self.trainer.max_epochs, warmup_epochs)
        return {"scheduler": cosine_schedule(optimizer, total, warmup, min_lr), "interval": "step"}

    def batches_per_epoch(self):
        """Training batches per epoch on each rank. Asked of the datamodule when it can tell
        (PretrainData, FinetuneData): the trainer's estimate would build the train loader now,
        before a resume restores the step the loader continues the epoch from."""
        data = self.trainer.datamodule
        if hasattr(data, "batches_per_epoch"):
            return data.batches_per_epoch(self.trainer.world_size)
        self.trainer.estimated_stepping_batches  # loads the train loader
        return self.trainer.num_training_batches

    def lr_scheduler_step(self, scheduler, metric):
        scheduler.step_update(num_updates=self.global_step)  # global_step: optimizer steps done

    def on_load_checkpoint(self, checkpoint):
        checkpoint["lr_schedulers"] = []  # rebuilt by configure_optimizers (see the class doc)

    def on_train_start(self):
        # A resumed optimizer state carries the lr of the run that saved it: this run's lr at this step.
        self.lr_schedulers().step_update(num_updates=self.global_step)
