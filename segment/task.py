"""The segmentation task for the run layer (fcmae/training/run.py): `fcmae segment` trains a
UperNet on the dense ConvNeXt V2 encoder (fcmae.decoders.upernet) on DATA's training pairs and
reports mIoU, mean accuracy, pixel accuracy and per-class IoU / accuracy on its validation pairs
(or, without them, on a held-out part of the training pairs) every `eval_every` iterations and
at the end.

The recipe (configs/segment/<size>.yaml) counts its length in iterations (optimizer steps);
`epochs`, when given, counts it in passes over the training pairs instead. It fits itself to a
short run (`fit_to_data`). Without `pretrained` it trains from scratch. The run ends by writing
the segmenter (segmenter.safetensors), the best one so far (segmenter_best.safetensors,
checkpoints/best.ckpt), the best weights' per-class table (per_class.txt), curves.png and
predictions.png (fcmae/rundir.py names them all).
"""
import math
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from fcmae.checkpoints import read_weights, segmenter_meta, write_segmenter
from fcmae.data.filelist import default_cache
from fcmae.data.reading import check_channels
from fcmae.data.transforms import STATS, normalization
from fcmae.decoders.upernet import UperNetSegmenter
from fcmae.encoders import layer_decay
from fcmae.encoders.convnextv2 import size_config
from fcmae.errors import SettingError, UserError
from fcmae.figures import plot_curves
from fcmae.files import write_atomic
from fcmae.labelmaps import IGNORE, default_palette
from fcmae.masking import check_input_size
from fcmae.rundir import RunDir, append_metrics
from fcmae.segment.data import (MissingMasks, SegmentationSet, SegmentData, count_classes, find_layout, list_pairs,
                                read_classes, spread, subset, val_split)
from fcmae.segment.module import SegmentModule, SegmentSettings
from fcmae.segment.report import SEGMENTATION_PANELS, per_class_table, plot_predictions
from fcmae.segment.transforms import EvalTransform, TrainTransform
from fcmae.segment.weights import load_encoder
from fcmae.segmenter import Segmenter
from fcmae.training import flags
from fcmae.training.callbacks import LastCheckpoint, Throughput
from fcmae.training.run import Task, base_plan, batch_plan

PREDICTIONS = 6  # val images in predictions.png
EVALUATIONS = 10  # the recipe's validations per run (every 16k of 160k iterations), kept by a shorter run


def default_output(cfg):
    return cfg.output or f"runs/{cfg.model if isinstance(cfg.model, str) else 'custom'}-segment"


def check(cfg, recipe=None):
    """Cheap checks of the options, before any data is read; `recipe`: what the recipe alone gives."""
    if not cfg.data:
        raise UserError("no --data given: pass a folder holding train/images/ and train/masks/ (or ADE20K's "
                        "images/training/ and annotations/training/)")
    flags.check(cfg, "iterations", "ckpt_every", "eval_every")
    if recipe is not None and cfg.epochs is not None and cfg.iterations != recipe.iterations:
        raise UserError(f"--iterations {cfg.iterations} and --epochs {cfg.epochs}: the length is one or the other, "
                        f"pass only one")
    if cfg.batch_size < 2:
        raise UserError(f"--batch-size {cfg.batch_size}: UperNet's pyramid pooling normalizes over the images of a "
                        f"batch (BatchNorm), which needs 2 or more: pass --batch-size 2 or more")
    if cfg.accumulate is not None and cfg.accumulate < 1 or (cfg.effective_batch or 1) < 1:
        raise UserError("--accumulate and --effective-batch must be at least 1 (or null)")
    if cfg.warmup_iterations < 0:
        raise UserError(f"--warmup-iterations {cfg.warmup_iterations}: pass 0 (no warmup) or more")
    if not 0 <= cfg.val_split < 1:
        raise UserError(f"--val-split {cfg.val_split}: pass a fraction in [0, 1), e.g. 0.1 (0: no validation)")
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        raise UserError(f"--clip-grad {cfg.clip_grad}: pass a positive norm, or null for no clipping")
    if cfg.in_chans < 1:
        raise UserError(f"--in-chans {cfg.in_chans}: must be at least 1")
    try:
        depths, _ = size_config(cfg.model)
        check_input_size(cfg.input_size, suggest=512)
        layer_decay.check(depths, cfg.layer_decay_type)
    except SettingError as e:
        raise UserError(str(e)) from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--model: {e}") from None
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        raise UserError(f"--pretrained {cfg.pretrained}: no such file: pass an encoder, classifier or checkpoint file")
    check_geometry(cfg)


