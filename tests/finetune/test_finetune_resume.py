"""`fcmae finetune` resumed: N steps, then the same command with 2N, against 2N straight,
compared on the weights (tests/test_finetune_run.py checks only the step count)."""
import pytest
from helpers import finetune_small as finetune, shapes_dataset

pytestmark = pytest.mark.slow

# Crop + flip only, no drop path: what is left to differ is the resume itself.
PLAIN = ["--epochs", "4", "--lr", "4e-3", "--warmup-epochs", "1", "--ema-decay", "0.9", "--aa", "null",
         "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--drop-path", "0"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Runs every test here with one compute thread (tests/conftest.py)."""


def test_resume_matches_a_straight_run_on_weights(tmp_path):
    shapes = shapes_dataset(tmp_path / "shapes", per_class=(16, 2))  # 48 train images: 3 steps of 16 per epoch
    run = lambda out, steps: finetune("--data", str(shapes), "--output", str(tmp_path / out), *PLAIN,
                                      "--max-steps", str(steps))["module"]
    straight = run("a", 6)
    first = {k: v.clone() for k, v in run("b", 3).state_dict().items()}
    resumed = run("b", 6)
    assert straight.trainer.global_step == resumed.trainer.global_step == 6
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("model_ema.") for k in a)  # the EMA is compared too
    key = "model.stages.0.0.pwconv1.weight"
    assert (a[key] - first[key]).abs().max() > 1e-4  # steps N+1..2N move the weights: the check can fail
    floats = [k for k in a if a[k].is_floating_point()]
    assert max((a[k] - b[k]).abs().max().item() for k in floats) <= 1e-6  # tolerance: float32 round-off


def test_resume_inside_an_epoch_with_every_augmentation_and_two_workers(tmp_path):
    """Stopped after 2 of an epoch's 3 steps, with RandAugment, random erasing, Mixup/CutMix and drop
    path (Python, numpy and torch RNGs, in the loader workers and the training process)."""
    shapes = shapes_dataset(tmp_path / "shapes", per_class=(16, 2))
    full = ["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
            "--drop-path", "0.1", "--workers", "2"]
    run = lambda out, steps: finetune("--data", str(shapes), "--output", str(tmp_path / out), *PLAIN, *full,
                                      "--max-steps", str(steps))
    straight = run("a", 5)
    run("b", 2)
    resumed = run("b", 5)
    assert resumed["module"].trainer.global_step == 5
    a, b = straight["module"].state_dict(), resumed["module"].state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point()) <= 1e-6
    assert resumed["history"][-1] == straight["history"][-1]  # epoch 1's validation, same epoch number
