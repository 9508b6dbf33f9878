"""The data modules of the training tasks: each rank's share of every epoch, served from the
place in it where a resumed run continues, sharded here (the Trainer runs with
use_distributed_sampler=False).

`ResumableSampler` draws a permutation per (seed, epoch) and can start part-way through an epoch;
every item's augmentation is drawn from (seed, key) (fcmae/data/views.py `seeded`), so a resumed
run sees exactly the batches the interrupted run would have seen, whatever the number of loader
workers. `PretrainData` serves pre-training's source (demo, folder, WebDataset shards: those keep
the same promise in fcmae/data/shards.py); `LabelledData` any (train, val) datasets of items,
such as fcmae/data/labelled.py's class folders. Both tell the lr schedule their length
(`batches_per_epoch`) without building a loader.
"""
import math
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fcmae.data.filelist import default_cache
from fcmae.data.shards import EpochLoader, is_shards, need_shards, open_shards
from fcmae.data.sources import find_source
from fcmae.data.transforms import ToFloat, normalization, pretrain_transform
from fcmae.data.views import MaskedViews, seeded
from fcmae.errors import SettingError
from fcmae.masking import PATCH_SIZE, check_input_size, check_mask_ratio
from fcmae.preemption import worker_init


class CountingViews(Dataset):
    """The training loader's items: (view, mask, files skipped). The count travels with the
    batch, so it reaches the training process from any loader worker (`SkippedFiles` sums it)."""

    def __init__(self, views):
        self.views = views

    def __len__(self):
        return len(self.views)

    def __getitem__(self, key):
        return self.views.item(key)


class ResumableSampler(Sampler):
    """This rank's share of a permutation drawn from (seed, epoch), like DistributedSampler
    (the tail that does not divide evenly is dropped), yielding sample keys. `skip` makes the
    next pass start part-way through the epoch: a resumed run continues where it stopped."""

    def __init__(self, size, num_replicas=1, rank=0, seed=0):
        self.size, self.num_replicas, self.rank, self.seed = size, num_replicas, rank, seed
        self.num_samples = size // num_replicas
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch):  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.num_samples * self.num_replicas]
        mine = order[self.rank::self.num_replicas][self.skip:]
        self.skip = 0
        return iter((self.epoch * self.size + mine).tolist())


def resume_position(trainer, batches_per_epoch):
    """(epoch, batches of it already trained on) for the loader Lightning builds once at the
    start of fit: (0, 0) for a new run, later for a resumed one. Checkpoints are written after
    an optimizer step, so the step count says where the run stopped. Exact when batch size,
    devices and accumulation are those of the interrupted run."""
    accumulate = trainer.accumulate_grad_batches
    steps_done = trainer.global_step - trainer.current_epoch * math.ceil(batches_per_epoch / accumulate)
    batches_done = min(max(steps_done, 0) * accumulate, batches_per_epoch)
    if batches_done == batches_per_epoch:
        # Saved at the epoch's last batch: Lightning goes on with the next epoch, on this loader.
        return trainer.current_epoch + 1, 0
    return trainer.current_epoch, batches_done