def check_geometry(cfg):
    """--scale, --ratio-range, --cat-max-ratio, --eval-window, --tta-ratios."""
    if cfg.scale is not None and (len(cfg.scale) != 2 or min(cfg.scale) < 1):
        raise UserError(f"--scale {cfg.scale}: pass [long, short] in pixels, e.g. [2048, 512], or null for 4x and 1x "
                        f"--input-size")
    low, high = (list(cfg.ratio_range) + [0, 0])[:2]
    if len(cfg.ratio_range) != 2 or not 0 < low <= high:
        raise UserError(f"--ratio-range {cfg.ratio_range}: pass [low, high] with 0 < low <= high, e.g. [0.5, 2.0]")
    if not 0 < cfg.cat_max_ratio <= 1:
        raise UserError(f"--cat-max-ratio {cfg.cat_max_ratio}: pass a share in (0, 1] (1: any crop)")
    if cfg.eval_window is not None and (len(cfg.eval_window) != 2 or not 0 < cfg.eval_window[1] <= cfg.eval_window[0]):
        raise UserError(f"--eval-window {cfg.eval_window}: pass [crop, stride] with 0 < stride <= crop, e.g. "
                        f"[512, 341], or null for --input-size and two thirds of it")
    if not cfg.tta_ratios or min(cfg.tta_ratios) <= 0:
        raise UserError(f"--tta-ratios {cfg.tta_ratios}: pass positive ratios of --scale, e.g. [0.5, 1.0, 1.5]")


# ----------------------------------------------------------------------------- data

def datasets(cfg, output, world):
    """(train set, val set or None, class names, normalization, notes): DATA's training pairs and validation
    pairs, or without those a seeded held-out part of the training pairs (listed in
    OUTPUT/val_split.txt, reused on resume), or with --val-split 0 none."""
    notes = []
    try:
        layout = find_layout(cfg.data)
        train_pairs = list_pairs(*layout.train, cache=default_cache())
        val_pairs = list_pairs(*layout.val, cache=default_cache()) if layout.val else None
        classes = read_classes(cfg.data)
    except MissingMasks as e:
        raise UserError(f"--data {cfg.data}: {e}: add the masks (the image's stem + .png), or move those images "
                        f"out") from None
    except ValueError as e:
        raise UserError(f"--data {cfg.data}: {e}") from None
    arrays = check_images(cfg, train_pairs[0])
    if classes is None:
        classes, note = counted_classes(cfg, train_pairs[1], val_pairs[1] if val_pairs else [])
        notes.append(note)
    if layout.name == "ade20k" and not cfg.reduce_zero_label:
        notes.append("note: ADE20K's layout without --reduce-zero-label: label 0 (\"other\") is trained as a class; "
                     "ADE20K is usually trained with --reduce-zero-label")
    norm = normalization(cfg.in_chans, arrays)
    train_tf = TrainTransform(cfg.input_size, scale_of(cfg), cfg.ratio_range, cfg.cat_max_ratio, norm)

    def pairs(found, transform):
        return SegmentationSet(*found, len(classes), transform, cfg.in_chans, cfg.reduce_zero_label, cfg.strict_data)
    train_set = pairs(train_pairs, train_tf)
    if val_pairs is not None:
        val_set = pairs(val_pairs, EvalTransform(norm))
    elif cfg.val_split > 0:
        kept, held, note = held_out(cfg, train_set, RunDir(output).val_split)
        train_set, val_set = subset(train_set, kept, train_tf), subset(train_set, held, EvalTransform(norm))
        notes.append(note)
    else:
        val_set = None
    if len(train_set) < cfg.batch_size * world:
        raise UserError(f"{len(train_set)} training images, fewer than one batch of {cfg.batch_size} x {world} "
                        f"device(s): lower --batch-size (2 at least)")
    return train_set, val_set, classes, norm, notes


