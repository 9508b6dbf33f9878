"""The pre-training task for the run layer (fcmae/training/run.py): the demo recipe, checks, data,
schedule, callbacks (periodic checkpoints, reconstruction grids, the kNN monitor), the
PretrainModule and the encoder export at the end.

With `data` "demo" (the default) the schedule switches to a short demo (`DEMO`): each DEMO key
that still holds the recipe's value takes the demo value; flags the user passed still win. The
run directory gets tensorboard/ logs, reconstructions/*.png, checkpoints/ (last.ckpt, kept
current, and the latest `keep_checkpoints` periodic step*.ckpt), config.yaml and
encoder.safetensors (fcmae/rundir.py).
"""
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torchvision.utils import make_grid, save_image

from fcmae.checkpoints import export_weights
from fcmae.data.modules import PretrainData
from fcmae.encoders import check_backend, resolve_backend
from fcmae.errors import SettingError, UserError
from fcmae.masking import PATCH_SIZE, patchify, unpatchify
from fcmae.module import PretrainModule, PretrainSettings
from fcmae.optim import schedule_steps
from fcmae.rundir import PERIODIC, RECONSTRUCTION, RunDir
from fcmae.training import flags
from fcmae.training.callbacks import LastCheckpoint, Throughput
from fcmae.training.monitor import EVAL_FLAGS, KnnMonitor, check_knn
from fcmae.training.run import Task, base_plan, few_steps_warning

DEFAULT_MODEL = "atto"

# `data` "demo": a schedule that shows a falling loss and readable reconstructions in a few
# minutes on 2 CPU cores (atto: about 3 minutes; 1024 procedural images per epoch).
DEMO = {"epochs": 8, "warmup_epochs": 1, "input_size": 96, "batch_size": 32, "blr": 1.5e-2,
        "log_every": 4, "vis_every": 100, "ckpt_every": 100, "save_every_epochs": 4, "workers": 1}


def resolve(cfg, recipe):
    """Parsed flags -> the run's flags: the demo schedule where the recipe's values stand
    (`recipe`: what the recipe alone gives), the default run directory."""
    cfg = cfg.clone()
    if cfg.data == "demo":
        for key, value in DEMO.items():
            if cfg[key] == recipe[key]:
                cfg[key] = value
    cfg.pop("config", None)  # its values are in cfg now
    if cfg.output is None:
        cfg.output = f"runs/{cfg.model}-demo" if cfg.data == "demo" else f"runs/{cfg.model}"
    return cfg


def fit_warmup(epochs, warmup, recipe_epochs, recipe_warmup, notes):
    """The warmup (in epochs) of a run of `epochs`, with one line in `notes` when it changes or
    is doubtful. The recipe's warmup (`warmup` equal to the recipe's `recipe_warmup`, written
    for its `recipe_epochs`) is fitted to the run: at most a fifth of it, the longest warmup the
    recipes use relative to their length (docs/method.md, "A short run's warmup", has the
    measurements behind the choice). A warmup the user chose is kept, with a warning when it is
    not shorter than the run: the lr would never reach its peak."""
    if warmup != recipe_warmup:
        if warmup >= epochs > 0 and warmup > 0:
            notes.append(f"warning: --warmup-epochs {warmup:g} is not shorter than the run's {epochs} epochs: the lr "
                         f"never leaves the warmup and stays below the peak it is set to; "
                         f"--warmup-epochs {epochs / 5:g} (a fifth of the run) fits")
        return warmup
    fitted = min(warmup, epochs / 5)
    if fitted != warmup:
        notes.append(f"warmup {warmup:g} epochs -> {fitted:g}: the recipe's {warmup:g} of its {recipe_epochs} epochs, at "
                     f"most a fifth of this run's {epochs}; pass --warmup-epochs to choose")
    return fitted


def require_backend(name, device=None):
    """A backend that cannot run here (unknown, or MinkowskiEngine not installed) is one line."""
    try:
        check_backend(name, device)
    except ValueError as e:
        raise UserError(str(e)) from None


