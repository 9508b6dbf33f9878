"""Pre-training items: a sample's augmented view and its FCMAE mask, both drawn from (seed, key).

Every sample is addressed by a key `epoch * len(source) + index`; its augmentation and mask are
drawn from generators seeded by (seed, key) (`seeded`), so a resumed run sees exactly the views
and masks the interrupted run would have seen, whatever the number of loader workers
(fcmae/data/modules.py serves the keys in that order).
"""
import random
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from fcmae.masking import PATCH_SIZE, random_mask


class MaskedView(NamedTuple):
    """A pre-training item, and (collated) a batch of them."""
    view: torch.Tensor  # (C, S, S), uint8 for images (normalized on the device), float for arrays; batch (N, C, S, S)
    mask: torch.Tensor  # (S/32, S/32), 1 = masked; batch (N, S/32, S/32)
    skipped: int  # files skipped to find a readable sample; batch (N,)


class MaskedViews(Dataset):
    """key -> (view (C, S, S), mask (S/32, S/32) with 1 = masked), both drawn from (seed, key);
    `item(key)`: the whole `MaskedView`, with the files skipped to find a readable sample (the
    training loader's items)."""

    def __init__(self, source, transform, input_size, mask_ratio, seed):
        self.source, self.transform, self.seed = source, transform, seed
        self.grid, self.mask_ratio = input_size // PATCH_SIZE, mask_ratio

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        return self.item(key)[:2]

    def item(self, key):
        sample, skipped = self.source[key % len(self.source)]
        view, mask = augment(self.transform, sample, self.grid, self.mask_ratio, self.seed * 1_000_003 + key)
        return MaskedView(view, mask, skipped)


def augment(transform, sample, grid, mask_ratio, seed):
    """(view, mask) of one sample, both drawn from RNGs seeded with `seed` (`seeded`):
    reproducible whichever process draws them."""
    with seeded(seed):
        view = transform(sample)
        mask = random_mask(1, grid, grid, mask_ratio)[0]
    return view, mask


@contextmanager
def seeded(seed):
    """Seed the global RNGs a transform may draw from (torch's CPU generator, numpy's, Python's
    `random`: timm's draw from all three) with `seed`, and give the caller's states back after,
    so that with 0 loader workers the training process's own random stream is untouched."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed would also seed every CUDA device, at a cost
        # (docs/internals.md, "Seeding each view").
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