def check_images(cfg, images):
    """Whether the training images are .npy arrays; --in-chans checked against them."""
    arrays = bool(images.has_suffix(".npy")[0])
    if arrays:
        try:
            check_channels(images[0], cfg.in_chans)
        except SettingError as e:
            raise UserError(str(e)) from None
    elif cfg.in_chans not in STATS:
        raise UserError(f"--in-chans {cfg.in_chans} needs .npy arrays ({cfg.in_chans}, H, W), but {images.root} "
                        f"holds images: pass --in-chans 3 (RGB) or 1 (grayscale), or convert them")
    return arrays


def counted_classes(cfg, *masks):
    """Without DATA/classes.txt: K = the highest label in the masks + 1, named 0..K-1 (a note)."""
    found = [m for group in masks for m in group]
    k, bad = count_classes(found, cfg.reduce_zero_label)
    if k < 1:
        raise UserError(f"--data {cfg.data}: no labels other than {IGNORE} (ignore) in {len(found)} masks: "
                        f"label the pixels 0, 1, ... (or name the classes in classes.txt)")
    skipped = f"; {len(bad)} unreadable masks left out ({bad[0]})" if bad else ""
    return [str(c) for c in range(k)], (f"no {Path(cfg.data) / 'classes.txt'}: {k} classes (labels 0 to {k - 1}) "
                                        f"found in {len(found)} masks, named by number{skipped}")


def held_out(cfg, train_set, split_file):
    """(kept, held out) indices of the training pairs, and a note: a seeded --val-split share,
    its images (relative to the images folder) listed in `split_file`; that list is reused when
    present (a resumed run validates on the same images), unless --no-resume."""
    paths = train_set.files.paths
    names = [paths.relative(i) for i in range(len(paths))]
    if cfg.no_resume and not cfg.dry_run and rank_zero_only.rank == 0:
        split_file.unlink(missing_ok=True)
    reused = split_file.is_file() and not cfg.no_resume
    if reused:
        listed = set(split_file.read_text().splitlines())
        if not listed <= set(names):
            raise UserError(f"{split_file} holds out images no longer in {paths.root}: put them back, or start over "
                            f"with --no-resume or another --output")
        held = [i for i, name in enumerate(names) if name in listed]
        kept = [i for i, name in enumerate(names) if name not in listed]
    else:
        kept, held = val_split(len(names), cfg.val_split, cfg.seed)
        if not cfg.dry_run and rank_zero_only.rank == 0:
            write_atomic(split_file, "".join(f"{names[i]}\n" for i in held))
    if not held:
        raise UserError(f"--data {cfg.data}: {len(names)} training images, too few to hold one out for validation: "
                        f"add images, add validation pairs, or pass --val-split 0")
    return kept, held, (f"no validation pairs in {cfg.data}: {'reusing the' if reused else 'holding out'} "
                        f"{len(held)} of {len(names)} training images for validation, listed in {split_file}")


def scale_of(cfg):
    """(long, short) the images are rescaled to: --scale, else 4x and 1x --input-size (ADE20K's
    2048 x 512 at 512)."""
    return tuple(cfg.scale) if cfg.scale is not None else (4 * cfg.input_size, cfg.input_size)


