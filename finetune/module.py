"""The fine-tuning LightningModule: only what is specific to fine-tuning (Mixup/CutMix, the loss,
layer-decayed AdamW, the weight EMA, the linear probe). Lightning
owns the loop, devices, precision, checkpoints and logging.

`self.model` is the dense ConvNeXtV2 and `self.model_ema` timm's ModelEmaV3 of it, so a
checkpoint holds the classifier as `model.*` and its EMA as `model_ema.module.*`.
"""
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

import lightning as L
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars
from timm.utils import ModelEmaV3, accuracy

from fcmae.finetune import layer_decay
from fcmae.optim import StepSchedule, adamw, no_weight_decay, param_groups
from fcmae.training.callbacks import writes_logs


@dataclass(frozen=True)
class FinetuneSettings:
    """What a FinetuneModule trains with (`ema_decay` None: no EMA) and the facts about its
    classifier that `fcmae eval`, `predict` and the exports read back (`arch`, `in_chans`,
    `input_size`, `crop_pct`, `classes`). The fields are the module's keyword arguments and, flat,
    its checkpoints' hyper_parameters."""
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 0
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    layer_decay_type: str = "single"
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    ema_decay: Optional[float] = None
    linear_probe: bool = False
    arch: Union[str, dict, None] = None  # a size name or {"depths": [...], "dims": [...]}
    in_chans: Optional[int] = None
    input_size: Optional[int] = None
    crop_pct: Optional[float] = None
    classes: Optional[list] = None

    @classmethod
    def from_config(cls, resolved, classes):
        """From a run's resolved configuration (keys named as the flags: model for arch)."""
        own = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in resolved.items() if k in own}, arch=resolved["model"], classes=list(classes))


class FinetuneModule(StepSchedule, L.LightningModule):
    def __init__(self, model, *, config=None, **settings):
        """`model`: a dense ConvNeXtV2, already holding its pre-trained weights. `settings`:
        FinetuneSettings' fields by keyword (a checkpoint's hyper_parameters are these and
        `config`, the run's resolved configuration, kept for the record)."""
        super().__init__()
        s = FinetuneSettings(**settings)
        self.save_hyperparameters({**asdict(s), "config": config})
        ema_decay, linear_probe, mixup, cutmix, smoothing = s.ema_decay, s.linear_probe, s.mixup, s.cutmix, s.smoothing
        self.model = model
        self.no_weight_decay = no_weight_decay(model)  # before a sharding strategy flattens the parameters
        self.linear_probe = linear_probe
        if linear_probe:
            # MAE's linear probe: frozen encoder, BatchNorm without affine on the pooled
            # features, then a linear head (trunc-normal 0.01) trained alone.
            self.model.requires_grad_(False)
            self.model.head.requires_grad_(True)
            trunc_normal_(self.model.head.weight, std=0.01)
            nn.init.zeros_(self.model.head.bias)
            self.feature_bn = nn.BatchNorm1d(model.num_features, affine=False, eps=1e-6)
        # Built after the pre-trained weights are in, so the EMA starts from them.
        self.model_ema = None
        if ema_decay and not linear_probe:
            self.model_ema = ModelEmaV3(model, decay=ema_decay)
            # Never trained by the optimizer: DDP must not wait for gradients of these copies.
            self.model_ema.requires_grad_(False)
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing,
                               num_classes=model.head.out_features)
            self.criterion = SoftTargetCrossEntropy()  # Mixup already smoothed the targets
        elif smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def train(self, mode=True):
        """The probe's encoder stays in eval mode (no drop path) whatever Lightning asks."""
        super().train(mode)
        if getattr(self, "linear_probe", False):
            self.model.eval()
        return self

    def forward(self, x):
        if not self.linear_probe:
            return self.model(x)
        with torch.no_grad():
            features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.head(self.feature_bn(features))

    def training_step(self, batch, batch_idx):
        x, y = batch.image, batch.label  # fcmae.data.labelled.Labelled; SkippedFiles counts batch.skipped
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        loss = self.criterion(self(x), y)
        if writes_logs(self.trainer):  # values reach the host only every --log-every steps
            self.log("train/loss", loss)
            self.log("lr", max(g["lr"] for g in self.optimizers().param_groups))  # the head's lr
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self._evaluate("val", self(x), y)
        if self.model_ema is not None:
            self._evaluate("val_ema", self.model_ema.module(x), y)

    def _evaluate(self, name, logits, y):
        top1, top5 = accuracy(logits, y, topk=(1, min(5, logits.shape[1])))
        metrics = {"loss": nn.functional.cross_entropy(logits, y), "top1": top1, "top5": top5}
        self.log_dict({f"{name}/{k}": v for k, v in metrics.items()}, batch_size=len(y), sync_dist=True,
                      prog_bar=name == "val")

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        start_next_epoch(checkpoint)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.model_ema is not None:  # once per optimizer step, i.e. after accumulation
            self.model_ema.update(self.model, step=self.global_step)

    def configure_optimizers(self):
        hp = self.hparams
        if self.linear_probe:
            # MAE's LARS: trust-ratio scaling on the weight matrix only, no weight decay on the bias.
            groups = [{"params": [self.model.head.weight], "weight_decay": hp.weight_decay, "always_adapt": True},
                      {"params": [self.model.head.bias], "weight_decay": 0.0}]
            optimizer = Lars(groups, lr=hp.lr, momentum=0.9)
        else:
            depths = self.model.depths
            layer_decay.check(depths, hp.layer_decay_type)
            groups = param_groups(self.model, hp.weight_decay, self.no_weight_decay,
                                  lr_scale=lambda name: layer_decay.lr_scale(name, depths, hp.layer_decay,
                                                                             hp.layer_decay_type))
            optimizer = adamw(groups, self.device, lr=hp.lr)
        # Per-step cosine after a linear warmup from 0, as the release's schedule; each group's
        # lr_scale (layer decay) multiplies it.
        return {"optimizer": optimizer, "lr_scheduler": self.lr_schedule(optimizer, hp.warmup_epochs, hp.min_lr)}


def start_next_epoch(checkpoint):
    """Where a run resumes from a checkpoint written once Lightning had closed the epoch (at the
    end of training, after validation). With --max-steps Lightning resumes such an epoch as an
    unfinished one: after the epoch's last batch it runs it empty, one epoch ahead of an
    uninterrupted run (its data order, the epoch count); stopped inside the epoch, it counts the
    rest of it as the next epoch. Here the first starts the next epoch, as Lightning does without
    --max-steps, and the second reopens the epoch where it stopped."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or "epoch_loop.batch_progress" not in loop:
        return
    epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    if len(set(epochs["current"].values())) > 1:  # saved inside an epoch: Lightning resumes it right
        return
    if batches["is_last_batch"]:
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False
    elif batches["current"]["completed"] > 0:
        for count in (epochs["current"], epochs["total"]):
            count["processed"] -= 1
            count["completed"] -= 1
