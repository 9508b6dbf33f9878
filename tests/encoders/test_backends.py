"""The three sparse-encoder backends compute the same function: outputs and gradients agree."""
import pytest
import torch
from helpers import TINY, minkowski, randomize_

from fcmae.encoders import ConvNeXtV2, SparseConvNeXtV2
from fcmae.masking import random_mask, upsample_mask

TOL = 1e-4  # absolute, scaled by the reference's magnitude when that exceeds 1 (fp32)
SIZES = {"atto": "atto", "tiny-custom": TINY}


def make_mask(kind, n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "ratio-0":
        return torch.zeros(n, h, w)
    if kind == "ratio-0.6":
        return random_mask(n, h, w, 0.6, generator=g)
    if kind == "one-visible":
        return random_mask(n, h, w, 1 - 1 / (h * w) - 1e-9, generator=g)
    # unequal visible counts per sample: sample i keeps i+1 patches
    mask = torch.ones(n, h * w)
    for i in range(n):
        mask[i, torch.randperm(h * w, generator=g)[: min(i + 1, h * w)]] = 0
    return mask.view(n, h, w)


def run(encoder, backend, imgs, mask):
    """Output and the gradients of input and every parameter for a fixed random projection."""
    encoder.backend = backend
    encoder.zero_grad()
    imgs = imgs.clone().requires_grad_()
    out = encoder(imgs, mask)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    return out.detach(), imgs.grad, grads


def assert_close(actual, expected, what):
    scale = max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= TOL * scale, f"{what}: max |diff| {diff:.3g} > {TOL * scale:.3g}"


BACKENDS = ["sparse", pytest.param("minkowski", marks=pytest.mark.minkowski)]


# (size, batch, mask, input): batch 1 and >1, square and non-square, every mask kind per size.
CASES = [
    ("atto", 3, "ratio-0.6", (64, 128)),
    ("atto", 1, "one-visible", (64, 64)),
    ("atto", 2, "ratio-0", (96, 64)),
    ("atto", 3, "unequal", (64, 96)),
    ("tiny-custom", 1, "ratio-0.6", (64, 64)),
    ("tiny-custom", 4, "ratio-0.6", (128, 96)),
    ("tiny-custom", 3, "one-visible", (64, 128)),
    ("tiny-custom", 1, "ratio-0", (96, 96)),
    ("tiny-custom", 4, "unequal", (64, 64)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,batch,mask_kind,hw", CASES)
def test_backend_matches_dense_reference(backend, size, batch, mask_kind, hw):
    if backend == "minkowski":
        minkowski()
    torch.manual_seed(0)
    encoder = randomize_(SparseConvNeXtV2(SIZES[size], backend="dense"))
    imgs = torch.randn(batch, 3, *hw)
    mask = make_mask(mask_kind, batch, hw[0] // 32, hw[1] // 32, seed=batch)
    ref_out, ref_in_grad, ref_grads = run(encoder, "dense", imgs, mask)
    out, in_grad, grads = run(encoder, backend, imgs, mask)

    assert out.shape == (batch, encoder.dims[-1], hw[0] // 32, hw[1] // 32)
    assert (out.abs().sum(1)[mask.bool()] == 0).all(), "masked positions must stay empty"
    assert_close(out, ref_out, "output")
    assert_close(in_grad, ref_in_grad, "input gradient")
    for name, g in ref_grads.items():
        assert_close(grads[name], g, f"gradient of {name}")


@pytest.mark.parametrize("backend", ["dense", "sparse", pytest.param("minkowski", marks=pytest.mark.minkowski)])
def test_unmasked_equals_dense_trunk(backend):
    if backend == "minkowski":
        minkowski()
    torch.manual_seed(0)
    encoder = randomize_(SparseConvNeXtV2("atto", backend=backend))
    dense = ConvNeXtV2("atto", num_classes=0)
    missing, unexpected = dense.load_state_dict(encoder.state_dict(), strict=False)
    assert set(missing) == {"norm.weight", "norm.bias"} and not unexpected
    imgs = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert_close(encoder(imgs, torch.zeros(2, 3, 2)), dense.forward_features(imgs), "features")


def test_backends_share_one_parameter_set():
    shapes = {b: {k: v.shape for k, v in SparseConvNeXtV2(TINY, backend="dense").state_dict().items()}
              for b in ["dense", "sparse"]}
    assert shapes["dense"] == shapes["sparse"]
    dense_keys = {k: v.shape for k, v in ConvNeXtV2(TINY, num_classes=5).state_dict().items()}
    assert all(dense_keys[k] == s for k, s in shapes["dense"].items())


def test_grn_is_per_sample():
    """A sample's features must not depend on the other samples of the batch (the release's
    sparse GRN normalizes over the whole batch: docs/method.md)."""
    torch.manual_seed(0)
    encoder = randomize_(SparseConvNeXtV2(TINY, backend="sparse"))
    imgs, mask = torch.randn(3, 3, 64, 64), random_mask(3, 2, 2, 0.5)
    for backend in ["dense", "sparse"]:
        encoder.backend = backend
        with torch.no_grad():
            together = encoder(imgs, mask)
            alone = encoder(imgs[:1], mask[:1])
        assert_close(together[:1], alone, f"{backend}: sample 0 alone vs in a batch")


def test_drop_path_in_sparse_backend_drops_whole_samples():
    torch.manual_seed(0)
    encoder = randomize_(SparseConvNeXtV2(TINY, drop_path_rate=0.9, backend="sparse")).train()
    imgs, mask = torch.randn(4, 3, 64, 64), random_mask(4, 2, 2, 0.5)
    outs = [encoder(imgs, mask) for _ in range(3)]
    assert not torch.allclose(outs[0], outs[1])
    encoder.eval()
    assert torch.equal(encoder(imgs, mask), encoder(imgs, mask))


def test_bad_backend_and_mask_shape():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        SparseConvNeXtV2(TINY, backend="fast")
    with pytest.raises(ValueError, match="expected mask"):
        SparseConvNeXtV2(TINY)(torch.randn(1, 3, 64, 64), torch.zeros(1, 4, 4))


# Per-tensor RELATIVE tolerance: max|a - b| <= RTOL * max|ref| + ATOL. In fp32 (eps 1.2e-7) the
# backends differ only in summation order; the largest relative difference seen on the TINY size
# is ~1e-6 (GRN gamma gradients, which sum over every visible position), so 1e-5 leaves a 10x
# margin, while a zero, halved or sign-flipped tensor is off by a relative 0.5 or more whatever its
# scale (the absolute TOL above lets a zero gradient pass where the reference's largest entry is
# 1e-4). ATOL only keeps an all-zero reference from demanding bit equality.
RTOL, ATOL = 1e-5, 1e-9


def assert_relative(actual, expected, what):
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= RTOL * scale + ATOL, f"{what}: max |diff| {diff:.3g} > {RTOL:g} x max |ref| {scale:.3g}"


def test_relative_tolerance_catches_a_small_zero_gradient():
    ref = torch.full((3,), 1e-4)
    assert_close(torch.zeros(3), ref, "absolute")  # what the absolute tolerance lets through
    with pytest.raises(AssertionError, match="max |diff|"):
        assert_relative(torch.zeros(3), ref, "relative")
    assert_relative(ref * (1 + 1e-6), ref, "round-off")


def backend_or_skip(backend):
    if backend == "minkowski":
        minkowski()


@pytest.mark.parametrize("backend", ["sparse", pytest.param("minkowski", marks=pytest.mark.minkowski)])
@pytest.mark.parametrize("mask_kind", ["ratio-0.6", "unequal"])
def test_backend_matches_dense_per_tensor_relative(backend, mask_kind):
    backend_or_skip(backend)
    torch.manual_seed(0)
    encoder = randomize_(SparseConvNeXtV2(TINY, backend="dense"))
    imgs, mask = torch.randn(3, 3, 96, 128), make_mask(mask_kind, 3, 3, 4, seed=3)
    ref_out, ref_in_grad, ref_grads = run(encoder, "dense", imgs, mask)
    out, in_grad, grads = run(encoder, backend, imgs, mask)
    assert_relative(out, ref_out, "output")
    assert_relative(in_grad, ref_in_grad, "input gradient")
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, f"reference gradient of {name} is zero: the check would be empty"
        assert_relative(grads[name], g, f"gradient of {name}")


@pytest.mark.parametrize("backend", ["dense", "sparse", pytest.param("minkowski", marks=pytest.mark.minkowski)])
def test_masked_pixels_change_nothing(backend):
    """Masked patches are invisible: new pixels there change neither the outputs nor the
    gradients of the parameters or of the visible pixels."""
    backend_or_skip(backend)
    torch.manual_seed(0)
    encoder = randomize_(SparseConvNeXtV2(TINY, backend=backend))
    imgs, mask = torch.randn(3, 3, 96, 128), make_mask("ratio-0.6", 3, 3, 4, seed=3)
    masked_pixels = upsample_mask(mask, 32).unsqueeze(1).bool()  # (N, 1, H, W)
    other = torch.where(masked_pixels, 10 * torch.randn(imgs.shape), imgs)
    assert (other != imgs).sum() > 0.5 * imgs.numel()  # most pixels did change
    out, in_grad, grads = run(encoder, backend, imgs, mask)
    out2, in_grad2, grads2 = run(encoder, backend, other, mask)
    visible = ~masked_pixels.expand_as(imgs)
    assert_relative(out2, out, "output")
    assert_relative(in_grad2[visible], in_grad[visible], "input gradient at visible pixels")
    assert in_grad[visible].abs().max() > 0
    for name, g in grads.items():
        assert_relative(grads2[name], g, f"gradient of {name}")


@pytest.mark.parametrize("backend", ["dense", "sparse", pytest.param("minkowski", marks=pytest.mark.minkowski)])
def test_every_gradient_has_its_parameters_strides(backend):
    """DDP's gradient buckets are laid out like the parameters and it compares strides exactly:
    a gradient with other strides (the depthwise kernels' from channels-last input) draws its
    "Grad strides do not match bucket view strides" warning and an element-wise copy."""
    if backend == "minkowski":
        minkowski()
    from fcmae.model import FCMAE
    torch.manual_seed(0)
    model = FCMAE("atto", backend, 3, 64, 0.6, True, 1, 16, 0.0)
    loss, _, _ = model(torch.randn(2, 3, 64, 64), (torch.rand(2, 2, 2) < 0.6).float())
    loss.backward()
    kernels = [p for n, p in model.named_parameters() if n.endswith("dwconv.weight")]
    assert kernels and all(p.grad is not None for p in kernels)
    assert [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()] == []
