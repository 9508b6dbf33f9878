"""`fcmae pretrain`: FCMAE pre-training of a ConvNeXt V2 encoder.

    fcmae pretrain                                    # demo: built-in images, atto, a few minutes on CPU
    fcmae pretrain --model base --data /data/imagenet # the paper's recipe (configs/pretrain/base.yaml)

The recipe file of `--model` is read first, so every flag overrides it; `--config FILE` replaces it.
With `--data demo` (the default) the schedule switches to a short demo (`DEMO`): each DEMO key
that still holds the recipe's value takes the demo value, and flags you pass still win.

The run directory (`--output`) gets tensorboard/ logs, reconstructions/*.png, checkpoints/
(last.ckpt, kept current, and the latest --keep-checkpoints periodic step*.ckpt), config.yaml and encoder.safetensors.
Running the same command again resumes from checkpoints/last.ckpt.
"""
import warnings
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from fcmae import runs
from fcmae.callbacks import LastCheckpoint, Reconstructions, Throughput
from fcmae.datamodule import PretrainData
from fcmae.encoders import BACKEND_CHOICES, SIZES, check_backend, resolve_backend
from fcmae.errors import UserError
from fcmae.knn import add_knn_flags
from fcmae.module import PretrainModule
from fcmae.optim import schedule_steps

DEFAULT_MODEL = "atto"

# `--data demo`: a schedule that shows a falling loss and readable reconstructions in a few
# minutes on 2 CPU cores (atto: about 3 minutes; 1024 procedural images per epoch).
DEMO = {"epochs": 8, "warmup_epochs": 1, "input_size": 96, "batch_size": 32, "blr": 1.5e-2,
        "log_every": 4, "vis_every": 100, "ckpt_every": 100, "save_every_epochs": 4, "workers": 1}


def build_parser():
    p = ArgumentParser(prog="fcmae pretrain", description=(
        "FCMAE pre-training of a ConvNeXt V2 encoder. `--model SIZE --data DIR` runs the paper's recipe "
        "(configs/pretrain/SIZE.yaml; flags override it, --config FILE replaces it). Without --data it "
        "trains on built-in demo images with a short demo schedule (minutes on a CPU). Rerunning the same "
        "command resumes from OUTPUT/checkpoints/last.ckpt."),
                       epilog="Effective batch = batch-size x devices x num-nodes x accumulate; "
                              "lr = blr x effective batch / 256 unless --lr is given. "
                              f"--data demo replaces unchanged recipe values with {DEMO}.")
    p.add_argument("--config", action=ActionConfigFile, help="a recipe file (default: configs/pretrain/<model>.yaml)")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=Literal[tuple(SIZES)], default=DEFAULT_MODEL, help="ConvNeXt V2 size")
    g.add_argument("--backend", type=Literal[BACKEND_CHOICES], default="auto",
                   help="sparse-encoder implementation; auto = the fastest available on the device")
    g.add_argument("--in-chans", type=int, default=3, help="input channels: 3 = RGB, 1 = grayscale, other = .npy")
    g.add_argument("--input-size", type=int, default=224, help="crop side in pixels, a multiple of 32")
    g.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of 32x32 patches masked")
    g.add_argument("--norm-pix-loss", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="regress per-patch normalized pixels (--no-norm-pix-loss: raw pixels)")
    g.add_argument("--decoder-dim", type=int, default=512)
    g.add_argument("--decoder-depth", type=int, default=1)
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the encoder")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=str, default="demo",
                   help="'demo' (built-in images), DIR/train/<class>/<image> (ImageNet), a folder of images/.npy, or "
                        "WebDataset shards: a folder with index.json (fcmae shard), a pattern "
                        "(/data/shard-{000000..000999}.tar) or URLs (https://..., 'pipe:aws s3 cp s3://.../shard-{...}.tar -')")
    g.add_argument("--strict-data", action="store_true",
                   help="stop at the first unreadable file (default: skip it with a warning naming it, "
                        "count skips per epoch as data/skipped)")
    g.add_argument("--samples-per-epoch", type=Optional[int], default=None,
                   help="shards without index.json: samples in one epoch (the schedule needs it)")
    g.add_argument("--shuffle-buffer", type=int, default=1000,
                   help="shards: samples each loader worker shuffles among (more: better mixed, more memory)")
    g = runs.add_optimization_flags(p, batch_size=64, epochs=1600, blr=1.5e-4, min_lr=0.0, warmup_epochs=40)
    g.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--betas", type=tuple[float, float], default=(0.9, 0.95))
    runs.add_hardware_flags(p)
    g = p.add_argument_group("evaluation", "a kNN monitor of the encoder's features on a small labelled set")
    add_knn_flags(g, {"data": "--eval-data", "val_split": "--eval-val-split", "max_train": "--eval-max-train",
                      "k": "--knn-k", "temperature": "--knn-temperature"}, required=False)
    g.add_argument("--eval-every", type=int, default=1, help="epochs between kNN evaluations (and one at the end)")
    g = runs.add_run_flags(p, output_help="run directory (default: runs/<model>[-demo])")
    g.add_argument("--vis-every", type=int, default=1000, help="steps between reconstruction grids")
    g.add_argument("--ckpt-every", type=int, default=1000, help="steps between last.ckpt updates")
    g.add_argument("--save-every-epochs", type=int, default=20, help="epochs between periodic step*.ckpt files")
    g.add_argument("--keep-checkpoints", type=int, default=3,
                   help="periodic step*.ckpt files kept: the latest K (an older one is removed only after the new "
                        "one is written); 0: none, -1: all. last.ckpt is always kept")
    g.add_argument("--export", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="write <output>/encoder.safetensors at the end")
    return p