class PretrainData(L.LightningDataModule):
    """Finds and checks the data at construction (before any heavy work), then serves each
    rank its shard of every epoch; after a resume, the rest of the interrupted epoch."""

    def __init__(self, data="demo", input_size=224, in_chans=3, mask_ratio=0.6, batch_size=64,
                 workers=8, seed=0, pin_memory=False, strict=False, samples_per_epoch=None, shuffle_buffer=1000):
        super().__init__()
        check_input_size(input_size)
        check_mask_ratio(mask_ratio, (input_size // PATCH_SIZE) ** 2, image=f"a {input_size}px crop")
        self.batch_size, self.workers, self.seed, self.pin_memory = batch_size, workers, seed, pin_memory
        self.sampler = None
        self.shards = data != "demo" and is_shards(data)
        if self.shards:  # WebDataset shards (fcmae/data/shards.py)
            self.dataset, arrays = open_shards(data, in_chans, samples_per_epoch, pretrain_transform(input_size),
                                               input_size, mask_ratio, seed, batch_size, shuffle_buffer, strict)
            self.norm = normalization(in_chans, arrays)
            self.to_float = ToFloat(self.norm)
            self.epoch_samples = self.dataset.samples
            return
        if samples_per_epoch is not None:
            raise SettingError("`samples_per_epoch` is for shards (a folder's epoch is all its files): drop it, "
                               "or point `data` at shards")
        # The listing is cached (fcmae.data.filelist): millions of files are listed once, not every start.
        source, arrays = find_source(data, in_chans, input_size, strict, cache=default_cache())
        self.norm = normalization(in_chans, arrays)  # also for un-normalizing reconstructions
        self.to_float = ToFloat(self.norm)
        self.dataset = MaskedViews(source, pretrain_transform(input_size), input_size, mask_ratio, seed)
        self.epoch_samples = len(self.dataset)

    def batches_per_epoch(self, world_size):
        """Full batches one rank gets per epoch (drop_last)."""
        return self.epoch_samples // world_size // self.batch_size

    def on_after_batch_transfer(self, batch, dataloader_idx):
        """The batch on the device, its views (uint8 for images) to float and normalized there."""
        return batch._replace(view=self.to_float(batch.view))

    def train_dataloader(self):
        trainer = self.trainer
        if self.shards:
            return self.shard_loader(trainer)
        self.sampler = ResumableSampler(len(self.dataset), trainer.world_size, trainer.global_rank, self.seed)
        epoch, batches_done = self.position(trainer)
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches_done * self.batch_size
        return DataLoader(CountingViews(self.dataset), batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                          num_workers=self.workers, pin_memory=self.pin_memory,
                          persistent_workers=self.workers > 0, worker_init_fn=worker_init,
                          # its own generator for the workers' seeds: the global one, which drop path
                          # draws from, travels with the checkpoint (RandomState) and must not move here
                          generator=torch.Generator().manual_seed(self.seed))

    def position(self, trainer):
        """(epoch, batches of it already trained on) where this run starts (`resume_position`)."""
        return resume_position(trainer, self.batches_per_epoch(trainer.world_size))

    def shard_loader(self, trainer):
        refusal = need_shards(len(self.dataset.urls), trainer.world_size, self.workers)
        if refusal:
            raise SettingError(refusal)
        self.dataset.place(trainer.global_rank, trainer.world_size)
        return EpochLoader(self.dataset, lambda: trainer.current_epoch, self.position(trainer),
                           batch_size=self.batch_size, drop_last=True, num_workers=self.workers,
                           pin_memory=self.pin_memory, worker_init_fn=worker_init)

    def preview_keys(self, n=8):
        """n sample keys spread evenly over the dataset: files are listed class by class, so the
        first n would all come from the first class."""
        size = len(self.dataset)
        return [i * size // n for i in range(n)] if n < size else list(range(size))

    def preview(self, n=8):
        """A fixed batch (same views and masks every call) for reconstructions, normalized as
        training batches are: `preview_keys` for folders, the first n samples of the first shard
        for shards."""
        if self.shards:
            views, masks = self.dataset.preview(n)
        else:
            views, masks = (torch.stack(t) for t in zip(*(self.dataset[k] for k in self.preview_keys(n))))
        return self.to_float(views), masks


# ----------------------------------------------------------------------------- labelled data

def loader(dataset, batch_size, workers, train, sampler=None, generator=None):
    # Full batches in training: Mixup/CutMix pair samples within a batch and needs it even.
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0, generator=generator,
                      worker_init_fn=worker_init)  # a scheduler's signal stops the run, not its workers


class SeededItems(Dataset):
    """Key `epoch * len(dataset) + index` -> dataset[index], its augmentation drawn from RNGs
    seeded by (seed, key) (`fcmae.data.views.seeded`): the same crop, flip, RandAugment and erasing
    for that image in that epoch in any process, so neither a resume nor the number of loader
    workers changes them."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        with seeded(self.seed * 1_000_003 + key):
            return self.dataset[key % len(self.dataset)]


class LabelledData(L.LightningDataModule):
    """The fine-tuning loaders, sharded per rank here (the Trainer needs
    use_distributed_sampler=False). Training: each rank's share of a permutation per (seed,
    epoch) (`ResumableSampler`, as pre-training's) in full batches, items from `SeededItems`; a
    resumed run starts where the interrupted one stopped, inside its epoch, and sees the batches
    it would have seen. Validation: in order, each rank a share (padded to equal length)."""

    def __init__(self, train, val, batch_size, workers, seed=0):
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.workers, self.seed = batch_size, workers, seed

    def batches_per_epoch(self, world_size):
        """Full training batches one rank gets per epoch (drop_last)."""
        return len(self.train) // world_size // self.batch_size

    def train_dataloader(self):
        trainer = self.trainer
        sampler = ResumableSampler(len(self.train), trainer.world_size, trainer.global_rank, self.seed)
        epoch, batches_done = resume_position(trainer, self.batches_per_epoch(trainer.world_size))
        sampler.set_epoch(epoch)
        sampler.skip = batches_done * self.batch_size
        # It resumes inside the epoch itself; Lightning cannot see that and would warn.
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
        return loader(SeededItems(self.train, self.seed), self.batch_size, self.workers, train=True,
                      sampler=sampler, generator=self.generator())

    def val_dataloader(self):
        if self.val is None:  # --val-split 0: train on everything, no validation
            return []
        trainer = self.trainer
        sampler = None
        if trainer.world_size > 1:
            sampler = DistributedSampler(self.val, trainer.world_size, trainer.global_rank, shuffle=False)
        return loader(self.val, self.batch_size, self.workers, train=False, sampler=sampler, generator=self.generator())

    def generator(self):
        """A loader's own generator: each new iterator draws its workers' seed from it, not from
        the global RNG whose state the checkpoint keeps (FinetuneModule). With persistent workers
        a resumed run makes its iterators at other points than an uninterrupted one."""
        return torch.Generator().manual_seed(self.seed)
