"""The FCMAE loss by hand: per-patch MSE against raw or per-patch normalized pixels, averaged over
the masked patches only, and FCMAE.forward honouring its norm_pix_loss flag."""
import pytest
import torch

from fcmae import FCMAE
from fcmae.loss import masked_patch_loss
from fcmae.masking import patchify
from helpers import randomize_

SMALL = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}
SIGN = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # one patch's pixels (D = 4): mean 0, unbiased var 4/3


def test_raw_pixel_loss_averages_the_masked_patches_only():
    # N = 2 samples of L = 3 patches; patch (n, l) is off by a constant e everywhere -> error e^2.
    errors = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (N, L)
    target = torch.randn(2, 3, 4)
    pred = target + errors.unsqueeze(-1)
    mask = torch.tensor([[1.0, 0, 1], [0, 0, 1]])  # k = 3 of 6 patches masked
    expected = (1 + 9 + 36) / 3  # mean of e^2 over the masked patches; all six would give 91 / 6
    assert masked_patch_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(expected)
    # Errors on visible patches count for nothing.
    visible_noise = torch.randn(2, 3, 4) * (1 - mask).unsqueeze(-1) * 100
    assert masked_patch_loss(pred + visible_noise, target, mask, False).item() == pytest.approx(expected)


def test_norm_pix_loss_compares_with_per_patch_normalized_pixels():
    # Patch (n, l) = a + b * SIGN: normalized it is SIGN * sqrt(3) / 2 whatever a and b (b large
    # enough that eps does not matter). Predicting c * SIGN leaves (c - sqrt(3)/2)^2 per pixel.
    a = torch.tensor([[5.0, -3.0], [0.5, 100.0]])  # (N, L) per-patch means
    b = torch.tensor([[2.0, 7.0], [3.0, 50.0]])  # per-patch scales
    c = torch.tensor([[0.0, 1.0], [2.0, -1.0]])  # what the prediction says
    target = a.unsqueeze(-1) + b.unsqueeze(-1) * SIGN  # (N, L, 4)
    pred = c.unsqueeze(-1) * SIGN
    mask = torch.tensor([[1.0, 1], [0, 1]])  # 3 of 4 masked
    per_patch = (c - 3 ** 0.5 / 2) ** 2
    expected = (per_patch * mask).sum() / 3
    assert masked_patch_loss(pred, target, mask, norm_pix_loss=True).item() == pytest.approx(expected.item(), rel=1e-5)
    # Off, the same prediction is compared with the raw pixels: a very different number.
    raw = ((c - b) ** 2 + a ** 2)  # per pixel (c s - a - b s)^2 averaged over s = +-1
    expected_raw = (raw * mask).sum() / 3
    assert masked_patch_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(expected_raw.item())
    assert abs(expected_raw - expected) > 100


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_fcmae_forward_uses_its_norm_pix_loss_flag(norm_pix_loss):
    torch.manual_seed(0)
    model = randomize_(FCMAE(SMALL, img_size=64, decoder_dim=16, norm_pix_loss=norm_pix_loss)).eval()
    # Patches far from zero mean and unit variance: raw and normalized targets differ a lot.
    imgs = 3 * torch.randn(2, 3, 64, 64) + 5
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])  # (N, L), L = 2 x 2
    with torch.no_grad():
        loss, pred, out_mask = model(imgs, mask)
    assert torch.equal(out_mask, mask)
    target = patchify(imgs)  # (N, L, 32*32*3)
    if norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(-1)  # (N, L)
    expected = per_patch[mask.bool()].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The flag matters: the loss of the other setting is far off.
    other = masked_patch_loss(pred, patchify(imgs), mask, norm_pix_loss=not norm_pix_loss)
    assert abs(other.item() - loss.item()) > 0.5 * loss.item()
