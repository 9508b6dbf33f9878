"""Host-device syncs of a whole pre-training step through Lightning (fcmae.profiling.StepSyncs),
counted on CPU as the profiler events of the ops that block a CUDA host, on steps that write no
logs. What is allowed, each explained:

- 1: the step's one finite check (fcmae/module.py `stop_unless_finite` on the gradient norm), a
  read of one flag that stops the run before a non-finite update reaches the weights.
- everything else is 0: logging reads tensors only every --log-every steps (no progress-bar
  value, which Lightning reads back at every batch; no Python numbers logged, each a copy to
  the device), images/s is host time, skipped files are summed on the device.

The model's own forward and backward: 0 for dense and sparse (the sparse backend builds its rows
with fixed shapes from the visible count per sample, which the caller knows); only a mask given
without its count is read (one `nonzero`)."""
import pytest
import torch

from fcmae.masking import num_visible, random_mask
from fcmae.model import FCMAE
from fcmae.profiling import SYNC_OPS, StepSyncs, count_syncs
from helpers import PRETRAIN_TINY, TINY, parse_pretrain, randomize_

FINITE_CHECK = 1


def forward_backward(model, imgs, mask=None, visible_per_sample=None):
    loss, _, _ = model(imgs, mask, visible_per_sample)
    loss.backward()


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_the_model_forward_backward_makes_no_sync(backend):
    torch.manual_seed(0)
    model = randomize_(FCMAE(TINY, backend, img_size=64, decoder_dim=16, drop_path_rate=0.1))
    imgs = torch.randn(2, 3, 64, 64)
    forward_backward(model, imgs)  # first call: lazy initialisation outside the count
    none = dict.fromkeys(SYNC_OPS, 0)
    assert count_syncs(lambda: forward_backward(model, imgs)) == none  # the model draws the mask
    mask = random_mask(2, 2, 2, 0.6)  # as the data pipeline draws it, with the count the caller knows
    assert count_syncs(lambda: forward_backward(model, imgs, mask, num_visible(4, 0.6))) == none


def test_a_mask_without_its_count_is_read_once():
    """The general path stays available: the count is read from the mask (one sync) when not given."""
    model = FCMAE(TINY, "sparse", img_size=64, decoder_dim=16)
    imgs = torch.randn(2, 3, 64, 64)
    syncs = count_syncs(lambda: forward_backward(model, imgs, random_mask(2, 2, 2, 0.5)))
    assert syncs["aten::nonzero"] == 1


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_a_training_step_syncs_once_outside_log_steps(backend, tmp_path, monkeypatch, one_thread):
    from fcmae.commands.pretrain import fit
    from fcmae.training.pretrain import PretrainTask

    counter = StepSyncs()
    callbacks = PretrainTask.callbacks
    monkeypatch.setattr(PretrainTask, "callbacks", lambda self, *a: [*callbacks(self, *a), counter])
    fit(parse_pretrain(*PRETRAIN_TINY, "--backend", backend, "--log-every", "4", "--vis-every", "100",
                       "--ckpt-every", "100", "--max-steps", "8", "--output", str(tmp_path)))
    quiet = {step: n for step, n in counter.counts.items() if counter.quiet[step]}
    assert sorted(quiet) == [2, 3, 6, 7]  # log steps 4 and 8 write in the next step's window too
    assert quiet == dict.fromkeys(quiet, FINITE_CHECK), counter.counts
    assert counter.counts[5] > FINITE_CHECK  # step 4's logs are written (read back) in step 5's window