class PretrainTask(Task):
    command = "pretrain"

    def __init__(self, cfg, recipe):
        super().__init__(resolve(cfg, recipe), recipe)

    def check(self):
        cfg = self.cfg
        flags.check(cfg, "accumulate", "vis_every", "ckpt_every", "save_every_epochs")
        if cfg.keep_checkpoints < -1:
            raise UserError(f"--keep-checkpoints {cfg.keep_checkpoints}: pass how many to keep (0: none, -1: all)")
        require_backend(cfg.backend)
        if cfg.eval_data is not None:
            try:
                check_knn(cfg.knn_k, cfg.knn_temperature, cfg.eval_val_split, cfg.eval_max_train)
            except SettingError as e:
                raise e.worded(EVAL_FLAGS) from None
            if cfg.eval_every < 1:
                raise UserError(f"--eval-every {cfg.eval_every}: must be at least 1 (epochs)")
            if cfg.strategy == "fsdp":
                raise UserError("--eval-data with --strategy fsdp is not supported yet (the monitor copies the whole "
                                "encoder on each rank): use --strategy ddp, or evaluate checkpoints with `fcmae knn`")

    def resume_values(self):
        return {k: self.cfg[k] for k in ("model", "in_chans", "decoder_dim", "decoder_depth")}

    def data(self, output, world):
        cfg = self.cfg
        return PretrainData(cfg.data, cfg.input_size, cfg.in_chans, cfg.mask_ratio, cfg.batch_size, cfg.workers,
                            cfg.seed, pin_memory=torch.cuda.is_available(), strict=cfg.strict_data,
                            samples_per_epoch=cfg.samples_per_epoch, shuffle_buffer=cfg.shuffle_buffer)

    def plan(self, world, data):
        cfg = self.cfg
        batches = data.batches_per_epoch(world)
        if batches == 0:
            raise UserError(f"{data.epoch_samples} samples are fewer than one batch of {cfg.batch_size} x {world} "
                            f"devices: lower --batch-size or add data")
        notes = []
        warmup = fit_warmup(cfg.epochs, cfg.warmup_epochs, *self.schedule_recipe(), notes)
        # What PretrainModule's schedule will span (it reads the same numbers off the trainer).
        steps, total, warmup_steps = schedule_steps(batches, cfg.accumulate, cfg.epochs, warmup)
        resolved = base_plan(cfg, world, cfg.accumulate, {"betas": list(cfg.betas)})
        resolved.update(warmup_epochs=warmup, steps_per_epoch=steps, total_steps=total, warmup_steps=warmup_steps)
        few = few_steps_warning(steps, data.epoch_samples, "lower --accumulate or --batch-size")
        resolved["notes"] = notes + ([few] if few else [])
        return resolved

    def schedule_recipe(self):
        """(epochs, warmup epochs) of the recipe in force: the recipe file's, or with `data` demo
        the demo schedule's (DEMO)."""
        if self.cfg.data == "demo":
            return DEMO["epochs"], DEMO["warmup_epochs"]
        return self.recipe.epochs, self.recipe.warmup_epochs

    def callbacks(self, resolved, output):
        cfg, run = self.cfg, RunDir(output)
        callbacks = [
            LastCheckpoint(run.checkpoints, cfg.ckpt_every, keep=cfg.keep_checkpoints),
            # The latest K by step: Lightning writes the new file, then removes the oldest.
            ModelCheckpoint(run.checkpoints, filename=PERIODIC, auto_insert_metric_name=False, monitor="step",
                            mode="max", save_top_k=cfg.keep_checkpoints, every_n_epochs=cfg.save_every_epochs,
                            save_on_train_epoch_end=True, enable_version_counter=False),
            Throughput(),
            Reconstructions(run.reconstructions, cfg.vis_every),
        ]
        if cfg.eval_data is not None:
            callbacks.append(KnnMonitor(cfg.eval_data, output, cfg.eval_every, cfg.input_size, cfg.in_chans,
                                        cfg.eval_val_split, cfg.eval_max_train, cfg.knn_k, cfg.knn_temperature,
                                        cfg.batch_size, min(cfg.workers, 2), cfg.seed))
        return callbacks

    def trainer_options(self, resolved):
        return dict(enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)

    def on_device(self, resolved, trainer):
        device = trainer.strategy.root_device
        resolved["backend"] = resolve_backend(self.cfg.backend, device.type)
        require_backend(resolved["backend"], device)  # what `auto` picked, on this device

    def module(self, resolved, data):
        return PretrainModule(**asdict(PretrainSettings.from_config(resolved)), config=resolved)

    def finish(self, trainer, module, resolved):
        """The encoder export; (trainer, module) for scripts and tests."""
        run = RunDir(resolved["output"])
        if self.cfg.export and trainer.is_global_zero and run.last.is_file():
            print(f"exported the encoder to {export_weights(run.last, run.export('encoder'))}")
        return trainer, module


