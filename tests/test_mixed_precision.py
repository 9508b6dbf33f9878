"""Every backend runs under bf16 and fp16 autocast and agrees with the dense reference there and
in float32 (forward and parameter gradients), at 64 px and at 224 px (long per-sample sums);
`fcmae pretrain --precision bf16-mixed` trains with each backend. On CPU: MinkowskiEngine here
is CPU-only, and CPU autocast takes both types."""
import math

import pytest
import torch

from fcmae.encoders import SparseConvNeXtV2
from fcmae.encoders.grn import grouped_grn
from fcmae.encoders.rows import stage_rows
from fcmae.masking import num_visible, random_mask
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


# 224 px: long per-sample sums. Stage 0 of a 224 px image at mask ratio 0.6 has 1,216 visible
# rows per sample, and GRN's statistics sum that many squares: they are taken in float32 whatever
# the activations' type (a bf16 running sum, as CUDA's atomic index_add_ makes, stops growing past
# ~256 equal terms). Tiny custom dims, batch 2, so it stays fast.
SMALL_224 = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}
# Gradients at 224 px sum 4x the positions of the 64 px test, with both signs: the LayerNorm
# weights' gradients (the largest errors, the dense reference's own too) measured up to 32u in
# bf16 and 39u in fp16 against float32. Outputs (up to 1.6u) and GRN's gradients (up to 7u) keep
# the 64 px tolerances.
GRAD_TOL_224 = {torch.bfloat16: 60 * 2 ** -8, torch.float16: 60 * 2 ** -11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_224px_under_autocast_matches_float32(backend, dtype):
    if backend == "minkowski":
        minkowski()
    torch.manual_seed(0)
    encoder = randomize_(SparseConvNeXtV2(SMALL_224, backend="dense"))
    imgs = torch.randn(2, 3, 224, 224)
    mask = random_mask(2, 7, 7, 0.6, generator=torch.Generator().manual_seed(0))
    assert num_visible(49, 0.6) * 64 == 1216  # visible stage-0 rows per sample
    fp32_out, fp32_grads = run(encoder, "dense", imgs, mask, None)
    out, grads = run(encoder, backend, imgs, mask, dtype)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert_close(out, fp32_out, fwd_tol, "output vs dense fp32")
    for name, g in fp32_grads.items():
        tol = grad_tol if ".grn." in name else GRAD_TOL_224[dtype]
        assert_close(grads[name], g, tol, f"gradient of {name} vs dense fp32")


def test_grn_statistics_are_float32_sums():
    """bf16 rows in, float32 statistics out, equal to the float64 sums of the same numbers."""
    torch.manual_seed(0)
    rows = (torch.rand(2 * 1216, 8) + 1).bfloat16()  # 1,216 rows per sample, all positive
    mask = random_mask(2, 7, 7, 0.6, generator=torch.Generator().manual_seed(0))
    counted = stage_rows(mask)[0]  # per_sample_norm: the general path (index_add_)
    exact = rows.double().view(2, 1216, 8).square().sum(1).sqrt()
    norm = counted.per_sample_norm(rows)
    assert norm.dtype == torch.float32
    assert ((norm.double() - exact).abs() / exact).max() < 1e-4  # float32: ~4e-6; a bf16 sum or result: ~2^-9
    x = torch.nn.functional.gelu(torch.randn(2, 1216, 8)).bfloat16()
    out = grouped_grn(x, torch.ones(8), torch.zeros(8))  # gamma = 1: out = x * (1 + G / mean G)
    x = x.double()
    g = x.square().sum(1, keepdim=True).sqrt()
    expected = x * (1 + g / (g.mean(-1, keepdim=True) + 1e-6))
    assert out.dtype == torch.bfloat16
    # bf16 roundings only (the scale, the result: 2 x 2^-9), no error from the sums
    assert ((out.double() - expected).abs() / expected.abs().max()).max() <= 2 ** -8
