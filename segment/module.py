"""The segmentation LightningModule: only the recipe (cross entropy on the UperNet logits plus
`aux_weight` x that of the auxiliary head, layer-decayed AdamW, the poly schedule in optimizer
steps, mIoU on validation). Lightning owns the loop, devices, precision, checkpoints and logging.

`self.model` is the UperNetSegmenter, so a checkpoint holds it as `model.*`; its hyper_parameters
are SegmentSettings' fields, the segmenter's file metadata among them (task "segmentation",
classes, palette, scale, ...: fcmae.checkpoints.segmenter_meta), from which
fcmae.checkpoints.read_segmenter and fcmae.segmenter.build_segmenter rebuild it.
"""
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from fcmae.checkpoints import SEGMENTATION
from fcmae.data.modules import start_next_epoch
from fcmae.encoders import layer_decay
from fcmae.labelmaps import IGNORE
from fcmae.optim import StepSchedule, StopUnlessFinite, adamw, no_weight_decay, param_groups
from fcmae.segment.metrics import confusion_metric, scores
from fcmae.segmenter import SCALE, TTA_RATIOS, infer
from fcmae.training.callbacks import writes_logs


@dataclass(frozen=True)
class SegmentSettings:
    """What a SegmentModule trains and evaluates with, and the segmenter's file metadata (from
    `task` on: fcmae.checkpoints.segmenter_meta) that `fcmae eval`, `predict` and the exports read
    back. The fields are the module's keyword arguments and, flat, its checkpoints'
    hyper_parameters. `iterations`, `warmup_iterations`: the schedule's length and warmup in
    optimizer steps. Validation runs each image at `scale` (long, short), whole or in sliding
    `window` = (crop, stride), and with `tta` at `tta_ratios` of it, mirrored too."""
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    layer_decay: float = 0.9
    layer_decay_type: str = "single"
    iterations: int = 160_000
    warmup_iterations: int = 1500
    power: float = 1.0
    aux_weight: float = 0.4
    window: Optional[tuple] = None
    tta: bool = False
    tta_ratios: tuple = TTA_RATIOS
    task: str = SEGMENTATION
    num_classes: Optional[int] = None
    classes: Optional[list] = None
    palette: Optional[list] = None
    input_size: Optional[int] = None
    scale: tuple = SCALE
    normalization: Optional[dict] = None
    reduce_zero_label: bool = False
    head: Optional[dict] = None
    arch: Union[str, dict, None] = None  # a size name or {"depths": [...], "dims": [...]}
    in_chans: Optional[int] = None

    @classmethod
    def from_config(cls, resolved, meta):
        """From a run's resolved configuration (keys named as the flags) and the segmenter's
        metadata (segmenter_meta)."""
        own = {f.name for f in fields(cls)}
        values = {k: v for k, v in resolved.items() if k in own}
        window = tuple(resolved["eval_window"]) if resolved["eval_mode"] == "slide" else None
        return cls(**{**values, **meta, "betas": tuple(resolved["betas"]), "window": window,
                      "tta_ratios": tuple(resolved["tta_ratios"]), "scale": tuple(meta["scale"]),
                      "arch": resolved["model"]})


