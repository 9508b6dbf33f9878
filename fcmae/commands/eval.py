"""`fcmae eval`: top-1 / top-5 of a classifier on an image-folder validation set, nothing else.

    fcmae eval --checkpoint runs/ft-base/checkpoints/last.ckpt --data /path/to/imagenet-1k [--ema]

The checkpoint may be our fine-tuning last.ckpt (raw weights, or the EMA with --ema), the
classifier.safetensors a run writes, or a dense fine-tuned checkpoint of the public release.
The architecture is read off the weights; the data is DIR/val (or DIR itself if it is a bare
tree of class folders). It also prints per-class accuracy and the confusion matrix, and saves
the matrix as a PNG next to the checkpoint (<checkpoint name>_confusion.png; --confusion FILE
to choose).
"""
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from fcmae.checkpoints import read_weights
from fcmae.data.labelled import check_in_chans, image_folder
from fcmae.data.modules import loader
from fcmae.data.transforms import eval_transform
from fcmae.encoders import ConvNeXtV2
from fcmae.errors import UserError
from fcmae.finetune.module import FinetuneModule
from fcmae.finetune.report import confusion_update, per_class_table, plot_confusion
from fcmae.precision import resolve_precision
from fcmae.training.flags import add_hardware_flags
from fcmae.training.trainer import hardware_trainer


def build_parser():
    p = ArgumentParser(description="Evaluate a ConvNeXt V2 classifier (top-1 / top-5).")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--checkpoint", type=Optional[str], default=None,
                   help="last.ckpt, classifier.safetensors or a release fine-tuned checkpoint")
    p.add_argument("--data", type=Optional[str], default=None, help="folder with val/ (or a folder of class folders)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a torch file that needs full unpickling: runs code from the file, so only for "
                        "files you trust")
    p.add_argument("--input-size", type=Optional[int], default=None, help="default: the training run's, else 224")
    p.add_argument("--crop-pct", type=Optional[float], default=None, help="resize = input / crop_pct (default 224/256)")
    p.add_argument("--batch-size", type=int, default=64, help="per device")
    p.add_argument("--confusion", type=Optional[str], default=None,
                   help="where to save the confusion matrix PNG (default: <checkpoint name>_confusion.png next "
                        "to the checkpoint)")
    add_hardware_flags(p, devices=1, strategy=False)
    return p


def evaluate(cfg):
    """Returns {"top1", "top5", "loss", "images"}."""
    if not cfg.checkpoint or not cfg.data:
        raise UserError("fcmae eval needs --checkpoint FILE and --data DIR")
    weights = read_weights(cfg.checkpoint, cfg.ema, cfg.trust_checkpoint)
    model, in_chans, num_classes, classes = weights.model, weights.in_chans, weights.num_classes, weights.classes
    if not num_classes:
        raise UserError(f"{cfg.checkpoint} has no classifier head (a pre-trained encoder?): fine-tune it first "
                        f"with `fcmae finetune --pretrained {cfg.checkpoint}`")
    check_in_chans(in_chans, cfg.data)
    input_size = cfg.input_size or weights.meta.get("input_size") or 224
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else weights.meta.get("crop_pct")
    val = image_folder(cfg.data, "val", eval_transform(input_size, in_chans, crop_pct), in_chans)
    if len(val.classes) != num_classes or (classes and classes != val.classes):
        raise UserError(f"{cfg.data}: {len(val.classes)} class folders, but the classifier has {num_classes} "
                        f"outputs{' for other class names' if len(val.classes) == num_classes else ''}: "
                        f"pass the data it was trained on")

    classifier = ConvNeXtV2(model, in_chans, num_classes)
    classifier.load_state_dict(weights.state)
    trainer = hardware_trainer(cfg, logger=False, enable_checkpointing=False,
                               precision=resolve_precision(cfg.precision, cfg.accelerator))
    module = ConfusionEval(classifier, num_classes)
    metrics = trainer.validate(module, loader(val, cfg.batch_size, cfg.workers, train=False), verbose=False)[0]
    out = {"top1": metrics["val/top1"], "top5": metrics["val/top5"], "loss": metrics["val/loss"], "images": len(val)}
    which = "EMA weights" if cfg.ema else "weights"
    print(f"{cfg.checkpoint} ({which}, {input_size}px): top-1 {out['top1']:.2f}  top-5 {out['top5']:.2f}  "
          f"loss {out['loss']:.4f} on {len(val)} images")
    out["confusion"] = module.confusion.cpu()
    if trainer.is_global_zero:
        print(per_class_table(out["confusion"], val.classes))
        path = cfg.confusion or Path(cfg.checkpoint).with_name(Path(cfg.checkpoint).stem + "_confusion.png")
        print(f"wrote {plot_confusion(out['confusion'], val.classes, path, f'{Path(cfg.checkpoint).name} ({which})')}")
    return out


class ConfusionEval(FinetuneModule):
    """FinetuneModule's validation, also counting a confusion matrix (summed over ranks)."""

    def __init__(self, model, num_classes):
        super().__init__(model)
        self.register_buffer("confusion", torch.zeros(num_classes, num_classes, dtype=torch.int64), persistent=False)

    def _evaluate(self, name, logits, y):
        super()._evaluate(name, logits, y)
        confusion_update(self.confusion, logits.detach(), y)  # logits: (B, K)

    def on_validation_epoch_end(self):
        self.confusion = self.trainer.strategy.reduce(self.confusion, reduce_op="sum")


def run(cfg):
    evaluate(cfg)