def window_of(cfg):
    """The sliding window (crop, stride): --eval-window, else --input-size and two thirds of it
    (ADE20K's 512 and 341)."""
    return tuple(cfg.eval_window) if cfg.eval_window is not None else (cfg.input_size, cfg.input_size * 2 // 3)


# ----------------------------------------------------------------------------- the schedule

def resolve(cfg, recipe, data, world):
    """Flags -> the run's values: batch plan, the length in iterations (from --epochs when given,
    with `data`'s batches per epoch), scale and window, fitted to the run (`fit_to_data`)."""
    accumulate, _ = batch_plan(cfg, world)
    rv = base_plan(cfg, world, accumulate, {"betas": list(cfg.betas), "scale": list(scale_of(cfg)),
                                            "eval_window": list(window_of(cfg))})
    rv["output"] = default_output(cfg)
    steps, train_images = math.ceil(data.batches_per_epoch(world) / accumulate), len(data.train)
    notes = rv.setdefault("notes", [])
    if cfg.epochs is not None:
        rv["iterations"] = cfg.epochs * steps
        notes.append(f"--epochs {cfg.epochs}: {steps} optimizer steps per epoch ({train_images:,} training images at "
                     f"an effective batch of {rv['effective_batch']}) give {rv['iterations']:,} iterations")
    rv["steps_per_epoch"] = steps
    rv["epochs"] = math.ceil(rv["iterations"] / steps)
    rv["total_steps"] = rv["iterations"] if cfg.max_steps < 0 else min(cfg.max_steps, rv["iterations"])
    fit_to_data(cfg, recipe, rv)
    return rv


def fit_to_data(cfg, recipe, rv):
    """Fit the recipe, written for ADE20K's 160k iterations, to this run's length, in `rv`, with
    one line per change in rv["notes"] (printed by the run layer). A value the user passed is
    kept (with a warning where it cannot work); one the recipe gives is scaled to the run:

    - warmup: the recipe's share of the run (1500 of 160k iterations: under 1%), so a short run
      spends as little of itself warming up as the long one does, rather than never leaving the
      warmup;
    - evaluation interval: the recipe's EVALUATIONS validations per run (every 16k of 160k), so a
      short run still shows its progress and keeps its best weights.
    """
    notes, total = rv["notes"], rv["iterations"]
    if total < recipe.iterations:
        if cfg.warmup_iterations == recipe.warmup_iterations:
            warmup = round(recipe.warmup_iterations * total / recipe.iterations)
            if warmup != cfg.warmup_iterations:
                notes.append(f"warmup {cfg.warmup_iterations:,} iterations -> {warmup:,}: the recipe's share of its "
                             f"{recipe.iterations:,} iterations, for this run's {total:,}; pass --warmup-iterations "
                             f"to choose")
                rv["warmup_iterations"] = warmup
        elif cfg.warmup_iterations >= total:
            notes.append(f"warning: --warmup-iterations {cfg.warmup_iterations:,} is the whole run of {total:,} "
                         f"iterations: the lr never leaves the warmup; pass fewer")
    every = cfg.eval_every if cfg.eval_every is not None else recipe.eval_every
    if cfg.eval_every == recipe.eval_every and total < EVALUATIONS * every:
        fitted = max(1, total // EVALUATIONS)
        notes.append(f"evaluation every {every:,} iterations -> {fitted:,}: the recipe's {EVALUATIONS} validations "
                     f"in this run's {total:,} iterations; pass --eval-every to choose")
        every = fitted
    rv["eval_every"] = every


# ----------------------------------------------------------------------------- callbacks

class EvalSummary(Callback):
    """After each validation: one line (mIoU, mean accuracy, pixel accuracy) and the per-class
    table, printed; a row in the run's metrics.jsonl (train loss averaged since the previous
    validation, mIoU, mAcc, aAcc, IoU/<class>, Acc/<class>, lr), which curves.png is drawn from."""

    def __init__(self, path, classes):
        self.path, self.classes, self.history = Path(path), list(classes), []
        self.loss_sum, self.batches = 0.0, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # Summed on the device, read back at the validation: no sync per batch. Lightning hands
        # back the loss divided by the accumulation it backpropagated.
        self.loss_sum = self.loss_sum + outputs["loss"].detach() * trainer.accumulate_grad_batches
        self.batches += 1

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or module.last_scores is None:
            return
        s = module.last_scores
        finite = lambda v: float(v) if v == v else None  # noqa: E731  (NaN: a class without pixels)
        row = {"train_loss": float(self.loss_sum) / self.batches if self.batches else None,
               "mIoU": finite(s["mIoU"]), "mAcc": finite(s["mAcc"]), "aAcc": finite(s["aAcc"]),
               **{f"{kind}/{name}": finite(v) for kind in ("IoU", "Acc") for name, v in zip(self.classes, s[kind])},
               "lr": float(trainer.callback_metrics["lr"]) if "lr" in trainer.callback_metrics else None}
        self.loss_sum, self.batches = 0.0, 0
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **row})
        if trainer.is_global_zero:
            line = (f"step {trainer.global_step:,}: mIoU {s['mIoU']:.2f}, mean accuracy {s['mAcc']:.2f}, "
                    f"pixel accuracy {s['aAcc']:.2f}")
            bar = trainer.progress_bar_callback  # prints above the bar rather than into it
            for text in (line, per_class_table(s, self.classes)):
                bar.print(text) if bar is not None else print(text, flush=True)
            append_metrics(self.path, trainer.global_step, trainer.current_epoch, row)