# ----------------------------------------------------------------------------- resolution

def resolve(cfg):
    """Parsed flags -> the run's configuration: demo schedule, run directory."""
    cfg = cfg.clone()
    if cfg.data == "demo":
        recipe = runs.recipe_values(build_parser(), cfg)
        for key, value in DEMO.items():
            if cfg[key] == recipe[key]:
                cfg[key] = value
    cfg.pop("config", None)  # its values are in cfg now
    if cfg.output is None:
        cfg.output = f"runs/{cfg.model}-demo" if cfg.data == "demo" else f"runs/{cfg.model}"
    return cfg


def check(cfg):
    """Cheap checks of the options, before any data is scanned or model built."""
    runs.check(cfg, "accumulate", "vis_every", "ckpt_every", "save_every_epochs")
    if cfg.keep_checkpoints < -1:
        raise UserError(f"--keep-checkpoints {cfg.keep_checkpoints}: pass how many to keep (0: none, -1: all)")
    require_backend(cfg.backend)
    if cfg.eval_data is not None:
        from fcmae.knn import check_knn
        check_knn(cfg.knn_k, cfg.knn_temperature, cfg.eval_val_split, cfg.eval_max_train,
                  ("knn-k", "knn-temperature", "eval-val-split", "eval-max-train"))
        if cfg.eval_every < 1:
            raise UserError(f"--eval-every {cfg.eval_every}: must be at least 1 (epochs)")
        if cfg.strategy == "fsdp":
            raise UserError("--eval-data with --strategy fsdp is not supported yet (the monitor copies the whole "
                            "encoder on each rank): use --strategy ddp, or evaluate checkpoints with `fcmae knn`")


def require_backend(name, device=None):
    """A backend that cannot run here (unknown, or MinkowskiEngine not installed) is one line."""
    try:
        check_backend(name, device)
    except ValueError as e:
        raise UserError(str(e)) from None


def callbacks(cfg, out):
    ckpt_dir = out / "checkpoints"
    callbacks = [
        LastCheckpoint(ckpt_dir, cfg.ckpt_every, keep=cfg.keep_checkpoints),
        # The latest K by step: Lightning writes the new file, then removes the oldest.
        ModelCheckpoint(ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False, monitor="step",
                        mode="max", save_top_k=cfg.keep_checkpoints, every_n_epochs=cfg.save_every_epochs,
                        save_on_train_epoch_end=True, enable_version_counter=False),
        Throughput(),
        Reconstructions(out / "reconstructions", cfg.vis_every),
        TQDMProgressBar(refresh_rate=1),
    ]
    if cfg.eval_data is not None:
        from fcmae.monitor import KnnMonitor
        callbacks.append(KnnMonitor(cfg.eval_data, out, cfg.eval_every, cfg.input_size, cfg.in_chans,
                                    cfg.eval_val_split, cfg.eval_max_train, cfg.knn_k, cfg.knn_temperature,
                                    cfg.batch_size, min(cfg.workers, 2), cfg.seed))
    return callbacks


