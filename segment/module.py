"""The segmentation LightningModule: only the recipe (cross entropy on the UperNet logits plus
`aux_weight` x that of the auxiliary head, layer-decayed AdamW, the poly schedule in optimizer
steps, mIoU on validation). Lightning owns the loop, devices, precision, checkpoints and logging.

`self.model` is the UperNetSegmenter, so a checkpoint holds it as `model.*`; the segmenter's
metadata (fcmae.checkpoints.segmenter_meta) travel in `record` into its hyper_parameters, from
which fcmae.checkpoints.read_segmenter rebuilds it.
"""
import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from fcmae.data.modules import start_next_epoch
from fcmae.encoders import layer_decay
from fcmae.optim import StepSchedule, StopUnlessFinite, no_weight_decay, param_groups
from fcmae.segmenter import SCALE, TTA_RATIOS, infer
from fcmae.labelmaps import IGNORE
from fcmae.segment.metrics import confusion_metric, scores


class SegmentModule(StepSchedule, StopUnlessFinite, L.LightningModule):
    def __init__(self, model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.9,
                 layer_decay_type="single", iterations=160_000, warmup_iterations=1500, power=1.0, min_lr=0.0,
                 aux_weight=0.4, window=None, tta=False, **record):
        """`model`: an UperNetSegmenter, already holding its pre-trained encoder. `iterations`,
        `warmup_iterations`: the schedule's length and warmup in optimizer steps. `record`: kept
        in the checkpoint's hyper_parameters: the segmenter's metadata (fcmae.checkpoints.
        segmenter_meta), the run's configuration. Validation runs each image at the metadata's
        `scale` (long, short; default SCALE), whole or in sliding `window` = (crop, stride), and
        with `tta` at TTA_RATIOS of it, flipped too."""
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
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
        self.stop_unless_finite(loss, "loss")
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/main_loss": main_loss, "train/aux_loss": aux_loss})
        self.log("lr", max(g["lr"] for g in self.optimizers().param_groups))  # the head's lr
        return loss

    def loss(self, logits, masks):
        """Cross entropy of logits (N, K, h, w) resized (bilinear) to the labels (N, H, W); IGNORE not counted."""
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        return self.criterion(logits.float(), masks)

    def validation_step(self, batch, batch_idx):
        image, mask = batch.image, batch.mask  # (1, C, H, W), (1, H, W): the image's own size
        hp = self.hparams
        ratios, flip = (TTA_RATIOS, True) if hp.tta else ((1.0,), False)
        scale = tuple(hp.get("scale") or SCALE)
        probs = infer(self.model, image, scale=scale, ratios=ratios, flip=flip, window=hp.window)  # (1, K, H, W)
        self.confusion.update(probs.argmax(1), mask)

    def on_validation_epoch_end(self):
        self.last_scores = scores(self.confusion.compute())  # summed over the ranks' images
        self.confusion.reset()
        if self.trainer.sanity_checking:
            return
        self.log("val/mIoU", self.last_scores["mIoU"], prog_bar=True, sync_dist=True)  # equal on every rank
        self.log_dict({"val/mAcc": self.last_scores["mAcc"], "val/aAcc": self.last_scores["aAcc"]}, sync_dist=True)

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
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        return {"optimizer": optimizer, "lr_scheduler": self.poly_lr_schedule(
            optimizer, hp.iterations, hp.warmup_iterations, hp.power, hp.min_lr)}
