"""Every backend runs under bf16 and fp16 autocast and agrees with the dense reference there and
in float32 (forward and parameter gradients); `fcmae pretrain --precision bf16-mixed` trains with
each backend. On CPU: MinkowskiEngine here is CPU-only, and CPU autocast takes both types."""
import math

import pytest
import torch

from fcmae.encoders import SparseConvNeXtV2
from fcmae.masking import random_mask
from helpers import MIXED_PRECISION_TOLERANCES as TOLERANCES, TINY, minkowski, randomize_

BACKENDS = ["dense", "sparse", pytest.param("minkowski", marks=pytest.mark.minkowski)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Runs every test here with one compute thread (tests/conftest.py)."""


def run(encoder, backend, imgs, mask, dtype):
    """Output (as float32) and every parameter's gradient for a fixed random projection of the
    output, under autocast to `dtype` (None: float32)."""
    encoder.backend = backend
    encoder.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = encoder(imgs, mask)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * weights).sum().backward()
    return out.detach().float(), {name: p.grad.clone() for name, p in encoder.named_parameters()}


def assert_close(actual, expected, tol, what):
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zero"
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    diff = (actual - expected).abs().max().item()
    assert diff <= tol * scale, f"{what}: max |diff| {diff:.3g} > {tol:.3g} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_under_autocast_matches_dense(backend, dtype):
    if backend == "minkowski":
        minkowski()
    torch.manual_seed(0)
    encoder = randomize_(SparseConvNeXtV2(TINY, backend="dense"))
    imgs = torch.randn(3, 3, 64, 96)
    mask = random_mask(3, 2, 3, 0.5, generator=torch.Generator().manual_seed(0))
    fp32_out, fp32_grads = run(encoder, "dense", imgs, mask, None)
    amp_out, amp_grads = run(encoder, "dense", imgs, mask, dtype)
    out, grads = run(encoder, backend, imgs, mask, dtype)

    assert (out.abs().sum(1)[mask.bool()] == 0).all(), "masked positions must stay empty"
    fwd_tol, grad_tol = TOLERANCES[dtype]
    for ref_out, ref_grads, ref in [(amp_out, amp_grads, "dense under autocast"), (fp32_out, fp32_grads, "dense fp32")]:
        assert_close(out, ref_out, fwd_tol, f"output vs {ref}")
        for name, g in ref_grads.items():
            assert grads[name].dtype == torch.float32, f"gradient of {name} is {grads[name].dtype}"
            assert_close(grads[name], g, grad_tol, f"gradient of {name} vs {ref}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pretrain_bf16_mixed_two_steps(backend, tmp_path):
    """`fcmae pretrain --precision bf16-mixed` with each backend: two optimizer steps, a finite
    loss, finite weights and a written last.ckpt."""
    if backend == "minkowski":
        minkowski()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fcmae.cli import main

    out = tmp_path / "run"
    main(["pretrain", "--model", "atto", "--data", "demo", "--input-size", "64", "--batch-size", "4",
          "--decoder-dim", "32", "--max-steps", "2", "--workers", "0", "--no-export", "--accelerator", "cpu",
          "--devices", "1", "--precision", "bf16-mixed", "--backend", backend, "--log-every", "1",
          "--output", str(out)])
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    acc = EventAccumulator(str(out / "tensorboard")).Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), losses
