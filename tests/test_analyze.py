"""`fcmae analyze`: the paper's feature cosine distance, per block, and its plots."""
import math

import pytest
import torch

from fcmae.features import cosine_distance


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One compute thread (tests/conftest.py)."""


def gram_distance(x):
    """The definition spelled out: the full Gram matrix of the normalized channel vectors."""
    v = torch.nn.functional.normalize(x.flatten(1).double(), dim=1)  # (C, HW)
    return ((1 - v @ v.T) / 2).mean().item()


def test_identical_channels_have_distance_zero():
    x = torch.rand(1, 1, 7, 7).expand(2, 64, 7, 7) * torch.rand(2, 64, 1, 1)  # scaled copies of one map
    assert cosine_distance(x).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_disjoint_channels_have_distance_half_of_c_minus_one_over_c():
    c = 16
    x = torch.zeros(1, c, 4, 8)
    for i in range(c):  # channel i lives on position i only
        x[0, i].view(-1)[i] = 1 + i
    assert cosine_distance(x).item() == pytest.approx(0.5 * (c - 1) / c, abs=1e-6)


def test_random_gaussian_channels_are_close_to_orthogonal_and_match_the_gram_matrix():
    torch.manual_seed(0)
    c = 64
    x = torch.randn(3, c, 28, 28)
    d = cosine_distance(x)
    assert d.shape == (3,)
    assert d.tolist() == pytest.approx([0.5 * (c - 1) / c] * 3, abs=2e-3)
    assert d.tolist() == pytest.approx([gram_distance(x[i]) for i in range(3)], abs=1e-5)
    # ReLU'd Gaussians are correlated (expected cosine 1/pi): a lower distance, exactly the definition's
    y = x.relu()
    assert cosine_distance(y)[0].item() == pytest.approx(gram_distance(y[0]), abs=1e-5)
    assert cosine_distance(y)[0].item() == pytest.approx((1 - 1 / math.pi) / 2 * (c - 1) / c, abs=5e-3)
