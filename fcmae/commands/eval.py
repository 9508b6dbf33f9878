"""`fcmae eval`: the scores of a trained model on labelled validation data, nothing else; the file
says which task it is.

    fcmae eval --checkpoint runs/ft-base/checkpoints/last.ckpt --data /path/to/imagenet-1k [--ema]
    fcmae eval --checkpoint runs/seg-tiny/segmenter_best.safetensors --data /path/to/ADEChallengeData2016

A classifier (our fine-tuning last.ckpt: raw weights, or the EMA with --ema; the
classifier.safetensors a run writes; a dense fine-tuned checkpoint of the public release) gets
top-1 / top-5 on DIR/val (or DIR itself if it is a bare tree of class folders); the architecture
is read off the weights. It also prints per-class accuracy and the confusion matrix, and saves the
matrix as a PNG next to the checkpoint (<checkpoint name>_confusion.png; --confusion FILE to
choose).

A segmenter (a segmentation last.ckpt or segmenter*.safetensors) gets mIoU, mean accuracy, pixel
accuracy and per-class IoU / accuracy on DIR's validation pairs (val/images with val/masks,
ADE20K's validation folders, or DIR/images with DIR/masks), evaluated as in training: at the
file's scale, by sliding windows or whole images, with --tta at several scales and mirrored.
"""
from pathlib import Path
from typing import List, Literal, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from fcmae.checkpoints import SEGMENTER_KEYS, read_segmenter, read_weights
from fcmae.data.labelled import check_in_chans, image_folder
from fcmae.data.modules import loader
from fcmae.data.transforms import eval_transform
from fcmae.encoders import ConvNeXtV2
from fcmae.errors import UserError
from fcmae.finetune.module import FinetuneModule
from fcmae.finetune.report import confusion_update, per_class_table, plot_confusion
from fcmae.precision import resolve_precision
from fcmae.segment.data import MissingMasks, SegmentationSet, SegmentData, list_pairs, read_classes
from fcmae.segment.module import SegmentModule
from fcmae.segment.report import per_class_table as segmentation_table
from fcmae.segment.transforms import EvalTransform
from fcmae.segmenter import build_segmenter
from fcmae.training.flags import add_hardware_flags
from fcmae.training.trainer import auto_workers, hardware_trainer


def build_parser():
    p = ArgumentParser(description="Evaluate a ConvNeXt V2 classifier (top-1 / top-5) or segmenter (mIoU).")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--checkpoint", type=Optional[str], default=None,
                   help="last.ckpt, classifier.safetensors, segmenter.safetensors or a release fine-tuned checkpoint")
    p.add_argument("--data", type=Optional[str], default=None,
                   help="classifier: a folder with val/ (or a folder of class folders); segmenter: a folder with "
                        "validation pairs (val/images + val/masks, ADE20K's, or images/ + masks/)")
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
    g = p.add_argument_group("segmenters")
    g.add_argument("--eval-mode", type=Literal["slide", "whole"], default="slide",
                   help="at the file's scale: sliding windows (--eval-window) or the whole image")
    g.add_argument("--eval-window", type=Optional[List[int]], default=None,
                   help="[crop, stride]; null: the training crop and two thirds of it")
    g.add_argument("--tta", action="store_true", help="multi-scale (--tta-ratios of the scale) + flip")
    g.add_argument("--tta-ratios", type=List[float], default=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    add_hardware_flags(p, devices=1, strategy=False)
    return p


def evaluate(cfg):
    """Returns {"top1", "top5", "loss", "images"} for a classifier, `evaluate_segmenter`'s for a segmenter."""
    if not cfg.checkpoint or not cfg.data:
        raise UserError("fcmae eval needs --checkpoint FILE and --data DIR")
    if cfg.workers == "auto":  # as training chooses them for this machine
        cfg = cfg.clone()
        cfg.workers = auto_workers(cfg)
    weights = read_weights(cfg.checkpoint, cfg.ema, cfg.trust_checkpoint)
    if weights.segmentation:
        return evaluate_segmenter(cfg)
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


def validation_pairs(data):
    """The validation pairs' (images, masks) folders of `data` (ValueError if none)."""
    root = Path(data)
    for images, masks in (("val/images", "val/masks"), ("images/validation", "annotations/validation"),
                          ("images", "masks")):
        if (root / images).is_dir() and (root / masks).is_dir():
            return root / images, root / masks
    raise ValueError(f"no validation pairs in {data}: expected val/images with val/masks, ADE20K's "
                     f"images/validation with annotations/validation, or images/ with masks/")


def evaluate_segmenter(cfg):
    """mIoU, mean and pixel accuracy (floats) and per-class IoU / accuracy (lists, NaN for a class
    without pixels) of a segmenter on --data's validation pairs, as {"mIoU", "mAcc", "aAcc", "IoU",
    "Acc", "images"}; printed, with the per-class table."""
    state, meta = read_segmenter(cfg.checkpoint, cfg.trust_checkpoint)
    model = build_segmenter(state, meta)
    classes = meta.get("classes") or [str(c) for c in range(model.num_classes)]
    try:
        pairs = list_pairs(*validation_pairs(cfg.data))
        named = read_classes(cfg.data)
    except MissingMasks as e:
        raise UserError(f"--data {cfg.data}: {e}: add the masks (the image's stem + .png)") from None
    except ValueError as e:
        raise UserError(f"--data {cfg.data}: {e}") from None
    if named is not None and named != classes:
        raise UserError(f"{cfg.data}/classes.txt names {len(named)} classes, the segmenter {len(classes)} others "
                        f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): pass the data it was "
                        f"trained on")
    norm = meta.get("normalization")
    norm = None if norm is None else (tuple(norm["mean"]), tuple(norm["std"]))
    val = SegmentationSet(*pairs, len(classes), EvalTransform(norm), model.in_chans, meta.get("reduce_zero_label"))
    size = meta["input_size"]
    window = tuple(cfg.eval_window or (size, size * 2 // 3)) if cfg.eval_mode == "slide" else None
    module = SegmentModule(model, **{k: meta[k] for k in SEGMENTER_KEYS if k in meta}, window=window, tta=cfg.tta,
                           tta_ratios=tuple(cfg.tta_ratios))
    trainer = hardware_trainer(cfg, logger=False, enable_checkpointing=False,
                               precision=resolve_precision(cfg.precision, cfg.accelerator))
    trainer.validate(module, datamodule=SegmentData(None, val, 1, cfg.workers), verbose=False)
    s = module.last_scores
    how = "multi-scale + flip" if cfg.tta else "sliding windows" if window else "whole images"
    print(f"{cfg.checkpoint} ({how}): mIoU {s['mIoU']:.2f}  mean accuracy {s['mAcc']:.2f}  "
          f"pixel accuracy {s['aAcc']:.2f} on {len(val)} images")
    if trainer.is_global_zero:
        print(segmentation_table(s, classes))
    return {**{k: s[k] for k in ("mIoU", "mAcc", "aAcc")}, "IoU": s["IoU"].tolist(), "Acc": s["Acc"].tolist(),
            "images": len(val)}


def run(cfg):
    evaluate(cfg)
