"""`fcmae finetune`: train the dense ConvNeXt V2 classifier on DIR/train, report top-1/top-5 of
the raw weights and of their EMA on DIR/val every epoch.

    fcmae finetune --model base --data /path/to/imagenet-1k --pretrained FILE --output runs/ft-base

The size's recipe (configs/finetune/<model>.yaml) is read first; command-line options override
it. `--linear-probe` trains only a linear head on the frozen encoder (MAE's protocol, values
from `probe.*`). Without `--pretrained` it trains from scratch (the supervised baseline). A run
resumes from <output>/checkpoints/last.ckpt when present and ends by writing the classifier in
the public dense layout, <output>/classifier.safetensors (and classifier_ema.safetensors).
"""
import json
import warnings
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from fcmae import runs
from fcmae.encoders import ConvNeXtV2
from fcmae.encoders.convnextv2 import size_config
from fcmae.errors import UserError
from fcmae.filelist import default_cache
from fcmae.finetune import data, layer_decay
from fcmae.finetune.module import FinetuneModule
from fcmae.checkpoints import classifier_state_dict, save_weights
from fcmae.finetune.weights import load_pretrained

DEFAULT_MODEL = "base"


def build_parser():
    p = ArgumentParser(prog="fcmae finetune", description=(
        "Fine-tune a ConvNeXt V2 classifier on DIR/train, top-1/top-5 on DIR/val every epoch (raw and EMA "
        "weights). `--model SIZE` reads configs/finetune/SIZE.yaml first (flags override it, --config FILE "
        "replaces it). Rerunning the same command resumes from OUTPUT/checkpoints/last.ckpt."),
                       epilog="Effective batch = batch-size x devices x num-nodes x accumulate; accumulate comes "
                              "from --effective-batch unless given. lr = blr x effective batch / 256 unless --lr.")
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
    g.add_argument("--data", type=Optional[str], default=None, help="folder with train/ and val/ class folders")
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
                   help="images per optimizer step; sets --accumulate from the device count unless that is given")
    g.add_argument("--accumulate", type=Optional[int], default=None, help="gradient accumulation steps")
    g.add_argument("--layer-decay", type=float, default=0.6, help="layer-wise lr decay (1: off)")
    g.add_argument("--layer-decay-type", type=Literal["single", "group"], default="group",
                   help="single: an id per block; group: the third stage three blocks at a time (base and larger)")
    g.add_argument("--ema", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="keep an EMA of the weights and evaluate it beside them (--no-ema: off)")
    g.add_argument("--ema-decay", type=float, default=0.9999)
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


def model_name(model):
    return model if isinstance(model, str) else "custom"


def check(cfg):
    """Cheap checks of the options, before any data is scanned."""
    if not cfg.data:
        raise UserError("no --data given: pass a folder holding train/<class>/<image> and val/<class>/<image>")
    runs.check(cfg)
    if cfg.accumulate is not None and cfg.accumulate < 1 or (cfg.effective_batch or 1) < 1:
        raise UserError("--accumulate and --effective-batch must be at least 1 (or null)")
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


class EpochSummary(Callback):
    """One line per validation: top-1/top-5 of the raw weights and the EMA, also appended to
    <output>/metrics.jsonl (the accuracy curve)."""

    def __init__(self, path):
        self.path, self.history = Path(path), []

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step, "train_loss": m.get("train/loss"),
               "top1": m.get("val/top1"), "top5": m.get("val/top5"),
               "ema_top1": m.get("val_ema/top1"), "ema_top5": m.get("val_ema/top5")}
        self.history.append(row)
        if trainer.is_global_zero:
            ema = f" | EMA top-1 {row['ema_top1']:.2f} top-5 {row['ema_top5']:.2f}" if row["ema_top1"] is not None else ""
            line = f"epoch {row['epoch']}: top-1 {row['top1']:.2f} top-5 {row['top5']:.2f}{ema}"
            bar = trainer.progress_bar_callback  # prints above the bar rather than into it
            bar.print(line) if bar is not None else print(line, flush=True)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def resolve(cfg):
    """Flags -> the run's values: the recipe in force (fine-tuning or probe), batch plan, lr."""
    check(cfg)
    r = recipe(cfg)
    world = runs.world_size(cfg)
    accumulate, effective_batch = batch_plan(cfg, world)
    kind = "linprobe" if cfg.linear_probe else "finetune"
    resolved = {**cfg.clone().as_dict(), **r, "accumulate": accumulate, "effective_batch": effective_batch,
                "world_size": world,
                "precision": runs.make_precision(cfg.precision),
                "lr": cfg.lr if cfg.lr is not None else r["blr"] * effective_batch / 256,
                "output": cfg.output or f"runs/{model_name(cfg.model)}-{kind}"}
    resolved.pop("config", None)  # its values are in here now
    if not cfg.linear_probe:
        resolved.pop("probe")  # not in force
    resolved["ema"] = r["ema_decay"] is not None
    return resolved


