import pytest
import timm
import torch
from helpers import TINY

from fcmae.encoders import SIZES, ConvNeXtV2, create_model

# The paper's table: parameters (millions) of the 1000-class classifier, as published (rounded to 0.1M).
PUBLISHED_PARAMS = {"atto": 3.7, "femto": 5.2, "pico": 9.1, "nano": 15.6, "tiny": 28.6,
                    "base": 89, "large": 198, "huge": 660}


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(SIZES))
def test_parameter_counts(name):
    with torch.device("meta"):
        ours = count(ConvNeXtV2(name))
        reference = count(timm.create_model(f"convnextv2_{name}"))
    assert ours == reference  # exact, against timm's independent definition
    published = PUBLISHED_PARAMS[name] * 1e6
    # 0.5%, or half a unit of the published figure's rounding (femto: 5.233M is printed as 5.2M).
    rounding = 0.05e6 if published < 100e6 else 0.5e6
    assert abs(ours - published) <= max(0.005 * published, rounding)


def test_registry_names():
    assert isinstance(create_model("convnextv2_atto", num_classes=3), ConvNeXtV2)
    with pytest.raises(ValueError, match="unknown model 'mega'"):
        create_model("mega")


@pytest.mark.parametrize("in_chans,shape", [(1, (64, 96)), (3, (32, 32)), (5, (96, 64))])
def test_any_in_chans_and_non_square(in_chans, shape):
    model = ConvNeXtV2(TINY, in_chans=in_chans, num_classes=7).eval()
    x = torch.randn(2, in_chans, *shape)
    assert model.forward_features(x).shape == (2, 32, shape[0] // 32, shape[1] // 32)
    assert model(x).shape == (2, 7)


def test_features_only_head():
    model = ConvNeXtV2(TINY, num_classes=0).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 32)


def test_rejects_sides_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        ConvNeXtV2(TINY)(torch.randn(1, 3, 48, 64))


def test_stochastic_depth():
    model = ConvNeXtV2(TINY, drop_path_rate=0.5, num_classes=4)
    rates = [b.drop_path.drop_prob for s in model.stages for b in s if hasattr(b.drop_path, "drop_prob")]
    assert rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0)
    a = model.train()(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)  # different samples dropped
    model.eval()
    assert torch.equal(model(x), model(x))
