"""Short real `fcmae pretrain` runs (slow): the exported encoder is the run's encoder in timm, and
a run resumed with loader workers ends where a straight one does."""
import pytest
import timm
import torch
from helpers import PRETRAIN_TINY as TINY, parse_pretrain as parse, weights
from safetensors.torch import load_file
from timm.models.convnext import checkpoint_filter_fn

from fcmae.commands.pretrain import fit
from fcmae.encoders import ConvNeXtV2
from fcmae.encoders.convert import to_dense_encoder
from fcmae.module import PretrainModule

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Runs every test here with one compute thread (tests/conftest.py)."""


def test_exported_encoder_of_a_real_run_is_the_runs_encoder_in_timm(tmp_path):
    out = tmp_path / "run"
    trainer, module = fit(parse(*TINY, "--model", "atto", "--batch-size", "8", "--max-steps", "3", "--epochs", "1",
                                "--lr", "1e-3", "--warmup-epochs", "0", "--output", str(out), "--export"))
    assert trainer.global_step == 3
    exported = load_file(out / "encoder.safetensors")
    timm_model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0)
    result = timm_model.load_state_dict(checkpoint_filter_fn(exported, timm_model), strict=False)
    # num_classes=0 keeps the head's norm: the only weights the encoder does not have.
    assert set(result.missing_keys) == {"head.norm.weight", "head.norm.bias"} and not result.unexpected_keys
    # The run's own encoder, two ways: dense from its last.ckpt, and the module itself with nothing masked.
    dense = ConvNeXtV2("atto", num_classes=0)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    missing = dense.load_state_dict(to_dense_encoder(ckpt["state_dict"]), strict=False).missing_keys
    assert set(missing) == {"norm.weight", "norm.bias"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = timm_model.eval().forward_features(x)  # (2, 320, 2, 2)
        assert features.shape == (2, 320, 2, 2)
        assert torch.allclose(features, dense.eval().forward_features(x), atol=1e-5)
        assert torch.allclose(features, module.model.encoder.eval()(x, torch.zeros(2, 2, 2)), atol=1e-5)
    torch.manual_seed(0)  # the run's seed: the initial weights, which training moved
    init = ConvNeXtV2("atto", num_classes=0).state_dict()
    assert (exported["stages.0.0.pwconv1.weight"] - init["stages.0.0.pwconv1.weight"]).abs().max() > 1e-5


def test_resume_with_two_loader_workers_matches_a_straight_run(tmp_path):
    """As test_pretrain.py's exact-resume test, with the views and masks made in 2 loader workers."""
    args = [*TINY, "--workers", "2", "--lr", "1e-3", "--warmup-epochs", "0.01", "--epochs", "4"]  # warmup: 2 steps
    _, straight = fit(parse(*args, "--max-steps", "4", "--output", str(tmp_path / "a")))
    for stop in (2, 4):
        trainer, resumed = fit(parse(*args, "--max-steps", str(stop), "--output", str(tmp_path / "b")))
        assert trainer.global_step == stop
    a, b = weights(straight), weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6  # tolerance: float32 round-off
    torch.manual_seed(0)  # the run's seed: the initial weights, which training moved
    init = weights(PretrainModule(**straight.hparams))
    key = "model.encoder.stages.0.0.pwconv1.weight"
    assert (a[key] - init[key]).abs().max() > 1e-4


def test_resume_with_drop_path_matches_a_straight_run(tmp_path):
    """Drop path draws from the training process's torch RNG: its state travels with the
    checkpoint (RandomState), so a resumed run drops the same samples as a straight one."""
    args = [*TINY, "--workers", "0", "--drop-path", "0.3", "--lr", "1e-3", "--warmup-epochs", "0.01", "--epochs", "4"]
    _, straight = fit(parse(*args, "--max-steps", "4", "--output", str(tmp_path / "a")))
    for stop in (2, 4):
        _, resumed = fit(parse(*args, "--max-steps", str(stop), "--output", str(tmp_path / "b")))
    a, b = weights(straight), weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