class BestSegmenter(Callback):
    """checkpoints/best.ckpt and segmenter_best.safetensors: the weights with the best validation
    mIoU so far (their metadata give it, and the step); its best score and per-class values are
    saved in every checkpoint, so a resumed run keeps them."""

    def __init__(self, output):
        self.run = RunDir(output)
        self.best = {"mIoU": None, "step": None, "scores": None}

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or module.last_scores is None:
            return
        s = module.last_scores  # the matrix summed over ranks: every rank decides the same
        if s["mIoU"] != s["mIoU"] or (self.best["mIoU"] is not None and s["mIoU"] <= self.best["mIoU"]):
            return
        self.best = {"mIoU": s["mIoU"], "step": trainer.global_step,
                     "scores": {k: v.tolist() if hasattr(v, "tolist") else v for k, v in s.items()}}
        trainer.save_checkpoint(self.run.best, weights_only=False)  # on every rank
        if trainer.is_global_zero:
            write_segmenter_of(module, self.run.export("segmenter_best"), mIoU=s["mIoU"], step=trainer.global_step)

    def state_dict(self):
        return dict(self.best)

    def load_state_dict(self, state):
        self.best = dict(state)


class FinalValidation(Callback):
    """Validates after the run's last step too (not only every --eval-every), so the last weights
    are scored and can be the best: Lightning validates before stopping when asked to stop."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def sync_batchnorm(cfg, resolved):
    """UperNet's BatchNorm over the images of all ranks (the recipe's SyncBN) under DDP on GPUs;
    torch's SyncBatchNorm has no CPU kernel, so CPU ranks normalize over their own batch."""
    on_gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    return resolved["world_size"] > 1 and on_gpu


def write_segmenter_of(module, path, **extra):
    """The module's segmenter with its file metadata (the module's hyper_parameters) and `extra`."""
    hp = module.hparams
    meta = {k: hp[k] for k in ("task", "num_classes", "classes", "palette", "input_size", "scale", "normalization",
                               "reduce_zero_label", "head")}
    return write_segmenter(path, module.model.state_dict(), {**meta, "scale": list(meta["scale"])},
                           steps=module.global_step, **extra)


# ----------------------------------------------------------------------------- the task

