"""`fcmae finetune`: train the dense ConvNeXt V2 classifier on DIR/train, report top-1/top-5 of
the raw weights and of their EMA on DIR/val (or, without val/, on a held-out part of train/)
every epoch.

    fcmae finetune --model base --data /path/to/imagenet-1k --pretrained FILE --output runs/ft-base

The size's recipe (configs/finetune/<model>.yaml) is read first; command-line options override
it. `--linear-probe` trains only a linear head on the frozen encoder (MAE's protocol, values
from `probe.*`). Without `--pretrained` it trains from scratch (the supervised baseline). A run
resumes from <output>/checkpoints/last.ckpt when present and ends by writing the classifier in
the public dense layout, <output>/classifier.safetensors (and classifier_ema.safetensors), the
best one so far (classifier_best.safetensors, checkpoints/best.ckpt), a per-class table,
confusion.png and curves.png. The recipe fits itself to a small training set (`fit_to_data`).
"""
import copy
import json
import math
import warnings
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import Subset

from fcmae import runs
from fcmae.encoders import ConvNeXtV2
from fcmae.encoders.convnextv2 import size_config
from fcmae.errors import UserError
from fcmae.filelist import default_cache
from fcmae.finetune import data, layer_decay
from fcmae.finetune.module import FinetuneModule
from fcmae.finetune.report import confusion_matrix, per_class_table, plot_confusion, plot_curves
from fcmae.checkpoints import classifier_state_dict, read_weights, save_weights
from fcmae.files import append_line
from fcmae.finetune.weights import load_pretrained

DEFAULT_MODEL = "base"


def build_parser():
    p = ArgumentParser(prog="fcmae finetune", description=(
        "Fine-tune a ConvNeXt V2 classifier on DIR/train, top-1/top-5 on DIR/val every epoch (raw and EMA "
        "weights). `--model SIZE` reads configs/finetune/SIZE.yaml first (flags override it, --config FILE "
        "replaces it). Rerunning the same command resumes from OUTPUT/checkpoints/last.ckpt."),
                       epilog="Effective batch = batch-size x devices x num-nodes x accumulate; accumulate comes "
                              "from --effective-batch unless given. lr = blr x effective batch / 256 unless --lr. "
                              "A run fits itself to small data: see --effective-batch, --ema-decay, --warmup-epochs.")
    p.add_argument("--config", action=ActionConfigFile, help="a recipe file (default: configs/finetune/<model>.yaml)")
    g = p.add_argument_group("model and weights")
    g.add_argument("--model", type=Union[str, dict], default=DEFAULT_MODEL,
                   help="ConvNeXt V2 size (atto ... huge), or {depths: [...], dims: [...]}")
    g.add_argument("--pretrained", type=Optional[str], default=None,
                   help="weights to start from: an fcmae export (.safetensors), an fcmae pre-training last.ckpt, "
                        "a release pre-training checkpoint, or a dense public-layout checkpoint; none: from scratch")
    g.add_argument("--linear-probe", action="store_true",
                   help="train only a linear head (after BatchNorm) on the frozen encoder; uses the probe.* values")
    g.add_argument("--in-chans", type=int, default=3, help="3 = RGB, 1 = grayscale, any count for .npy arrays")
    g.add_argument("--input-size", type=int, default=224, help="crop side in pixels, a multiple of 32")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    g = p.add_argument_group("data and augmentation")
    g.add_argument("--data", type=Optional[str], default=None,
                   help="folder with train/ class folders, and val/ ones (else --val-split holds part of train/ "
                        "out)")
    g.add_argument("--val-split", type=float, default=0.1,
                   help="without val/: the fraction of each class of train/ held out for validation (stratified, "
                        "seeded by --seed, listed in OUTPUT/val_split.txt and reused on resume); 0: train on "
                        "everything, no validation (the best checkpoint is then the last)")
    g.add_argument("--strict-data", action="store_true",
                   help="stop at the first unreadable image (default: skip it with a warning naming it, "
                        "count skips per epoch as data/skipped)")
    g.add_argument("--aa", type=Optional[str], default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy (null: off)")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--crop-pct", type=Optional[float], default=None, help="eval: resize to input/crop_pct, center-crop "
                   "(default 224/256; 1.0 from 384 px)")
    g = runs.add_optimization_flags(p, batch_size=32, epochs=100, blr=6.25e-4, min_lr=1e-6, warmup_epochs=20)
    g.add_argument("--effective-batch", type=Optional[int], default=1024,
                   help="images per optimizer step; sets --accumulate from the device count unless that is given. "
                        "The recipe's value is lowered (by lowering the accumulation) until an epoch has at least "
                        "20 optimizer steps; a value you pass is kept")
    g.add_argument("--accumulate", type=Optional[int], default=None, help="gradient accumulation steps")
    g.add_argument("--layer-decay", type=float, default=0.6, help="layer-wise lr decay (1: off)")
    g.add_argument("--layer-decay-type", type=Literal["single", "group"], default="group",
                   help="single: an id per block; group: the third stage three blocks at a time (base and larger)")
    g.add_argument("--ema", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="keep an EMA of the weights and evaluate it beside them (--no-ema: off)")
    g.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay per optimizer step. A run shorter than 10 time constants (1 / (1 - decay) "
                        "steps) gets the recipe's value lowered to 1 - 10 / steps (at least 0.5); a value you pass "
                        "is kept, with a warning")
    g.add_argument("--clip-grad", type=Optional[float], default=None,
                   help="clip the gradients' total norm to NORM before each optimizer step (the release's "
                        "clip_grad); null: no clipping")
    g = p.add_argument_group("linear probe (MAE's recipe, with --linear-probe)")
    g.add_argument("--probe.blr", type=float, default=0.1, help="base lr (LARS)")
    g.add_argument("--probe.weight-decay", type=float, default=0.0)
    g.add_argument("--probe.epochs", type=int, default=90)
    g.add_argument("--probe.warmup-epochs", type=float, default=10)
    runs.add_hardware_flags(p, strategy=False)
    runs.add_run_flags(p, output_help="run directory (default: runs/<model>-finetune or runs/<model>-linprobe)")
    return p


