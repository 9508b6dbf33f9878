"""The classification task for the run layer (fcmae/training/run.py): `fcmae finetune` trains the
dense ConvNeXt V2 classifier on DATA/train and reports top-1/top-5 of the raw weights and of their
EMA on DATA/val (or, without val/, on a held-out part of train/) every epoch.

The recipe in force is fine-tuning's, or with `linear_probe` MAE's probe recipe (`recipe`); it
fits itself to a small training set (`fit_to_data`). Without `pretrained` it trains from scratch
(the supervised baseline). The run ends by writing the classifier in the public dense layout
(classifier.safetensors, classifier_ema.safetensors), the best one so far
(classifier_best.safetensors, checkpoints/best.ckpt), a per-class table, confusion.png and
curves.png (fcmae/rundir.py names them all).
"""
import copy
import math
import warnings
from dataclasses import asdict
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import Subset

from fcmae.checkpoints import classifier_state_dict, read_weights, save_weights
from fcmae.data.filelist import default_cache
from fcmae.data.labelled import (SplitSubset, check_classes, check_in_chans, held_out_split, image_folder,
                                 left_out_note, write_split)
from fcmae.data.modules import LabelledData, loader
from fcmae.data.transforms import eval_transform, train_transform
from fcmae.encoders import ConvNeXtV2
from fcmae.encoders.convnextv2 import size_config
from fcmae.errors import UserError
from fcmae.finetune import layer_decay
from fcmae.finetune.module import FinetuneModule, FinetuneSettings
from fcmae.finetune.report import confusion_matrix, per_class_table, plot_confusion, plot_curves
from fcmae.finetune.weights import load_pretrained
from fcmae.masking import check_input_size
from fcmae.rundir import RunDir, append_metrics
from fcmae.training import flags
from fcmae.training.run import MIN_STEPS_PER_EPOCH, Task, base_plan, few_steps_warning, steps_per_epoch
from fcmae.training.trainer import world_size


def batch_plan(cfg, world=None):
    """(accumulate, effective batch) on `world` processes (default: as the hardware flags give):
    --accumulate wins; else it comes from --effective-batch."""
    world = world or world_size(cfg)
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
    flags.check(cfg)
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
    check_in_chans(cfg.in_chans, cfg.data)
    check_input_size(cfg.input_size, suggest=224)
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


def resolve(cfg, recipe_cfg, train_images=None, world=None):
    """Flags -> the run's values: the recipe in force (fine-tuning or probe), batch plan, lr; with
    `train_images` (the training set's size), fitted to it (`fit_to_data`). `recipe_cfg`: what the
    recipe file alone gives (training.flags.recipe_values)."""
    check(cfg)
    r = recipe(cfg)
    world = world or world_size(cfg)
    accumulate, _ = batch_plan(cfg, world)
    resolved = base_plan(cfg, world, accumulate, r)
    resolved["output"] = default_output(cfg)
    if not cfg.linear_probe:
        resolved.pop("probe")  # not in force
    resolved["ema"] = r["ema_decay"] is not None
    if train_images is not None:
        fit_to_data(cfg, recipe_cfg, resolved, train_images)
    return resolved


def fit_to_data(cfg, recipe_cfg, rv, images):
    """Fit the recipe, written for ImageNet, to a training set of `images`, in `rv`, with one line
    per change in rv["notes"] (printed by the run layer):

    - effective batch: the recipe's is lowered, by lowering the accumulation (the per-device
      batch stays), until an epoch has at least MIN_STEPS_PER_EPOCH optimizer steps or the
      accumulation is 1. The lr stays the recipe's (blr x its effective batch / 256): scaled
      down with the batch (64x from 1024 to 16) AdamW barely moves the weights, and on a small
      set the recipe then stalls where a plain AdamW loop learns
      (tests/finetune/test_finetune_small_data.py).
      A --effective-batch/--accumulate the user gave is kept, lr = blr x it / 256 as always,
      with a warning.
    - EMA: a run shorter than 10 time constants (1 / (1 - decay) steps) mostly averages the
      initial weights; the recipe's decay is lowered to 1 - 10 / steps (an explicit one is
      kept, with a warning naming that value).
    - warmup longer than the run: clamped to a fifth of the run (the base recipe's 20 of 100
      epochs), else the lr would never leave the warmup.
    """
    notes = rv.setdefault("notes", [])
    world, accumulate = rv["world_size"], rv["accumulate"]
    steps = steps_per_epoch(images, cfg.batch_size, world, accumulate)
    if steps < MIN_STEPS_PER_EPOCH:
        if cfg.accumulate is not None or cfg.effective_batch != recipe_cfg.effective_batch:
            notes.append(few_steps_warning(steps, images,
                                                "lower --effective-batch (or --accumulate) or --batch-size"))
        else:
            while accumulate > 1 and steps_per_epoch(images, cfg.batch_size, world, accumulate) < \
                    MIN_STEPS_PER_EPOCH:
                accumulate -= 1
            steps = steps_per_epoch(images, cfg.batch_size, world, accumulate)
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
    appended to the run's metrics.jsonl, which curves.png is drawn from."""

    def __init__(self, path):
        self.path, self.history, self.loss_sum, self.batches = Path(path), [], 0, 0

    def on_train_epoch_start(self, trainer, module):
        self.loss_sum, self.batches = 0, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # Lightning hands back the loss divided by the accumulation it backpropagated. Summed on
        # the device: read once per epoch, not once per step.
        self.loss_sum = self.loss_sum + outputs["loss"].detach() * trainer.accumulate_grad_batches
        self.batches += 1

    def on_train_epoch_end(self, trainer, module):  # after the epoch's validation
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step,
               "train_loss": float(self.loss_sum) / self.batches if self.batches else None,
               "top1": m.get("val/top1"), "top5": m.get("val/top5"),
               "ema_top1": m.get("val_ema/top1"), "ema_top5": m.get("val_ema/top5"),
               "val_loss": m.get("val/loss"), "ema_val_loss": m.get("val_ema/loss"),
               "lr": max(g["lr"] for g in trainer.optimizers[0].param_groups)}  # the head's, at the epoch's end
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
            append_metrics(self.path, row["step"], row["epoch"],
                           {k: v for k, v in row.items() if k not in ("step", "epoch")})