class SegmentTask(Task):
    command = "segment"

    def __init__(self, cfg, recipe):
        cfg = cfg.clone()
        cfg.output = default_output(cfg)
        super().__init__(cfg, recipe)

    def check(self):
        check(self.cfg, self.recipe)

    def resume_values(self):
        cfg = self.cfg
        return {"arch": cfg.model, "in_chans": cfg.in_chans, "reduce_zero_label": cfg.reduce_zero_label}

    def data(self, output, world):
        cfg = self.cfg
        self.train_set, self.val_set, self.classes, self.norm, self.notes = datasets(cfg, output, world)
        return SegmentData(self.train_set, self.val_set, cfg.batch_size, cfg.workers, cfg.seed)

    def plan(self, world, data):
        resolved = resolve(self.cfg, self.recipe, data, world)
        resolved["notes"] = self.notes + resolved["notes"]
        return resolved

    def callbacks(self, resolved, output):
        run = RunDir(output)
        self.summary = EvalSummary(run.metrics, self.classes)
        self.best = BestSegmenter(output) if self.val_set is not None else None
        return [LastCheckpoint(run.checkpoints, self.cfg.ckpt_every), Throughput(), self.summary,
                *([self.best, FinalValidation()] if self.best else [])]

    def trainer_options(self, resolved):
        no_val = {} if self.val_set is not None else dict(limit_val_batches=0)
        # Validation every eval_every optimizer steps, counted over the whole run (not per epoch).
        return dict(max_steps=resolved["total_steps"], check_val_every_n_epoch=None, num_sanity_val_steps=0,
                    val_check_interval=resolved["eval_every"] * resolved["accumulate"],
                    gradient_clip_val=self.cfg.clip_grad, sync_batchnorm=sync_batchnorm(self.cfg, resolved), **no_val)

    def module(self, resolved, data):
        cfg = self.cfg
        # --val-split 0: no val loader, on purpose.
        warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
        model = UperNetSegmenter(cfg.model, len(self.classes), cfg.in_chans, resolved["drop_path"], cfg.channels,
                                 cfg.aux_channels)
        if resolved["resume_from"]:
            print(f"resuming from {resolved['resume_from']}" +
                  (" (its weights replace --pretrained)" if cfg.pretrained else ""))
        elif cfg.pretrained:
            load_pretrained(model, cfg.pretrained, cfg.trust_checkpoint)
        else:
            print("no --pretrained: training from scratch")
        val_images = f"{len(self.val_set)} val" if self.val_set is not None else "no val"
        print(f"{len(self.train_set)} train / {val_images} images, {len(self.classes)} classes")
        meta = segmenter_meta(model, self.classes, default_palette(len(self.classes)), cfg.input_size,
                              resolved["scale"], self.norm, cfg.reduce_zero_label)
        return SegmentModule(model, **asdict(SegmentSettings.from_config(resolved, meta)), config=resolved)

    def finish(self, trainer, module, resolved):
        """The segmenters, the best weights and the report: {"history": per-validation metrics,
        "output", "segmenter", "best", "module"}."""
        run = RunDir(resolved["output"])
        best = self.best.best if self.best is not None and self.best.best["mIoU"] is not None else None
        if trainer.is_global_zero:
            last = self.summary.history[-1]["mIoU"] if self.summary.history else None
            print(f"wrote {write_segmenter_of(module, run.export('segmenter'), mIoU=last)}")
            if best is None:
                print("no validation (--val-split 0, or no validation pairs): checkpoints/best.ckpt and "
                      "segmenter_best.safetensors are the last weights")
                write_segmenter_of(module, run.export("segmenter_best"), mIoU=None)
        if best is None:
            trainer.save_checkpoint(run.best, weights_only=False)
        if trainer.is_global_zero:
            report(run, module, self.val_set, self.classes, resolved, best)
        return {"history": self.summary.history, "output": run.root, "segmenter": run.export("segmenter"),
                "best": best, "module": module}


def load_pretrained(model, path, trust):
    """--pretrained into the segmenter's encoder, reported in two lines."""
    try:
        loaded = load_encoder(model, read_weights(path, trust=trust))
    except ValueError as e:
        raise UserError(f"--pretrained {e}: pass the --model and --in-chans it was trained with") from None
    left = f"; left out: {', '.join(loaded['left_out'])}" if loaded["left_out"] else ""
    print(f"loaded the encoder's {loaded['loaded']} tensors from {path} ({loaded['kind']}){left}")
    print("  the decoder and heads start from their init")


def report(run, module, val_set, classes, resolved, best):
    """At the end of a run: curves.png; the best weights' per-class table (printed, and
    per_class.txt) and predictions.png on a fixed spread of val images."""
    if run.metrics.is_file():
        print(f"wrote {plot_curves(run.metrics, run.curves, SEGMENTATION_PANELS, x='step')}")
    if val_set is None or best is None:
        return
    print(f"best validation mIoU {best['mIoU']:.2f} (step {best['step']:,}): {run.best}, "
          f"{run.export('segmenter_best')}")
    table = per_class_table(best["scores"], classes)
    print(table)
    print(f"wrote {write_atomic(run.per_class, table + chr(10))}")
    segmenter = Segmenter.load(run.export("segmenter_best"), device=module.device,
                               window=module.hparams.window, tta=module.hparams.tta)
    samples = []
    for i in spread(len(val_set), PREDICTIONS):
        image, mask = raw_pair(val_set, i)
        samples.append((image, mask, segmenter.predict(image).labels))
    print(f"wrote {plot_predictions(samples, classes, segmenter.palette, run.predictions, 'best weights, validation')}")


def raw_pair(dataset, i):
    """(image, mask) of item `i` of a SegmentationSet or a Subset of one, as read."""
    if hasattr(dataset, "indices"):
        return dataset.dataset.raw(dataset.indices[i])
    return dataset.raw(i)