# ----------------------------------------------------------------------------- run

def fit(cfg):
    """Train; returns (trainer, module). `run` is the command; this is for tests and scripts."""
    cfg = resolve(cfg)
    check(cfg)
    out = Path(cfg.output)
    data = PretrainData(cfg.data, cfg.input_size, cfg.in_chans, cfg.mask_ratio, cfg.batch_size,
                        cfg.workers, cfg.seed, pin_memory=torch.cuda.is_available(), strict=cfg.strict_data,
                        samples_per_epoch=cfg.samples_per_epoch, shuffle_buffer=cfg.shuffle_buffer)
    ckpt_path = runs.resume_checkpoint("pretrain", cfg, out,
                                       {k: cfg[k] for k in ("model", "in_chans", "decoder_dim", "decoder_depth")})
    cfg.accumulate = runs.keep_effective_batch("pretrain", cfg, ckpt_path, cfg.accumulate)

    trainer = runs.make_trainer(
        cfg, out, callbacks(cfg, out), epochs=cfg.epochs, accumulate=cfg.accumulate, enable_model_summary=False,
        use_distributed_sampler=False,  # PretrainData shards per rank itself (resumable mid-epoch)
        limit_val_batches=0, num_sanity_val_steps=0)
    world = trainer.world_size  # devices x nodes
    batches = data.batches_per_epoch(world)
    if batches == 0:
        raise UserError(f"{data.epoch_samples} samples are fewer than one batch of {cfg.batch_size} x {world} "
                        f"devices: lower --batch-size or add data")
    # What PretrainModule's schedule will span (it reads the same numbers off the trainer).
    steps_per_epoch, total_steps, warmup_steps = schedule_steps(batches, cfg.accumulate, cfg.epochs,
                                                                cfg.warmup_epochs)
    eff_batch = cfg.batch_size * cfg.accumulate * world
    resolved = {**cfg.as_dict(), "betas": list(cfg.betas),
                "backend": resolve_backend(cfg.backend, trainer.strategy.root_device.type),
                "precision": runs.make_precision(cfg.precision),
                "world_size": world, "effective_batch": eff_batch,
                "lr": cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256,
                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                "warmup_steps": warmup_steps, "resume_from": ckpt_path}
    few = runs.few_steps_warning(steps_per_epoch, data.epoch_samples, "lower --accumulate or --batch-size")
    if few:
        resolved["notes"] = [few]
    require_backend(resolved["backend"], trainer.strategy.root_device)  # what `auto` picked, on this device
    runs.print_config(resolved)
    if cfg.dry_run:
        return trainer, None
    runs.print_notes(resolved)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PretrainModule(
        cfg.model, resolved["backend"], cfg.in_chans, cfg.input_size, cfg.mask_ratio, cfg.norm_pix_loss,
        cfg.decoder_depth, cfg.decoder_dim, cfg.drop_path, resolved["lr"], cfg.min_lr, cfg.weight_decay,
        tuple(cfg.betas), cfg.warmup_epochs, config=resolved)
    with warnings.catch_warnings():
        # PretrainData resumes mid-epoch itself (it skips what the checkpoint's step count says
        # was trained on); Lightning cannot see that and would warn on every resume.
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        # Shards: each loader worker yields exactly its share of the epoch, so the length holds.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        runs.fit(trainer, module, resolved, ckpt_path, datamodule=data)

    last = out / "checkpoints" / "last.ckpt"
    if cfg.export and trainer.is_global_zero and last.is_file():
        from fcmae.export import export
        print(f"exported the encoder to {export(last, out / 'encoder.safetensors')}")
    return trainer, module


def run(cfg):
    fit(cfg)
