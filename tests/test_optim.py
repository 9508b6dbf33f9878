"""fcmae.optim: the one lr schedule (timm's, per optimizer step) against pre-training's original
formula, its length, and the one weight-decay rule (bench uses it too)."""
import pytest
import torch
from helpers import TINY, warmup_cosine

from fcmae.errors import NonFiniteLoss
from fcmae.optim import cosine_schedule, no_weight_decay, param_groups, schedule_steps


@pytest.mark.parametrize("warmup, total, min_lr", [(5, 20, 0.0), (5, 20, 1e-4), (0, 7, 1e-5), (3, 3, 0.0)])
def test_the_schedule_is_the_original_warmup_cosine(warmup, total, min_lr):
    lr = 2e-3
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [w], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.5}], lr=lr)
    scheduler = cosine_schedule(optimizer, total, warmup, min_lr)
    for step in range(total + 4):  # past the end: stays at min_lr
        scheduler.step_update(num_updates=step)
        expected = lr * warmup_cosine(step, warmup, total, min_lr / lr)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), step
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * expected, rel=1e-12, abs=1e-15), step


def test_schedule_length_spans_the_epochs():
    # 42 batches per rank, accumulate 5: the last step accumulates 2 batches -> 9 steps per epoch
    assert schedule_steps(42, 5, 3, 0.5) == (9, 27, 4)  # round(4.5) = 4 (banker's rounding, as before)
    assert schedule_steps(128, 1, 8, 1) == (128, 1024, 128)


def test_weight_decay_rule_is_decided_on_names_of_the_unwrapped_model():
    from fcmae.model import FCMAE
    model = FCMAE(TINY, img_size=64, decoder_dim=16)
    skip = no_weight_decay(model)
    groups = param_groups(model, 0.05, skip)
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1 and not name.endswith(("grn.gamma", "grn.beta"))), name
    # FSDP (use_orig_params) flattens parameters to 1-D and prefixes their names: the same split
    # from the names decided before wrapping.
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.params = dict(model.named_parameters())

        def named_parameters(self):
            for name, p in self.params.items():
                yield "_fsdp_wrapped_module." + name, torch.nn.Parameter(p.detach().flatten())
    flat = param_groups(Flat(), 0.05, skip)
    assert [len(g["params"]) for g in flat] == [len(g["params"]) for g in groups]
    assert [g["weight_decay"] for g in flat] == [g["weight_decay"] for g in groups]


def test_non_finite_loss_is_one_line_with_or_without_a_checkpoint():
    e = NonFiniteLoss("loss", float("nan"), 5, 1e-3)
    assert str(e) == ("non-finite loss (nan) at step 5: training stopped; no checkpoint was saved before it. "
                      "Rerun the same command with a lower lr to resume from it, e.g. --lr 0.0005 (half of 0.001)")
    e.checkpoint = ("run/checkpoints/last.ckpt", 4)
    assert "the last good checkpoint is run/checkpoints/last.ckpt (step 4)." in str(e)


def mmcv_poly(step, warmup_steps, total_steps, power, min_ratio=0.0):
    """The reference lr multiplier of the segmentation recipe, written out: linear from 0 over the
    warmup, then (1 - step / total) ** power of the whole schedule (mmcv's poly counts from 0)."""
    if step < warmup_steps:
        return step / warmup_steps
    return min_ratio + (1 - min_ratio) * (1 - min(step, total_steps) / total_steps) ** power


@pytest.mark.parametrize("warmup, total, power, min_lr", [(5, 20, 1.0, 0.0), (3, 12, 0.9, 1e-5), (0, 7, 1.0, 0.0)])
def test_poly_schedule_is_the_warmup_then_polynomial_decay(warmup, total, power, min_lr):
    from fcmae.optim import poly_schedule
    lr = 1e-4
    w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [w], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.9 ** 3}], lr=lr)
    scheduler = poly_schedule(optimizer, total, warmup, power, min_lr)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr * mmcv_poly(0, warmup, total, power, min_lr / lr))
    for step in range(total + 3):  # past the end: stays at min_lr
        scheduler.step_update(num_updates=step)
        expected = lr * mmcv_poly(step, warmup, total, power, min_lr / lr)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), step
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.9 ** 3 * expected, rel=1e-12, abs=1e-15), step