class BestCheckpoint(Callback):
    """checkpoints/best.ckpt and classifier_best.safetensors: the weights with the best validation
    top-1 so far, the raw ones or their EMA, whichever scored higher (their metadata say which,
    and the score). Its best score is saved in every checkpoint, so a resumed run keeps it."""

    def __init__(self, output):
        self.run = RunDir(output)
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
        trainer.save_checkpoint(self.run.best, weights_only=False)  # on every rank
        if trainer.is_global_zero:
            write_classifier(module, self.run.export("classifier_best"), ema, top1,
                             best_epoch=trainer.current_epoch)

    def state_dict(self):
        return dict(self.best)

    def load_state_dict(self, state):
        self.best = dict(state)


def datasets(cfg, output, world):
    """(train set, val set or None, class names, notes): DIR/train and DIR/val, or without val/ a
    held-out part of train/ (listed in OUTPUT/val_split.txt), or with --val-split 0 none. A
    held-out set and the rest of train/ are `SplitSubset`s: an unreadable file's substitute
    comes from its own part, so validation never sees a training image, nor training a
    validation one."""
    r = recipe(cfg)
    train_tf = train_transform(cfg.input_size, cfg.in_chans, r["aa"], r["reprob"])
    eval_tf = eval_transform(cfg.input_size, cfg.in_chans, cfg.crop_pct)
    train_set = image_folder(cfg.data, "train", train_tf, cfg.in_chans, cfg.strict_data, cache=default_cache())
    classes, notes = train_set.classes, [left_out_note(train_set)]
    if (Path(cfg.data) / "val").is_dir():
        val_set = image_folder(cfg.data, "val", eval_tf, cfg.in_chans, cfg.strict_data, cache=default_cache())
        check_classes(train_set, val_set)
        notes.append(left_out_note(val_set))
    elif cfg.val_split > 0:
        split_file = RunDir(output).val_split
        if cfg.no_resume and not cfg.dry_run and rank_zero_only.rank == 0:
            split_file.unlink(missing_ok=True)
        reused = split_file.is_file() and not cfg.no_resume
        kept, held = held_out_split(train_set, cfg.val_split, cfg.seed, split_file if reused else None)
        if not reused and not cfg.dry_run and rank_zero_only.rank == 0:
            write_split(split_file, train_set, held)
        notes.append(f"no {cfg.data}/val: {'reusing the' if reused else 'holding out a stratified'} {len(held)} of "
                     f"{len(train_set)} train/ images for validation, listed in {split_file}")
        val_set = copy.copy(train_set)
        val_set.transform = eval_tf
        train_set, val_set = SplitSubset(train_set, kept), SplitSubset(val_set, held)
    else:
        val_set = None
    if len(train_set) < cfg.batch_size * world:
        raise UserError(f"train/ has {len(train_set)} images, fewer than one batch of {cfg.batch_size} x {world} "
                        f"device(s): lower --batch-size")
    return train_set, val_set, classes, [note for note in notes if note]


def report(module, output, val_set, classes, cfg, best):
    """At the end of a run: the best weights' per-class accuracy and confusion matrix (printed,
    and OUTPUT/confusion.png), and OUTPUT/curves.png from metrics.jsonl."""
    run = RunDir(output)
    if run.metrics.is_file():
        print(f"wrote {plot_curves(run.metrics, run.curves)}")
    if val_set is None or best is None:
        return
    which = "EMA" if best["ema"] else "raw"
    print(f"best validation top-1 {best['top1']:.2f} ({which} weights, epoch {best['epoch']}): "
          f"{run.best}, {run.export('classifier_best')}")
    weights = read_weights(run.export("classifier_best"), trust=False)
    classifier = ConvNeXtV2(weights.model, weights.in_chans, weights.num_classes).to(module.device)
    classifier.load_state_dict(weights.state)
    cm = confusion_matrix(classifier, loader(val_set, cfg.batch_size, cfg.workers, train=False),
                          len(classes), module.device)
    print(per_class_table(cm, classes))
    print(f"wrote {plot_confusion(cm, classes, run.confusion, f'best weights ({which}), validation')}")


