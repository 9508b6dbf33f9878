"""Masks from the pre-training data: one per sample key (epoch * len + index), each with exactly
int(L * (1 - ratio)) visible patches, and the same batches whatever the number of loader workers."""
from types import SimpleNamespace

import pytest
import torch

from fcmae.data.modules import PretrainData
from fcmae.masking import num_visible


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Runs every test here with one compute thread (tests/conftest.py)."""


def test_masks_differ_across_keys_and_epochs_with_the_exact_visible_count():
    data = PretrainData("demo", input_size=160, mask_ratio=0.6, seed=0)  # 5 x 5 = 25 patches, 10 visible
    views, size = data.dataset, len(data.dataset)
    keys = [0, 1, 2, 3, 4, 5, 100, 1000]
    keys += [k + size for k in keys] + [k + 7 * size for k in keys[:4]]  # the same images in later epochs
    masks = {k: views[k][1] for k in keys}
    for k, m in masks.items():
        assert m.shape == (5, 5) and set(m.unique().tolist()) == {0.0, 1.0}
        assert int((m == 0).sum()) == num_visible(25, 0.6) == 10, k
    distinct = {tuple(m.flatten().tolist()) for m in masks.values()}
    assert len(distinct) == len(keys)  # C(25, 10) = 3.3M possible masks: no two keys share one
    assert torch.equal(views[1000][1], views[1000][1])  # and a key always gives its own


def first_batches(workers, n=2):
    data = PretrainData("demo", input_size=64, mask_ratio=0.6, batch_size=4, workers=workers, seed=3)
    # What train_dataloader reads from the Trainer: one device, at the start of a run.
    data.trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0, current_epoch=0,
                                   accumulate_grad_batches=1)
    loader = data.train_dataloader()
    batches, it = [], iter(loader)
    for _ in range(n):  # with 2 workers, batch 0 comes from one and batch 1 from the other
        batches.append(next(it))
    del it, loader
    return batches


def test_a_batch_is_the_same_with_0_and_2_loader_workers():
    alone, workers = first_batches(0), first_batches(2)
    for (views, masks, skipped), (views2, masks2, skipped2) in zip(alone, workers):
        assert views.shape == (4, 3, 64, 64) and masks.shape == (4, 2, 2)
        assert torch.equal(views, views2) and torch.equal(masks, masks2) and torch.equal(skipped, skipped2)
    masks = torch.cat([b[1] for b in alone]).flatten(1)  # (8, 4): 1 visible of 4 patches each
    assert (masks.sum(1) == 3).all()
    assert len({tuple(m.tolist()) for m in masks}) > 1  # not one mask for every sample


def test_views_travel_as_bytes_and_normalize_on_the_device_to_the_old_numbers():
    """A batch leaves the loader uint8 (a quarter of float32's bytes) and PretrainData's
    on_after_batch_transfer normalizes it to what the loader made per view before (float32
    (x / 255 - mean) / std in the worker): equal within 1e-6."""
    from torch.utils.data import default_collate

    from fcmae.data.transforms import ToFloat
    from fcmae.data.views import MaskedView, MaskedViews
    data = PretrainData("demo", input_size=64, mask_ratio=0.6, batch_size=4, seed=3)
    data.trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0, current_epoch=0,
                                   accumulate_grad_batches=1)
    loader = data.train_dataloader()
    views, masks, skipped = next(iter(loader))
    assert views.dtype == torch.uint8
    normalized = data.on_after_batch_transfer(MaskedView(views, masks, skipped), 0).view
    assert normalized.dtype == torch.float32
    # the loader as it was: each view normalized in the worker, the same keys and seeds
    old = MaskedViews(data.dataset.source, torch.nn.Sequential(data.dataset.transform, ToFloat(data.norm)), 64, 0.6,
                      seed=3)
    before = default_collate([old[k] for k in list(loader.sampler)[:4]])
    assert torch.equal(masks, before[1])
    assert (normalized - before[0]).abs().max() <= 1e-6 and before[0].abs().max() > 1  # normalized, not in [0, 1]
