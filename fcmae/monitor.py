"""The kNN monitor of `fcmae pretrain --eval-data DIR`: every `--eval-every` epochs and at the
end, the weighted kNN top-1/top-5 of the encoder being trained, on a small labelled set.

The encoder's weights are copied into a dense ConvNeXtV2 (no mask, inference mode, the run's
precision); each rank embeds its share of the images and the features are gathered, so every
rank holds the same features as one device would and computes the same result.
"""
import json
import math
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Subset

from fcmae.encoders import ConvNeXtV2
from fcmae.features import embed, knn_accuracy, load_trunk
from fcmae.files import append_line
from fcmae.finetune.data import loader
from fcmae.knn import labelled_sets


class KnnMonitor(Callback):
    def __init__(self, data, output, every=1, input_size=224, in_chans=3, val_split=0.1, max_train=None,
                 k=20, temperature=0.07, batch_size=64, workers=0, seed=0):
        # The labelled set is found and checked now, before training starts.
        self.train, self.val, self.classes = labelled_sets(data, input_size, in_chans, val_split, max_train, seed,
                                                                   "--eval-data")
        self.metrics = Path(output) / "metrics.jsonl"
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
            self.metrics.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.metrics, json.dumps({"step": step, "epoch": trainer.current_epoch, **metrics,
                                                  "eval/train_images": len(self.train),
                                                  "eval/val_images": len(self.val)}))
        pl_module.print(f"step {step}: kNN top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                        f"(k={self.k}, {len(self.train)} train / {len(self.val)} val images, {seconds:.1f}s)")
