"""The kNN monitor of pre-training: every `every` epochs and at the end, the weighted kNN
top-1/top-5 of the encoder being trained, on a small labelled set; and the kNN protocol's flags,
which `fcmae knn` and `fcmae pretrain` (as --eval-* and --knn-*) declare.

The encoder's weights are copied into a dense ConvNeXtV2 (no mask, inference mode, the run's
precision); each rank embeds its share of the images and the features are gathered, so every
rank holds the same features as one device would and computes the same result.
"""
import math
import time
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Subset

from fcmae.data.labelled import labelled_sets
from fcmae.data.modules import loader
from fcmae.encoders import ConvNeXtV2
from fcmae.errors import SettingError
from fcmae.features import embed, knn_accuracy, load_trunk
from fcmae.rundir import RunDir, append_metrics

# The kNN settings under `fcmae knn`'s flag names, and under `fcmae pretrain`'s.
KNN_FLAGS = {"data": "--data", "val_split": "--val-split", "max_train": "--max-train", "k": "--k",
             "temperature": "--temperature"}
EVAL_FLAGS = {"data": "--eval-data", "val_split": "--eval-val-split", "max_train": "--eval-max-train",
              "k": "--knn-k", "temperature": "--knn-temperature"}


def add_knn_flags(parser, flags, required=True):
    """The labelled set and the kNN protocol, under the names `flags` gives them."""
    parser.add_argument(flags["data"], type=str if required else Optional[str], required=required,
                        default=None,
                        help=f"labelled images: DIR/train/<class>/<image> and DIR/val/<class>/<image>, or train/ "
                             f"alone (a stratified {flags['val_split']} is held out)")
    parser.add_argument(flags["val_split"], type=float, default=0.1, help="fraction of train/ held out when DIR has no val/")
    parser.add_argument(flags["max_train"], type=Optional[int], default=None,
                        help="cap the labelled train images (stratified); default: all")
    parser.add_argument(flags["k"], type=int, default=20, help="neighbours that vote")
    parser.add_argument(flags["temperature"], type=float, default=0.07, help="vote weight exp(cosine similarity / T)")


def check_knn(k, temperature, val_split, max_train):
    """The kNN protocol's values, before any image is read."""
    if k < 1:
        raise SettingError(f"`k` {k}: must be at least 1 (20 is the usual choice)")
    if temperature <= 0:
        raise SettingError(f"`temperature` {temperature}: must be positive (0.07 is the usual choice)")
    if not 0 < val_split < 1:
        raise SettingError(f"`val_split` {val_split}: pass a fraction in (0, 1), e.g. 0.1")
    if max_train is not None and max_train < 1:
        raise SettingError(f"`max_train` {max_train}: pass a positive number of images, or leave it out for all")


class KnnMonitor(Callback):
    """Settings named as `fcmae pretrain` names them (EVAL_FLAGS) in its errors."""

    def __init__(self, data, output, every=1, input_size=224, in_chans=3, val_split=0.1, max_train=None,
                 k=20, temperature=0.07, batch_size=64, workers=0, seed=0):
        # The labelled set is found and checked now, before training starts.
        try:
            self.train, self.val, self.classes = labelled_sets(data, input_size, in_chans, val_split, max_train, seed)
        except SettingError as e:
            raise e.worded(EVAL_FLAGS) from None
        self.metrics = RunDir(output).metrics
        self.every, self.k, self.temperature = every, k, temperature
        self.batch_size, self.workers = batch_size, workers
        self.done_step, self.last = None, None  # last: the latest result, for scripts and tests

    def on_train_start(self, trainer, pl_module):
        self.done_step = None

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch + 1) % self.every == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.evaluate(trainer, pl_module)  # the final weights, unless this step was just evaluated

    def shard(self, dataset, trainer, encoder, precision):
        """This rank's share of `dataset` embedded, gathered from all ranks in dataset order:
        (features (N, D), labels (N,)). Shares are padded to equal length (all_gather needs it)."""
        n, world, rank = len(dataset), trainer.world_size, trainer.global_rank
        mine = list(range(rank, n, world))
        mine += mine[-1:] * (math.ceil(n / world) - len(mine))  # repeat: rewritten with the same value below
        device = next(encoder.parameters()).device
        feats, labels = embed(encoder, loader(Subset(dataset, mine), self.batch_size, self.workers, train=False),
                              device, precision)
        index = torch.tensor(mine, device=device)
        if world > 1:
            feats, labels, index = (trainer.strategy.all_gather(t).flatten(0, 1) for t in (feats, labels, index))
        out_feats = feats.new_empty(n, feats.shape[1])
        out_labels = labels.new_empty(n)
        out_feats[index], out_labels[index] = feats, labels
        return out_feats, out_labels

    @torch.inference_mode()
    def evaluate(self, trainer, pl_module):
        step = trainer.global_step
        if step == self.done_step:
            return
        self.done_step = step
        start = time.perf_counter()
        source = pl_module.model.encoder
        encoder = ConvNeXtV2({"depths": list(source.depths), "dims": list(source.dims)}, source.in_chans,
                             num_classes=0)
        load_trunk(encoder, source.state_dict(), "the encoder")
        encoder = encoder.to(pl_module.device).eval()
        precision = str(trainer.precision)
        train_feats, train_labels = self.shard(self.train, trainer, encoder, precision)
        feats, labels = self.shard(self.val, trainer, encoder, precision)
        result = knn_accuracy(train_feats, train_labels, feats, labels, len(self.classes), self.k, self.temperature)
        seconds = time.perf_counter() - start
        self.last = {**result, "step": step}
        metrics = {"eval/knn_top1": result["top1"], "eval/knn_top5": result["top5"], "eval/seconds": seconds}
        if trainer.is_global_zero:
            if trainer.logger is not None:
                trainer.logger.log_metrics(metrics, step=step)
            append_metrics(self.metrics, step, trainer.current_epoch,
                           {**metrics, "eval/train_images": len(self.train), "eval/val_images": len(self.val)})
        pl_module.print(f"step {step}: kNN top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                        f"(k={self.k}, {len(self.train)} train / {len(self.val)} val images, {seconds:.1f}s)")