def batch_plan(cfg, world=None):
    """(accumulate, effective batch) on `world` processes (default: as the hardware flags give):
    --accumulate wins; else it comes from --effective-batch."""
    world = world or runs.world_size(cfg)
    per_step = cfg.batch_size * world
    accumulate = cfg.accumulate
    if accumulate is None:
        target = cfg.effective_batch or per_step
        if target % per_step:
            raise UserError(f"--effective-batch {target} is not a multiple of --batch-size {cfg.batch_size} x "
                            f"{world} device(s): change one, or pass --accumulate")
        accumulate = max(1, target // per_step)
    return accumulate, per_step * accumulate


def default_output(cfg):
    return cfg.output or f"runs/{model_name(cfg.model)}-{'linprobe' if cfg.linear_probe else 'finetune'}"


def model_name(model):
    return model if isinstance(model, str) else "custom"


def check(cfg):
    """Cheap checks of the options, before any data is scanned."""
    if not cfg.data:
        raise UserError("no --data given: pass a folder holding train/<class>/<image> and val/<class>/<image>")
    runs.check(cfg)
    if cfg.accumulate is not None and cfg.accumulate < 1 or (cfg.effective_batch or 1) < 1:
        raise UserError("--accumulate and --effective-batch must be at least 1 (or null)")
    if not 0 <= cfg.val_split < 1:
        raise UserError(f"--val-split {cfg.val_split}: pass a fraction in [0, 1), e.g. 0.1 (0: no validation)")
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        raise UserError(f"--clip-grad {cfg.clip_grad}: pass a positive norm, or null for no clipping")
    try:
        depths, _ = size_config(cfg.model)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--model: {e}") from None
    data.check_in_chans(cfg.in_chans, cfg.data)
    if cfg.input_size % 32:
        raise UserError(f"--input-size {cfg.input_size} is not a multiple of 32: pass e.g. 224")
    if cfg.pretrained and not Path(cfg.pretrained).is_file():
        raise UserError(f"--pretrained {cfg.pretrained}: no such file: pass an encoder or checkpoint file")
    if not cfg.linear_probe:
        layer_decay.check(depths, cfg.layer_decay_type)
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
            raise UserError(f"Mixup/CutMix pair up the images of a batch: --batch-size {cfg.batch_size} must be even")


def recipe(cfg):
    """Optimization values of this run: fine-tuning's, or with --linear-probe MAE's probe
    recipe, which also turns every fine-tuning regularizer off."""
    if cfg.linear_probe:
        return dict(blr=cfg.probe.blr, weight_decay=cfg.probe.weight_decay, epochs=cfg.probe.epochs,
                    warmup_epochs=cfg.probe.warmup_epochs, drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,
                    aa=None, reprob=0.0, ema_decay=None)
    return dict(blr=cfg.blr, weight_decay=cfg.weight_decay, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                drop_path=cfg.drop_path, mixup=cfg.mixup, cutmix=cfg.cutmix, smoothing=cfg.smoothing,
                aa=cfg.aa, reprob=cfg.reprob, ema_decay=cfg.ema_decay if cfg.ema else None)


def resolve(cfg, train_images=None):
    """Flags -> the run's values: the recipe in force (fine-tuning or probe), batch plan, lr; with
    `train_images` (the training set's size), fitted to it (`fit_to_data`)."""
    check(cfg)
    r = recipe(cfg)
    world = runs.world_size(cfg)
    accumulate, effective_batch = batch_plan(cfg, world)
    resolved = {**cfg.clone().as_dict(), **r, "accumulate": accumulate, "effective_batch": effective_batch,
                "world_size": world,
                "precision": runs.make_precision(cfg.precision),
                "lr": cfg.lr if cfg.lr is not None else r["blr"] * effective_batch / 256,
                "output": default_output(cfg)}
    resolved.pop("config", None)  # its values are in here now
    if not cfg.linear_probe:
        resolved.pop("probe")  # not in force
    resolved["ema"] = r["ema_decay"] is not None
    if train_images is not None:
        fit_to_data(cfg, resolved, train_images)
    return resolved


def fit_to_data(cfg, rv, images):
    """Fit the recipe, written for ImageNet, to a training set of `images`, in `rv`, with one line
    per change in rv["notes"] (printed by runs.print_notes):

    - effective batch: the recipe's is lowered, by lowering the accumulation (the per-device
      batch stays), until an epoch has at least runs.MIN_STEPS_PER_EPOCH optimizer steps or the
      accumulation is 1. The lr stays the recipe's (blr x its effective batch / 256): scaled
      down with the batch (64x from 1024 to 16) AdamW barely moves the weights, and on a small
      set the recipe then stalls where a plain AdamW loop learns (tests/test_finetune_small_data.py).
      A --effective-batch/--accumulate the user gave is kept, lr = blr x it / 256 as always,
      with a warning.
    - EMA: a run shorter than 10 time constants (1 / (1 - decay) steps) mostly averages the
      initial weights; the recipe's decay is lowered to 1 - 10 / steps (an explicit one is
      kept, with a warning naming that value).
    - warmup longer than the run: clamped to a fifth of the run (the base recipe's 20 of 100
      epochs), else the lr would never leave the warmup.
    """
    recipe_cfg = runs.recipe_values(build_parser(), cfg)
    notes = rv.setdefault("notes", [])
    world, accumulate = rv["world_size"], rv["accumulate"]
    steps = runs.steps_per_epoch(images, cfg.batch_size, world, accumulate)
    if steps < runs.MIN_STEPS_PER_EPOCH:
        if cfg.accumulate is not None or cfg.effective_batch != recipe_cfg.effective_batch:
            notes.append(runs.few_steps_warning(steps, images,
                                                "lower --effective-batch (or --accumulate) or --batch-size"))
        else:
            while accumulate > 1 and runs.steps_per_epoch(images, cfg.batch_size, world, accumulate) < \
                    runs.MIN_STEPS_PER_EPOCH:
                accumulate -= 1
            steps = runs.steps_per_epoch(images, cfg.batch_size, world, accumulate)
            effective_batch = cfg.batch_size * world * accumulate
            kept = "" if cfg.lr is not None else f" (lr stays the recipe's {rv['lr']:.3g})"
            notes.append(f"effective batch {rv['effective_batch']} -> {effective_batch}: {images:,} training images "
                         f"give {steps} steps per epoch; pass --effective-batch to choose{kept}")
            rv.update(accumulate=accumulate, effective_batch=effective_batch)
    rv["steps_per_epoch"] = steps
    total = steps * rv["epochs"] if cfg.max_steps < 0 else min(cfg.max_steps, steps * rv["epochs"])
    rv["total_steps"] = total
    decay = rv["ema_decay"]
    if decay is not None and 0 < total < 10 / (1 - decay):
        # Rounded down, so it still fits; at least 0.5 (a 2-step average), so that a run of a few
        # steps keeps an EMA to evaluate rather than a decay of 0, which turns it off.
        fitting = max(0.5, math.floor((1 - 10 / total) * 1e4) / 1e4)
        if cfg.ema_decay != recipe_cfg.ema_decay:
            notes.append(f"warning: --ema-decay {decay} averages over ~{1 / (1 - decay):,.0f} steps, longer than a "
                         f"tenth of this run's {total:,} optimizer steps: the EMA will stay near the initial weights; "
                         f"--ema-decay {fitting} fits")
        else:
            notes.append(f"EMA decay {decay} -> {fitting}: this run has {total:,} optimizer steps, fewer than 10 EMA "
                         f"time constants (1 / (1 - decay) = {1 / (1 - decay):,.0f} steps); pass --ema-decay to choose")
            rv["ema_decay"] = fitting
    if rv["warmup_epochs"] >= rv["epochs"] and rv["warmup_epochs"] > 0:
        warmup = rv["epochs"] / 5
        notes.append(f"warmup {rv['warmup_epochs']:g} epochs -> {warmup:g}: the run has {rv['epochs']} epochs, and a "
                     f"warmup that long would never reach the lr; pass --warmup-epochs below --epochs to choose")
        rv["warmup_epochs"] = warmup


class EpochSummary(Callback):
    """One line per epoch: top-1/top-5 of the raw weights and the EMA (or the train loss without
    validation); each epoch's row (train loss averaged over the epoch, val losses, lr) is also
    appended to <output>/metrics.jsonl, which curves.png is drawn from."""

    def __init__(self, path):
        self.path, self.history, self.losses = Path(path), [], []

    def on_train_epoch_start(self, trainer, module):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # Lightning hands back the loss divided by the accumulation it backpropagated.
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)

    def on_train_epoch_end(self, trainer, module):  # after the epoch's validation
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step,
               "train_loss": sum(self.losses) / len(self.losses) if self.losses else None,
               "top1": m.get("val/top1"), "top5": m.get("val/top5"),
               "ema_top1": m.get("val_ema/top1"), "ema_top5": m.get("val_ema/top5"),
               "val_loss": m.get("val/loss"), "ema_val_loss": m.get("val_ema/loss"), "lr": m.get("lr")}
        self.history.append(row)
        if trainer.is_global_zero:
            if row["top1"] is None:
                line = f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}"
            else:
                ema = f" | EMA top-1 {row['ema_top1']:.2f} top-5 {row['ema_top5']:.2f}" \
                    if row["ema_top1"] is not None else ""
                line = f"epoch {row['epoch']}: top-1 {row['top1']:.2f} top-5 {row['top5']:.2f}{ema}"
            bar = trainer.progress_bar_callback  # prints above the bar rather than into it
            bar.print(line) if bar is not None else print(line, flush=True)
            append_line(self.path, json.dumps(row))