def write_classifier(module, path, ema, top1, **meta):
    """The raw classifier or its EMA in the public dense layout, with the class names and score."""
    hp = module.hparams
    save_weights(path, classifier_state_dict(module.state_dict(), ema=ema),
                 {"kind": "classifier", "input_size": hp.input_size, "crop_pct": hp.crop_pct, "classes": hp.classes,
                  "linear_probe": hp.linear_probe, "ema": ema, "top1": top1, **meta})
    return path


def write_classifiers(module, output, last):
    """classifier.safetensors (and classifier_ema.safetensors): the last weights."""
    run = RunDir(output)
    written = [write_classifier(module, run.export("classifier"), False, last.get("top1"))]
    if module.model_ema is not None:
        written.append(write_classifier(module, run.export("classifier_ema"), True, last.get("ema_top1")))
    print(f"wrote {', '.join(str(path) for path in written)}")


# ----------------------------------------------------------------------------- the task

class FinetuneTask(Task):
    command = "finetune"

    def __init__(self, cfg, recipe):
        cfg = cfg.clone()
        cfg.output = default_output(cfg)
        super().__init__(cfg, recipe)

    def check(self):
        check(self.cfg)

    def resume_values(self):
        cfg = self.cfg
        return {"arch": cfg.model, "in_chans": cfg.in_chans, "linear_probe": cfg.linear_probe}

    def data(self, output, world):
        cfg = self.cfg
        self.train_set, self.val_set, self.classes, self.notes = datasets(cfg, output, world)
        return LabelledData(self.train_set, self.val_set, cfg.batch_size, cfg.workers, cfg.seed)

    def plan(self, world, data):
        resolved = resolve(self.cfg, self.recipe, len(self.train_set), world)
        resolved["notes"] = self.notes + resolved["notes"]
        return resolved

    def callbacks(self, resolved, output):
        run = RunDir(output)
        self.summary = EpochSummary(run.metrics)
        self.best = BestCheckpoint(output) if self.val_set is not None else None
        return [ModelCheckpoint(run.checkpoints, save_last=True, save_top_k=0), self.summary,
                *([self.best] if self.best else [])]

    def trainer_options(self, resolved):
        no_val = {} if self.val_set is not None else dict(limit_val_batches=0, num_sanity_val_steps=0)
        return dict(gradient_clip_val=self.cfg.clip_grad, **no_val)

    def module(self, resolved, data):
        cfg = self.cfg
        # The EMA copy and the probe's frozen encoder are in eval mode on purpose.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # --val-split 0: no val loader, on purpose.
        warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
        # The release's head init for training from scratch is 0.001x; a pre-trained trunk gets a
        # fresh std-2e-5 head instead (load_pretrained).
        model = ConvNeXtV2(cfg.model, cfg.in_chans, len(self.classes), resolved["drop_path"], head_init_scale=0.001)
        if resolved["resume_from"]:
            print(f"resuming from {resolved['resume_from']}" +
                  (" (its weights replace --pretrained)" if cfg.pretrained else ""))
        elif cfg.pretrained:
            load_pretrained(model, cfg.pretrained, trust=cfg.trust_checkpoint)
        else:
            print("no --pretrained: training from scratch (the supervised baseline)")
        val_images = f"{len(self.val_set)} val" if self.val_set is not None else "no val"
        print(f"{len(self.train_set)} train / {val_images} images, {len(self.classes)} classes")
        settings = FinetuneSettings.from_config(resolved, classes=self.classes)
        return FinetuneModule(model, **asdict(settings), config=resolved)

    def finish(self, trainer, module, resolved):
        """The classifiers, the best weights and the report: {"history": per-epoch metrics,
        "output", "classifier", "best", "module"}."""
        output, summary = Path(resolved["output"]), self.summary
        best = self.best.best if self.best is not None else None
        best = best if best and best["top1"] is not None else None
        run = RunDir(output)
        if trainer.is_global_zero:
            write_classifiers(module, output, summary.history[-1] if summary.history else {})
            if best is None:
                # Nothing to choose by: the last weights are the best there is.
                print(f"no validation ({'--val-split 0' if self.val_set is None else 'no epoch finished'}): "
                      f"checkpoints/best.ckpt and classifier_best.safetensors are the last weights")
                write_classifier(module, run.export("classifier_best"), False, None)
        if best is None:
            trainer.save_checkpoint(run.best, weights_only=False)
        if trainer.is_global_zero:
            report(module, output, self.val_set, self.classes, self.cfg, best)
        return {"history": summary.history, "output": output, "classifier": run.export("classifier"),
                "best": best, "module": module}
