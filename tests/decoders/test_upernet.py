"""The segmenter: our encoder's four stages through smp's UperNet (pyramid pooling 1, 2, 3, 6 on the
last stage, FPN over all four), a classifier, and an auxiliary FCN head on the third stage."""
import pytest
import torch
from helpers import TINY, randomize_
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

from fcmae.encoders import ConvNeXtV2
from fcmae.decoders.upernet import UperNetSegmenter


def small(num_classes=4, **kwargs):
    return UperNetSegmenter(TINY, num_classes, channels=32, aux_channels=16, **kwargs)


@pytest.mark.parametrize("shape", [(64, 64), (64, 96)])
def test_logits_at_the_input_size_and_the_aux_head_at_a_sixteenth(shape):
    model = small().eval()
    x = torch.randn(2, 3, *shape)
    h, w = shape
    logits, aux = model.forward_with_aux(x)
    assert logits.shape == (2, 4, h // 4, w // 4) and aux.shape == (2, 4, h // 16, w // 16)
    out = model(x)
    assert out.shape == (2, 4, h, w)
    upsampled = torch.nn.functional.interpolate(logits, size=shape, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, upsampled, rtol=0, atol=0)


def test_the_decoder_is_smps_upernet_on_the_four_stages():
    model = UperNetSegmenter("atto", 150)  # the recipe's head on the smallest size
    dims = (40, 80, 160, 320)
    assert isinstance(model.decoder, UPerNetDecoder)
    assert [b[0].output_size for b in model.decoder.psp.blocks] == [1, 2, 3, 6]
    assert model.decoder.psp.blocks[0][1][0].in_channels == dims[-1]  # pyramid pooling on the last stage
    assert [b.conv_norm_relu[0].in_channels for b in model.decoder.fpn_lateral_blocks] == [160, 80, 40]
    assert model.decoder.fusion_block[0].in_channels == 4 * 512 and model.decoder.fusion_block[0].out_channels == 512
    assert [n.normalized_shape[0] for n in model.decoder.feature_norms] == list(dims)
    assert model.aux_head[0][0].in_channels == dims[2] and model.aux_head[1][1].out_channels == 150
    assert model.classifier[1].in_channels == 512 and model.classifier[1].out_channels == 150


def test_the_aux_head_sees_the_third_stage_only():
    model = small().eval()
    x = torch.randn(1, 3, 64, 64)
    stages = model.encoder.forward_stages(x)
    torch.testing.assert_close(model.forward_with_aux(x)[1], model.aux_head(stages[2]), rtol=0, atol=0)


def test_encoder_keys_are_the_public_dense_layout_without_the_classifier_parts():
    model = small()
    encoder = {k[len("encoder."):] for k in model.state_dict() if k.startswith("encoder.")}
    public = {k for k in ConvNeXtV2(TINY, num_classes=10).state_dict() if not k.startswith(("norm.", "head."))}
    assert encoder == public
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "decoder", "classifier", "aux_head"}


def test_every_parameter_trains_and_drop_path_is_in_the_encoder():
    model = randomize_(small(drop_path=0.3)).train()
    logits, aux = model.forward_with_aux(torch.randn(2, 3, 64, 64))
    (logits.square().mean() + aux.square().mean()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []  # DDP needs every parameter in the graph: no find_unused_parameters
    rates = [b.drop_path.drop_prob for s in model.encoder.stages for b in s if hasattr(b.drop_path, "drop_prob")]
    assert rates[-1] == pytest.approx(0.3) and rates == sorted(rates)


def test_any_in_chans():
    model = small(in_chans=5).eval()
    assert model(torch.randn(1, 5, 64, 64)).shape == (1, 4, 64, 64)
