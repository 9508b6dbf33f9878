"""GRN as one autograd function over (N, P, C) (encoders/grn.py) equals autograd's composition in
the GRN module: float64 gradcheck, float32 values and gradients (also for channels that are zero
over a sample, where the norm's derivative is taken as 0), bf16 with float32 statistics."""
import pytest
import torch

from fcmae.encoders.grn import GRN, grouped_grn


def composite(x, grn):
    """The reference: the GRN module on (N, P, 1, C) (a (N, H, W, C) map with W = 1)."""
    return grn(x.unsqueeze(2)).squeeze(2)


def random_grn(c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    grn = GRN(c).to(dtype)
    with torch.no_grad():
        grn.gamma.copy_(torch.randn(grn.gamma.shape, generator=g))
        grn.beta.copy_(torch.randn(grn.beta.shape, generator=g))
    return grn


def test_gradcheck_float64():
    torch.manual_seed(0)
    grn = random_grn(5, torch.float64)
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g, b: grouped_grn(x, g, b, grn.eps), (x, grn.gamma, grn.beta))


@pytest.mark.parametrize("zero_channel", [False, True])
def test_matches_the_composition(zero_channel):
    torch.manual_seed(0)
    grn = random_grn(16)
    x = torch.nn.functional.gelu(torch.randn(3, 50, 16) * 2)
    if zero_channel:
        x[1, :, 3] = 0  # a zero norm for sample 1, channel 3
    weights = torch.randn(x.shape)
    results = []
    for fn in (grn.grouped, lambda t: composite(t, grn)):
        grn.zero_grad()
        t = x.clone().requires_grad_()
        out = fn(t)
        (out * weights).sum().backward()
        results.append((out.detach(), t.grad, grn.gamma.grad.clone(), grn.beta.grad.clone()))
    for ours, ref, what in zip(*results, ["output", "input gradient", "gamma gradient", "beta gradient"]):
        assert torch.isfinite(ours).all(), what
        diff, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
        assert diff <= 1e-5 * scale, f"{what}: {diff:.3g} > 1e-5 x {scale:.3g}"


def test_bf16_input_float32_statistics():
    """bf16 activations: output in bf16, within bf16 rounding of the float32 result; parameter
    gradients in float32."""
    torch.manual_seed(0)
    grn = random_grn(8)
    x = torch.randn(2, 1200, 8)  # a long per-sample sum (stage 0 at 224 px has ~1,200 rows)
    ref = grn.grouped(x)
    out = grn.grouped(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 4 * 2 ** -8 * ref.abs().max()
    out.float().sum().backward()
    assert grn.gamma.grad.dtype == torch.float32 and torch.isfinite(grn.gamma.grad).all()
