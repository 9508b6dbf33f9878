import pytest
import torch

from fcmae import FCMAE
from fcmae.encoders import ConvNeXtV2, upsample_mask
from fcmae.loss import masked_patch_loss, normalize_patches
from fcmae.masking import patchify, random_mask, unpatchify
from helpers import TINY


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("grid", [(7, 7), (3, 5)])
def test_exact_visible_count(ratio, grid):
    mask = random_mask(8, *grid, ratio)
    assert mask.shape == (8, *grid)
    visible = (mask == 0).flatten(1).sum(1)
    assert (visible == int(grid[0] * grid[1] * (1 - ratio))).all()
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_masks_differ_per_sample():
    mask = random_mask(16, 7, 7, 0.6)
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1


def test_ratio_leaving_nothing_visible_is_refused():
    with pytest.raises(ValueError, match="no visible patch"):
        random_mask(1, 2, 2, 0.9)


def test_upsampled_mask_is_aligned_with_the_stem():
    """A masked 32x32 image patch covers exactly an 8x8 block at stage 1, 4x4 at stage 2, ..."""
    mask = torch.zeros(1, 2, 3)
    mask[0, 1, 2] = 1
    for stage, stride in enumerate([4, 8, 16, 32]):
        m = upsample_mask(mask, 32 // stride)[0]
        block = 32 // stride
        assert m.shape == (2 * block, 3 * block)
        assert m.sum() == block * block
        assert m[block:, 2 * block:].all()
    # and that block is exactly what the stem's 4x4 stride-4 conv sees of the masked patch
    stem = ConvNeXtV2(TINY).downsample_layers[0][0]
    img = torch.zeros(1, 3, 64, 96)
    img[:, :, 32:64, 64:96] = torch.randn(1, 3, 32, 32)
    touched = stem(img)[0].sub(stem.bias.view(-1, 1, 1)).abs().sum(0) > 0
    assert torch.equal(touched, upsample_mask(mask, 8)[0].bool())


@pytest.mark.parametrize("chans,hw", [(3, (64, 64)), (1, (64, 96)), (4, (96, 32))])
def test_patchify_round_trip(chans, hw):
    imgs = torch.randn(2, chans, *hw)
    patches = patchify(imgs)
    assert patches.shape == (2, hw[0] // 32 * hw[1] // 32, 32 * 32 * chans)
    # patch l is the image's l-th 32x32 block in row-major order
    assert torch.equal(patches[1, 1].view(32, 32, chans).permute(2, 0, 1), imgs[1, :, 0:32, 32:64]) or hw[1] == 32
    assert torch.equal(unpatchify(patches, hw[0] // 32, hw[1] // 32, chans), imgs)


def test_norm_pix_targets_have_zero_mean_unit_variance():
    target = normalize_patches(patchify(torch.rand(3, 3, 64, 64) * 5 + 2))
    assert torch.allclose(target.mean(-1), torch.zeros(3, 4), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(3, 4), atol=1e-4)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_perfect_prediction_has_zero_loss(norm_pix):
    imgs = torch.randn(2, 3, 64, 64)
    target = patchify(imgs)
    pred = normalize_patches(target) if norm_pix else target
    assert masked_patch_loss(pred, target, random_mask(2, 2, 2, 0.5).flatten(1), norm_pix) == 0


def test_loss_ignores_visible_patches():
    model = FCMAE(TINY, img_size=64, decoder_dim=16)
    imgs = torch.randn(2, 3, 64, 96)
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0]], [[0, 1, 1], [0, 0, 1]]]).float()
    loss, pred, out_mask = model(imgs, mask)
    assert pred.shape == (2, 6, 32 * 32 * 3) and torch.equal(out_mask, mask.flatten(1))
    (grad,) = torch.autograd.grad(masked_patch_loss(pred, patchify(imgs), out_mask), pred)
    assert (grad[out_mask == 0] == 0).all()  # exactly zero at visible positions
    assert (grad[out_mask == 1].abs().sum(-1) > 0).all()
    assert torch.allclose(loss, masked_patch_loss(pred, patchify(imgs), out_mask))