class BestCheckpoint(Callback):
    """checkpoints/best.ckpt and classifier_best.safetensors: the weights with the best validation
    top-1 so far, the raw ones or their EMA, whichever scored higher (their metadata say which,
    and the score). Its best score is saved in every checkpoint, so a resumed run keeps it."""

    def __init__(self, output):
        self.output = Path(output)
        self.best = {"top1": None, "ema": False, "epoch": None}

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics  # synced over ranks: every rank decides the same
        scores = [(float(m["val/top1"]), False)]
        if "val_ema/top1" in m:
            scores.append((float(m["val_ema/top1"]), True))
        top1, ema = max(scores, key=lambda s: s[0])  # raw first: a tie keeps the raw weights
        if self.best["top1"] is not None and top1 <= self.best["top1"]:
            return
        self.best = {"top1": top1, "ema": ema, "epoch": trainer.current_epoch}
        trainer.save_checkpoint(self.output / "checkpoints" / "best.ckpt", weights_only=False)  # on every rank
        if trainer.is_global_zero:
            write_classifier(module, self.output / "classifier_best.safetensors", ema, top1,
                             best_epoch=trainer.current_epoch)

    def state_dict(self):
        return dict(self.best)

    def load_state_dict(self, state):
        self.best = dict(state)


def train(cfg):
    """The whole run. Returns {"history": per-epoch metrics, "output", "classifier", "best",
    "module"} (None for --dry-run); `run` is the command, this is for tests and scripts."""
    # The EMA copy and the probe's frozen encoder are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # --val-split 0: no val loader, on purpose.
    warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
    check(cfg)
    output = Path(default_output(cfg))
    train_set, val_set, classes, note = datasets(cfg, output)
    rv = resolve(cfg, len(train_set))
    rv["notes"] = ([note] if note else []) + rv["notes"]
    ckpt_path = runs.resume_checkpoint("finetune", cfg, output,
                                       {"arch": cfg.model, "in_chans": cfg.in_chans, "linear_probe": cfg.linear_probe})
    accumulate = runs.keep_effective_batch("finetune", cfg, ckpt_path, rv["accumulate"], rv["world_size"])
    if accumulate != rv["accumulate"]:  # resumed on another device count: the checkpoint's effective batch
        cfg = cfg.clone()
        cfg.accumulate = accumulate
        rv = resolve(cfg)
    rv["resume_from"] = ckpt_path
    runs.print_config(rv)
    if cfg.dry_run:
        return None
    runs.print_notes(rv)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # The release's head init for training from scratch is 0.001x; a pre-trained trunk gets a
    # fresh std-2e-5 head instead (load_pretrained).
    model = ConvNeXtV2(cfg.model, cfg.in_chans, len(classes), rv["drop_path"], head_init_scale=0.001)
    if ckpt_path:
        print(f"resuming from {ckpt_path}" + (" (its weights replace --pretrained)" if cfg.pretrained else ""))
    elif cfg.pretrained:
        load_pretrained(model, cfg.pretrained, trust=cfg.trust_checkpoint)
    else:
        print("no --pretrained: training from scratch (the supervised baseline)")
    val_images = f"{len(val_set)} val" if val_set is not None else "no val"
    print(f"{len(train_set)} train / {val_images} images, {len(classes)} classes")
    module = FinetuneModule(model, lr=rv["lr"], min_lr=cfg.min_lr, warmup_epochs=rv["warmup_epochs"],
                            weight_decay=rv["weight_decay"], layer_decay=cfg.layer_decay,
                            layer_decay_type=cfg.layer_decay_type, mixup=rv["mixup"], cutmix=rv["cutmix"],
                            smoothing=rv["smoothing"], ema_decay=rv["ema_decay"], linear_probe=cfg.linear_probe,
                            arch=cfg.model, in_chans=cfg.in_chans, input_size=cfg.input_size,
                            crop_pct=cfg.crop_pct, classes=classes, config=rv)

    summary = EpochSummary(output / "metrics.jsonl")
    callbacks = [ModelCheckpoint(output / "checkpoints", save_last=True, save_top_k=0), summary]
    no_val = {}
    if val_set is not None:
        callbacks.append(BestCheckpoint(output))
    else:
        no_val = dict(limit_val_batches=0, num_sanity_val_steps=0)
    trainer = runs.make_trainer(cfg, output, callbacks, epochs=rv["epochs"], accumulate=rv["accumulate"],
                                gradient_clip_val=cfg.clip_grad, **no_val,
                                use_distributed_sampler=False)  # FinetuneData shards per rank (resumable)
    runs.fit(trainer, module, rv, ckpt_path,
             datamodule=data.FinetuneData(train_set, val_set, cfg.batch_size, cfg.workers, cfg.seed))

    best = callbacks[-1].best if val_set is not None else None
    best = best if best and best["top1"] is not None else None
    if trainer.is_global_zero:
        write_classifiers(module, output, summary.history[-1] if summary.history else {})
        if best is None:
            # Nothing to choose by: the last weights are the best there is.
            print(f"no validation ({'--val-split 0' if val_set is None else 'no epoch finished'}): "
                  f"checkpoints/best.ckpt and classifier_best.safetensors are the last weights")
            write_classifier(module, output / "classifier_best.safetensors", False, None)
    if best is None:
        trainer.save_checkpoint(output / "checkpoints" / "best.ckpt", weights_only=False)
    if trainer.is_global_zero:
        report(module, output, val_set, classes, cfg, best)
    return {"history": summary.history, "output": output, "classifier": output / "classifier.safetensors",
            "best": best, "module": module}


