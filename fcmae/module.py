"""The FCMAE LightningModule: the model, its loss, the optimizer and the schedule. The Trainer
owns the loop, devices, precision, checkpoints and logging."""
import math

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from fcmae.callbacks import LastCheckpoint
from fcmae.errors import UserError
from fcmae.model import FCMAE


def no_weight_decay(model):
    """Names of the parameters AdamW must not decay: biases, 1-D parameters (norm weights), and
    GRN gamma/beta, which are (1, 1, 1, C) but are per-channel gains (the release's later fix).
    Decided on the unwrapped model: FSDP later flattens every parameter to 1-D."""
    return {name for name, p in model.named_parameters()
            if p.ndim <= 1 or name.endswith((".bias", "grn.gamma", "grn.beta"))}


def param_groups(model, weight_decay, skip):
    """Two AdamW groups, as timm's param_groups_weight_decay, by the names in `skip`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.replace("_fsdp_wrapped_module.", "") in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine(step, warmup_steps, total_steps, min_ratio=0.0):
    """lr multiplier at optimizer step `step`: linear warmup from 0, then cosine to min_ratio."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PretrainModule(L.LightningModule):
    def __init__(self, model="atto", backend="dense", in_chans=3, input_size=224, mask_ratio=0.6,
                 norm_pix_loss=True, decoder_depth=1, decoder_dim=512, drop_path_rate=0.0,
                 lr=1.5e-4, min_lr=0.0, weight_decay=0.05, betas=(0.9, 0.95),
                 warmup_steps=0, total_steps=1, config=None):
        """`config`: the run's resolved command-line configuration, kept in checkpoints (and
        exported with the weights) for the record."""
        super().__init__()
        self.save_hyperparameters()
        self.model = FCMAE(model, backend, in_chans, input_size, mask_ratio, norm_pix_loss,
                           decoder_depth, decoder_dim, drop_path_rate)
        self.no_weight_decay = no_weight_decay(self.model)

    def training_step(self, batch, batch_idx):
        imgs, mask = batch[0], batch[1]  # (N, C, H, W), (N, H/32, W/32); masks come with the data (data.py)
        loss, _, _ = self.model(imgs, mask)
        self.stop_unless_finite(loss, "loss")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_before_optimizer_step(self, optimizer):
        # Called after AMP unscaling, so this is the true gradient norm.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(self.trainer.strategy, FSDPStrategy):  # each rank holds a shard of the gradients
            norm = self.trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        if self.trainer.precision != "16-mixed":  # fp16's loss scaler expects inf gradients and skips the step
            # A finite loss can still give inf/NaN gradients: stop before they reach the weights
            # (and a checkpoint).
            self.stop_unless_finite(norm, "gradient norm")
        self.log("train/grad_norm", norm)

    def stop_unless_finite(self, value, what):
        """Raise a one-line UserError if `value` is NaN/inf on any rank (all ranks agree, so none
        is left waiting in a collective). It is raised before this step's optimizer update and
        before any checkpoint of it, so last.ckpt keeps the last good state."""
        if self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(value).all()), all=True):
            return
        step = self.trainer.global_step + 1  # global_step counts finished optimizer steps
        last = next((cb for cb in self.trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
        if last is not None and last.saved_step and last.path.is_file():
            where = f"the last good checkpoint is {last.path} (step {last.saved_step})"
        else:
            where = "no checkpoint was saved before it"
        raise UserError(f"non-finite {what} ({value.item():g}) at step {step}: training stopped; {where}. "
                        f"Rerun the same command with a lower lr to resume from it, e.g. --lr {self.hparams.lr / 2:.3g} "
                        f"(half of {self.hparams.lr:.3g})")

    def on_load_checkpoint(self, checkpoint):
        """Resuming with another --lr/--blr (e.g. lower, after a non-finite loss) must change
        the lr: the optimizer and the scheduler states in the checkpoint carry the old one
        (param_groups' lr, LambdaLR's base_lrs), and Lightning restores them after this hook."""
        lr = self.hparams.lr
        for scheduler in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in scheduler:
                scheduler["base_lrs"] = [lr] * len(scheduler["base_lrs"])
        for optimizer in checkpoint.get("optimizer_states", []):
            for group in optimizer.get("param_groups", []):
                old = group.get("initial_lr")
                if old and old != lr:
                    group["lr"] = group["lr"] * lr / old  # the same point of the schedule
                    group["initial_lr"] = lr

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, self.no_weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        # Per optimizer step (not per epoch), as in the paper. The lambda is rebuilt from the
        # hyperparameters on resume; the step count comes from the checkpoint.
        min_ratio = hp.min_lr / hp.lr if hp.lr else 0.0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, hp.total_steps, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
