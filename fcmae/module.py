"""The FCMAE LightningModule: the model, its loss, the optimizer and the schedule. The Trainer
owns the loop, devices, precision, checkpoints and logging."""
from dataclasses import asdict, dataclass, fields
from typing import Union

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from fcmae.masking import num_visible
from fcmae.model import FCMAE
from fcmae.optim import StepSchedule, StopUnlessFinite, adamw, no_weight_decay, param_groups
from fcmae.training.callbacks import writes_logs


@dataclass(frozen=True)
class PretrainSettings:
    """What a PretrainModule is built from: the model and its optimization. The fields are the
    module's keyword arguments and, flat, its checkpoints' hyper_parameters."""
    model: Union[str, dict] = "atto"  # a size name, or {"depths": [...], "dims": [...]}
    backend: str = "dense"
    in_chans: int = 3
    input_size: int = 224
    mask_ratio: float = 0.6
    norm_pix_loss: bool = True
    decoder_depth: int = 1
    decoder_dim: int = 512
    drop_path_rate: float = 0.0
    lr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    warmup_epochs: float = 0.0

    @classmethod
    def from_config(cls, resolved):
        """From a run's resolved configuration (keys named as the flags: drop_path, betas as a list)."""
        own = {f.name for f in fields(cls)}
        values = {k: v for k, v in resolved.items() if k in own}
        return cls(**{**values, "drop_path_rate": resolved["drop_path"], "betas": tuple(resolved["betas"])})


class PretrainModule(StepSchedule, StopUnlessFinite, L.LightningModule):
    def __init__(self, *, config=None, **settings):
        """`settings`: PretrainSettings' fields by keyword (so a checkpoint's hyper_parameters
        rebuild the module: `PretrainModule(**hparams)`). `config`: the run's resolved
        configuration, kept in checkpoints (and exported with the weights) for the record."""
        super().__init__()
        s = PretrainSettings(**settings)
        self.save_hyperparameters({**asdict(s), "config": config})
        self.model = FCMAE(model=s.model, backend=s.backend, in_chans=s.in_chans, img_size=s.input_size,
                           mask_ratio=s.mask_ratio, norm_pix_loss=s.norm_pix_loss, decoder_depth=s.decoder_depth,
                           decoder_dim=s.decoder_dim, drop_path_rate=s.drop_path_rate)
        self.no_weight_decay = no_weight_decay(self.model)  # before FSDP flattens the parameters

    def training_step(self, batch, batch_idx):
        imgs, mask = batch.view, batch.mask  # (N, C, H, W), (N, H/32, W/32): fcmae.data.views.MaskedView
        # Every view's mask is drawn at the run's ratio (fcmae.data.views.augment): its visible count,
        # known here, spares the sparse backend reading it from the mask (a host-device sync).
        visible = num_visible(mask[0].numel(), self.model.mask_ratio)
        loss, _, _ = self.model(imgs, mask, visible)
        self.last_loss = loss.detach()  # read back only to name a non-finite step
        if writes_logs(self.trainer):  # values reach the host only every --log-every steps
            if self.trainer.precision == "16-mixed":
                # fp16's loss scaler keeps non-finite updates off the weights (it skips them); a
                # loss that stays non-finite stops the run here.
                self.stop_unless_finite(loss, "loss", agreed=False)
            self.log("train/loss", loss)
            self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_before_optimizer_step(self, optimizer):
        # Called after AMP unscaling, so this is the true gradient norm.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(self.trainer.strategy, FSDPStrategy):  # each rank holds a shard of the gradients
            norm = self.trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        if self.trainer.precision != "16-mixed":  # fp16's loss scaler expects inf gradients and skips the step
            # The step's one finite check (a non-finite loss gives non-finite gradients): it stops
            # the run before NaN/inf reach the weights (and a checkpoint).
            self.stop_unless_finite(norm, "gradient norm", agreed=True)
        if writes_logs(self.trainer):
            self.log("train/grad_norm", norm)

    def make_optimizer(self):
        hp = self.hparams
        return adamw(param_groups(self.model, hp.weight_decay, self.no_weight_decay), self.device, lr=hp.lr,
                     betas=tuple(hp.betas))

    def configure_optimizers(self):
        optimizer = self.make_optimizer()
        # Per optimizer step (not per epoch), as in the paper.
        return {"optimizer": optimizer, "lr_scheduler": self.lr_schedule(optimizer, self.hparams.warmup_epochs,
                                                                         self.hparams.min_lr)}