def datasets(cfg, output):
    """(train set, val set or None, class names, a note or None): DIR/train and DIR/val, or without
    val/ a held-out part of train/ (listed in OUTPUT/val_split.txt), or with --val-split 0 none."""
    r = recipe(cfg)
    train_tf = data.train_transform(cfg.input_size, cfg.in_chans, r["aa"], r["reprob"])
    eval_tf = data.eval_transform(cfg.input_size, cfg.in_chans, cfg.crop_pct)
    train_set = data.image_folder(cfg.data, "train", train_tf, cfg.in_chans, cfg.strict_data, cache=default_cache())
    classes, note = train_set.classes, None
    if (Path(cfg.data) / "val").is_dir():
        val_set = data.image_folder(cfg.data, "val", eval_tf, cfg.in_chans, cfg.strict_data, cache=default_cache())
        data.check_classes(train_set, val_set)
    elif cfg.val_split > 0:
        split_file = output / "val_split.txt"
        if cfg.no_resume and not cfg.dry_run and rank_zero_only.rank == 0:
            split_file.unlink(missing_ok=True)
        reused = split_file.is_file() and not cfg.no_resume
        kept, held = data.held_out_split(train_set, cfg.val_split, cfg.seed, split_file if reused else None)
        if not reused and not cfg.dry_run and rank_zero_only.rank == 0:
            data.write_split(split_file, train_set, held)
        note = (f"no {cfg.data}/val: {'reusing the' if reused else 'holding out a stratified'} {len(held)} of "
                f"{len(train_set)} train/ images for validation, listed in {split_file}")
        val_set = copy.copy(train_set)
        val_set.transform = eval_tf
        train_set, val_set = Subset(train_set, kept), Subset(val_set, held)
    else:
        val_set = None
    world = runs.world_size(cfg)
    if len(train_set) < cfg.batch_size * world:
        raise UserError(f"train/ has {len(train_set)} images, fewer than one batch of {cfg.batch_size} x {world} "
                        f"device(s): lower --batch-size")
    return train_set, val_set, classes, note