@torch.no_grad()
def reconstruction_grid(model, imgs, mask, norm=None, gray=0.5):
    """Rows of original / masked input / reconstruction, in [0, 1] for display.

    imgs (N, C, H, W) as fed to the model, mask (N, H/32, W/32) with 1 = masked. The
    reconstruction shows visible patches from the input and masked ones from the prediction;
    with norm-pix loss the prediction is in per-patch normalized units, so it gets each target
    patch's own mean and std back. `norm` = the data's (mean, std), or None (arrays: min-max).
    """
    n, c, h, w = imgs.shape
    _, pred, _ = model(imgs, mask)  # pred (N, L, 32*32*C)
    if model.norm_pix_loss:
        target = patchify(imgs)  # (N, L, 32*32*C)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    recon = unpatchify(pred, h // PATCH_SIZE, w // PATCH_SIZE, c)  # (N, C, H, W)
    m = mask.repeat_interleave(PATCH_SIZE, 1).repeat_interleave(PATCH_SIZE, 2).unsqueeze(1).to(imgs.dtype)
    rows = [imgs, imgs * (1 - m), imgs * (1 - m) + recon * m]  # masked input gets gray below
    if norm is not None:
        mean = torch.tensor(norm[0], device=imgs.device).view(1, -1, 1, 1)
        std = torch.tensor(norm[1], device=imgs.device).view(1, -1, 1, 1)
        rows = [r * std + mean for r in rows]
    else:  # arrays: scale each original's range to [0, 1], the same for its three rows
        lo, hi = imgs.amin((1, 2, 3), keepdim=True), imgs.amax((1, 2, 3), keepdim=True)
        rows = [(r - lo) / (hi - lo + 1e-6) for r in rows]
    rows[1] = rows[1] * (1 - m) + gray * m
    rows = [r[:, :3] for r in rows]  # more than 3 channels: show the first three
    return make_grid(torch.cat(rows).clamp(0, 1).float().cpu(), nrow=n, padding=2)


class Reconstructions(Callback):
    """Every `every_n_steps` steps and at the end: the reconstruction grid of a fixed batch, to
    TensorBoard (`reconstruction`) and to `<dirpath>/step<step>.png`."""

    def __init__(self, dirpath, every_n_steps=1000, num_images=8):
        self.dirpath, self.every_n_steps, self.num_images = Path(dirpath), every_n_steps, num_images
        self.done_step = None

    def write(self, trainer, pl_module):
        step = trainer.global_step
        if step == self.done_step:
            return
        self.done_step = step
        imgs, mask = trainer.datamodule.preview(self.num_images)
        was_training = pl_module.training
        pl_module.eval()
        # All ranks run the forward (FSDP gathers parameters collectively); rank 0 writes.
        grid = reconstruction_grid(pl_module.model, imgs.to(pl_module.device), mask.to(pl_module.device),
                                   trainer.datamodule.norm)
        pl_module.train(was_training)
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            save_image(grid, self.dirpath / RECONSTRUCTION.format(step=step))
            if trainer.logger is not None and hasattr(trainer.logger.experiment, "add_image"):
                trainer.logger.experiment.add_image("reconstruction", grid, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        self.done_step = trainer.global_step  # nothing new to show for a resumed run's first step

    def on_train_end(self, trainer, pl_module):
        self.write(trainer, pl_module)


