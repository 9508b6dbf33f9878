"""The FCMAE LightningModule: the model, its loss, the optimizer and the schedule. The Trainer
owns the loop, devices, precision, checkpoints and logging."""
import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from fcmae.errors import NonFiniteLoss
from fcmae.model import FCMAE
from fcmae.optim import StepSchedule, no_weight_decay, param_groups


class PretrainModule(StepSchedule, L.LightningModule):
    def __init__(self, model="atto", backend="dense", in_chans=3, input_size=224, mask_ratio=0.6,
                 norm_pix_loss=True, decoder_depth=1, decoder_dim=512, drop_path_rate=0.0,
                 lr=1.5e-4, min_lr=0.0, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=0.0, config=None):
        """`config`: the run's resolved command-line configuration, kept in checkpoints (and
        exported with the weights) for the record."""
        super().__init__()
        self.save_hyperparameters()
        self.model = FCMAE(model, backend, in_chans, input_size, mask_ratio, norm_pix_loss,
                           decoder_depth, decoder_dim, drop_path_rate)
        self.no_weight_decay = no_weight_decay(self.model)  # before FSDP flattens the parameters

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
        """Raise NonFiniteLoss if `value` is NaN/inf on any rank (all ranks agree, so none is left
        waiting in a collective). It is raised before this step's optimizer update and before any
        checkpoint of it, so the last checkpoint keeps the last good state."""
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(value).all()), all=True):
            # global_step counts finished optimizer steps
            raise NonFiniteLoss(what, value.item(), self.trainer.global_step + 1, self.hparams.lr)

    def make_optimizer(self):
        hp = self.hparams
        return torch.optim.AdamW(param_groups(self.model, hp.weight_decay, self.no_weight_decay), lr=hp.lr,
                                 betas=tuple(hp.betas))

    def configure_optimizers(self):
        optimizer = self.make_optimizer()
        # Per optimizer step (not per epoch), as in the paper.
        return {"optimizer": optimizer, "lr_scheduler": self.lr_schedule(optimizer, self.hparams.warmup_epochs,
                                                                         self.hparams.min_lr)}