def report(module, output, val_set, classes, cfg, best):
    """At the end of a run: the best weights' per-class accuracy and confusion matrix (printed,
    and OUTPUT/confusion.png), and OUTPUT/curves.png from metrics.jsonl."""
    metrics = output / "metrics.jsonl"
    if metrics.is_file():
        print(f"wrote {plot_curves(metrics, output / 'curves.png')}")
    if val_set is None or best is None:
        return
    which = "EMA" if best["ema"] else "raw"
    print(f"best validation top-1 {best['top1']:.2f} ({which} weights, epoch {best['epoch']}): "
          f"{output / 'checkpoints' / 'best.ckpt'}, {output / 'classifier_best.safetensors'}")
    weights = read_weights(output / "classifier_best.safetensors", trust=False)
    classifier = ConvNeXtV2(weights.model, weights.in_chans, weights.num_classes).to(module.device)
    classifier.load_state_dict(weights.state)
    cm = confusion_matrix(classifier, data.loader(val_set, cfg.batch_size, cfg.workers, train=False),
                          len(classes), module.device)
    print(per_class_table(cm, classes))
    print(f"wrote {plot_confusion(cm, classes, output / 'confusion.png', f'best weights ({which}), validation')}")


def write_classifier(module, path, ema, top1, **meta):
    """The raw classifier or its EMA in the public dense layout, with the class names and score."""
    hp = module.hparams
    save_weights(path, classifier_state_dict(module.state_dict(), ema=ema),
                 {"kind": "classifier", "input_size": hp.input_size, "crop_pct": hp.crop_pct, "classes": hp.classes,
                  "linear_probe": hp.linear_probe, "ema": ema, "top1": top1, **meta})


def write_classifiers(module, output, last):
    """classifier.safetensors (and classifier_ema.safetensors): the last weights."""
    write_classifier(module, output / "classifier.safetensors", False, last.get("top1"))
    written = ["classifier.safetensors"]
    if module.model_ema is not None:
        write_classifier(module, output / "classifier_ema.safetensors", True, last.get("ema_top1"))
        written.append("classifier_ema.safetensors")
    print(f"wrote {', '.join(str(output / w) for w in written)}")


def run(cfg):
    train(cfg)
