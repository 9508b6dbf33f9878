"""No host-device sync in the model's forward and backward (sparse and dense backends) when the
visible count per sample is known: counted on CPU as the profiler events of the ops that block a
CUDA host (`fcmae.profiling.SYNC_OPS`: nonzero, reading a tensor into Python)."""
import pytest
import torch

from fcmae.masking import num_visible, random_mask
from fcmae.model import FCMAE
from fcmae.profiling import count_syncs
from helpers import TINY, randomize_


def step(model, imgs, mask=None, visible_per_sample=None):
    loss, _, _ = model(imgs, mask, visible_per_sample)
    loss.backward()


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_forward_backward_make_no_sync(backend):
    torch.manual_seed(0)
    model = randomize_(FCMAE(TINY, backend, img_size=64, decoder_dim=16, drop_path_rate=0.1))
    imgs = torch.randn(2, 3, 64, 64)
    step(model, imgs)  # first call: lazy initialisation outside the count
    assert count_syncs(lambda: step(model, imgs)) == dict.fromkeys(count_syncs(lambda: None), 0)
    mask = random_mask(2, 2, 2, 0.6)  # as the data pipeline draws it, with the count the caller knows
    assert sum(count_syncs(lambda: step(model, imgs, mask, num_visible(4, 0.6))).values()) == 0


def test_a_mask_without_its_count_is_counted():
    """The general path stays available: the count is read from the mask (a sync) when not given."""
    model = FCMAE(TINY, "sparse", img_size=64, decoder_dim=16)
    imgs = torch.randn(2, 3, 64, 64)
    syncs = count_syncs(lambda: step(model, imgs, random_mask(2, 2, 2, 0.5)))
    assert syncs["aten::nonzero"] == 1