def train(cfg):
    """The whole run. Returns {"history": per-epoch metrics, "output", "classifier", "module"}
    (None for --dry-run); `run` is the command, this is for tests and scripts."""
    # The EMA copy and the probe's frozen encoder are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    rv = resolve(cfg)
    output = Path(rv["output"])
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
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    train_set = data.image_folder(cfg.data, "train", data.train_transform(cfg.input_size, cfg.in_chans, rv["aa"],
                                                                          rv["reprob"]), cfg.in_chans,
                                  cfg.strict_data, cache=default_cache())
    val_set = data.image_folder(cfg.data, "val", data.eval_transform(cfg.input_size, cfg.in_chans, cfg.crop_pct),
                                cfg.in_chans, cfg.strict_data, cache=default_cache())
    data.check_classes(train_set, val_set)
    world = rv["world_size"]
    if len(train_set) < cfg.batch_size * world:
        raise UserError(f"train/ has {len(train_set)} images, fewer than one batch of {cfg.batch_size} x {world} "
                        f"device(s): lower --batch-size")

    # The release's head init for training from scratch is 0.001x; a pre-trained trunk gets a
    # fresh std-2e-5 head instead (load_pretrained).
    model = ConvNeXtV2(cfg.model, cfg.in_chans, len(train_set.classes), rv["drop_path"], head_init_scale=0.001)
    if ckpt_path:
        print(f"resuming from {ckpt_path}" + (" (its weights replace --pretrained)" if cfg.pretrained else ""))
    elif cfg.pretrained:
        load_pretrained(model, cfg.pretrained, trust=cfg.trust_checkpoint)
    else:
        print("no --pretrained: training from scratch (the supervised baseline)")
    print(f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes")
    module = FinetuneModule(model, lr=rv["lr"], min_lr=cfg.min_lr, warmup_epochs=rv["warmup_epochs"],
                            weight_decay=rv["weight_decay"], layer_decay=cfg.layer_decay,
                            layer_decay_type=cfg.layer_decay_type, mixup=rv["mixup"], cutmix=rv["cutmix"],
                            smoothing=rv["smoothing"], ema_decay=rv["ema_decay"], linear_probe=cfg.linear_probe,
                            arch=cfg.model, in_chans=cfg.in_chans, input_size=cfg.input_size,
                            crop_pct=cfg.crop_pct, classes=train_set.classes, config=rv)

    summary = EpochSummary(output / "metrics.jsonl")
    trainer = runs.make_trainer(cfg, output, [ModelCheckpoint(output / "checkpoints", save_last=True, save_top_k=0),
                                              summary], epochs=rv["epochs"], accumulate=rv["accumulate"],
                                use_distributed_sampler=False)  # FinetuneData shards per rank (resumable)
    runs.fit(trainer, module, rv, ckpt_path,
             datamodule=data.FinetuneData(train_set, val_set, cfg.batch_size, cfg.workers, cfg.seed))

    classifier = output / "classifier.safetensors"
    if trainer.is_global_zero:
        write_classifiers(module, output, summary.history[-1] if summary.history else {})
    return {"history": summary.history, "output": output, "classifier": classifier, "module": module}


def write_classifiers(module, output, last):
    """classifier.safetensors (and classifier_ema.safetensors) in the public dense layout."""
    state = module.state_dict()
    hp = module.hparams
    meta = {"kind": "classifier", "input_size": hp.input_size, "crop_pct": hp.crop_pct, "classes": hp.classes,
            "linear_probe": hp.linear_probe}
    save_weights(output / "classifier.safetensors", classifier_state_dict(state),
                 {**meta, "ema": False, "top1": last.get("top1")})
    written = ["classifier.safetensors"]
    if module.model_ema is not None:
        save_weights(output / "classifier_ema.safetensors", classifier_state_dict(state, ema=True),
                     {**meta, "ema": True, "top1": last.get("ema_top1")})
        written.append("classifier_ema.safetensors")
    print(f"wrote {', '.join(str(output / w) for w in written)}")


def run(cfg):
    train(cfg)