class SegmentModule(StepSchedule, StopUnlessFinite, L.LightningModule):
    def __init__(self, model, *, config=None, **settings):
        """`model`: an UperNetSegmenter, already holding its pre-trained encoder. `settings`:
        SegmentSettings' fields by keyword (a checkpoint's hyper_parameters are these and
        `config`, the run's resolved configuration, kept for the record)."""
        super().__init__()
        s = SegmentSettings(**settings)
        self.save_hyperparameters({**asdict(s), "config": config})
        self.model = model
        self.no_weight_decay = no_weight_decay(model)  # before a sharding strategy flattens the parameters
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE)
        self.confusion = confusion_metric(model.num_classes)
        self.last_scores = None  # the latest validation's `scores`, per class too

    def training_step(self, batch, batch_idx):
        images, masks = batch.image, batch.mask  # (N, C, S, S), (N, S, S); batch.skipped: SkippedFiles
        logits, aux = self.model.forward_with_aux(images)  # (N, K, S/4, S/4), (N, K, S/16, S/16)
        main_loss = self.loss(logits, masks)
        aux_loss = self.loss(aux, masks)
        loss = main_loss + self.hparams.aux_weight * aux_loss
        self.last_loss = loss.detach()  # read back only to name a non-finite step
        if writes_logs(self.trainer):  # values reach the host only every --log-every steps
            if self.trainer.precision == "16-mixed":
                # fp16's loss scaler keeps non-finite updates off the weights (it skips them); a
                # loss that stays non-finite stops the run here.
                self.stop_unless_finite(loss, "loss", agreed=False)
            self.log("train/loss", loss, prog_bar=True)
            self.log_dict({"train/main_loss": main_loss, "train/aux_loss": aux_loss})
            self.log("lr", max(g["lr"] for g in self.optimizers().param_groups))  # the head's lr
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.trainer.precision != "16-mixed":  # fp16's loss scaler expects inf gradients and skips the step
            # The step's one finite check (a non-finite loss gives non-finite gradients; DDP's are
            # all-reduced, so every rank agrees): it stops the run before NaN/inf reach the
            # weights (and a checkpoint). Called after AMP unscaling.
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters() if p.grad is not None])
            self.stop_unless_finite(norm, "gradient norm", agreed=True)

    def loss(self, logits, masks):
        """Cross entropy of logits (N, K, h, w) resized (bilinear) to the labels (N, H, W); IGNORE not counted."""
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        return self.criterion(logits.float(), masks)

    def validation_step(self, batch, batch_idx):
        image, mask = batch.image, batch.mask  # (1, C, H, W), (1, H, W): the image's own size
        hp = self.hparams
        ratios, flip = (tuple(hp.tta_ratios), True) if hp.tta else ((1.0,), False)
        window = tuple(hp.window) if hp.window else None
        probs = infer(self.model, image, scale=tuple(hp.scale), ratios=ratios, flip=flip, window=window)  # (1, K, H, W)
        self.confusion.update(probs.argmax(1), mask)

    def on_validation_epoch_end(self):
        self.last_scores = scores(self.confusion.compute())  # summed over the ranks' images
        self.confusion.reset()
        if self.trainer.sanity_checking:
            return
        s = self.last_scores
        # equal on every rank already (the matrix is summed): sync_dist only keeps Lightning's bookkeeping even
        self.log("val/mIoU", s["mIoU"], prog_bar=True, sync_dist=True)
        self.log_dict({"val/mAcc": s["mAcc"], "val/aAcc": s["aAcc"]}, sync_dist=True)
        names = self.hparams.classes or [str(c) for c in range(len(s["IoU"]))]
        per_class = {f"val/{kind}/{name}": float(v) for kind in ("IoU", "Acc") for name, v in zip(names, s[kind])
                     if v == v}  # NaN: a class absent from truth and prediction has none
        if per_class:
            self.log_dict(per_class, sync_dist=True)

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        start_next_epoch(checkpoint)  # the loader is a LabelledData (fcmae.data.modules), and so is its resume rule

    def configure_optimizers(self):
        hp = self.hparams
        depths = self.model.encoder.depths
        layer_decay.check(depths, hp.layer_decay_type)

        def lr_scale(name):  # the release's layer ids over the encoder; the head trains at the full lr
            if not name.startswith("encoder."):
                return 1.0
            return layer_decay.lr_scale(name[len("encoder."):], depths, hp.layer_decay, hp.layer_decay_type)
        groups = param_groups(self.model, hp.weight_decay, self.no_weight_decay, lr_scale=lr_scale)
        optimizer = adamw(groups, self.device, lr=hp.lr, betas=tuple(hp.betas))
        return {"optimizer": optimizer, "lr_scheduler": self.poly_lr_schedule(
            optimizer, hp.iterations, hp.warmup_iterations, hp.power, hp.min_lr)}
