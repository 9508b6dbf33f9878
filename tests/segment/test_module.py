"""The segmentation recipe as a LightningModule: the loss (main + 0.4 aux, IGNORE left out),
layer-decayed AdamW groups, the poly schedule in optimizer steps, mIoU on validation, the stop on a
non-finite loss; and a quick learnability smoke with a plain Lightning Trainer."""
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, plain_segmentation_loop, segmentation_images

from fcmae.checkpoints import segmenter_meta
from fcmae.data.transforms import normalization
from fcmae.decoders.upernet import UperNetSegmenter
from fcmae.encoders import layer_decay
from fcmae.errors import NonFiniteLoss
from fcmae.labelmaps import IGNORE, default_palette
from fcmae.segment.data import SegmentData, SegmentationSet, find_layout, list_pairs, read_classes
from fcmae.segment.module import SegmentModule
from fcmae.segment.transforms import EvalTransform, TrainTransform

SMALL = {"depths": [1, 1, 2, 1], "dims": [16, 32, 64, 128]}


def module_for(model, classes=("a", "b", "c", "d"), input_size=64, **kwargs):
    meta = segmenter_meta(model, classes, default_palette(len(classes)), input_size, (4 * input_size, input_size),
                          normalization(3, False))
    return SegmentModule(model, **kwargs, **meta)


def data(root, classes, crop=64):
    layout, norm = find_layout(root), normalization(3, False)
    train = SegmentationSet(*list_pairs(*layout.train), classes, TrainTransform(crop, norm=norm))
    val = SegmentationSet(*list_pairs(*layout.val), classes, EvalTransform(norm))
    return train, val


def trainer(steps, **kwargs):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     num_sanity_val_steps=0, **kwargs)


def test_layer_decay_over_the_encoder_the_head_at_full_lr():
    model = UperNetSegmenter(TINY, 4, channels=16, aux_channels=8)
    module = module_for(model, lr=1e-4, layer_decay=0.9, iterations=100, warmup_iterations=10)
    optimizer = module.configure_optimizers()["optimizer"]
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith("encoder."):
            expected = layer_decay.lr_scale(name[len("encoder."):], TINY["depths"], 0.9)
        else:
            expected = 1.0
        assert scale_of[id(p)] == pytest.approx(expected), name
        assert decay_of[id(p)] == (0.0 if p.ndim <= 1 or name.endswith(("grn.gamma", "grn.beta")) else 0.05), name
    assert scale_of[id(model.encoder.downsample_layers[0][0].weight)] == pytest.approx(0.9 ** 9)  # the stem: slowest
    assert scale_of[id(model.encoder.stages[3][1].pwconv2.weight)] == pytest.approx(0.9)  # the last block
    assert len({id(p) for g in optimizer.param_groups for p in g["params"]}) == len(list(model.parameters()))


def test_the_loss_is_main_plus_04_aux_and_ignores_255():
    torch.manual_seed(0)
    model = UperNetSegmenter(TINY, 3, channels=16, aux_channels=8).eval()  # eval: no dropout, BN fixed
    module = module_for(model, classes=("a", "b", "c"))
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    y[:, :10] = IGNORE
    main, aux = model.forward_with_aux(x)

    def ce(logits):
        up = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
        keep = y != IGNORE
        return F.cross_entropy(up.permute(0, 2, 3, 1)[keep], y[keep])  # the labelled pixels alone
    torch.testing.assert_close(module.loss(main, y), ce(main))
    torch.testing.assert_close(module.loss(main, y) + 0.4 * module.loss(aux, y), ce(main) + 0.4 * ce(aux))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return segmentation_images(tmp_path_factory.mktemp("shapes"), train=32, val=8, size=64, classes=4)


def test_training_logs_the_parts_and_follows_the_poly_schedule(shapes, one_thread):
    L.seed_everything(0, verbose=False)
    train, val = data(shapes, 4)
    model = UperNetSegmenter(TINY, 4, channels=16, aux_channels=8)
    module = module_for(model, lr=1e-3, iterations=10, warmup_iterations=2)
    t = trainer(3, limit_val_batches=0, log_every_n_steps=1)  # logged at log steps only
    t.fit(module, datamodule=SegmentData(train, val, 4, 0, seed=0))
    m = t.callback_metrics
    torch.testing.assert_close(m["train/loss"], m["train/main_loss"] + 0.4 * m["train/aux_loss"])
    head_lr = max(g["lr"] for g in module.optimizers().param_groups)
    assert head_lr == pytest.approx(1e-3 * (1 - 3 / 10))  # step 3 of 10, past the 2-step warmup: poly, power 1


def test_a_non_finite_loss_stops_training(shapes):
    train, val = data(shapes, 4)
    model = UperNetSegmenter(TINY, 4, channels=16, aux_channels=8)
    with torch.no_grad():
        model.classifier[1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        trainer(2, limit_val_batches=0).fit(module_for(model, lr=1e-3), datamodule=SegmentData(train, val, 4, 0))


@pytest.mark.slow
def test_a_few_dozen_steps_learn_the_shapes(shapes, one_thread):
    """Recipe pipeline and loss, a small encoder, 40 steps at lr 1e-3: well above what predicting
    the background everywhere scores."""
    L.seed_everything(0, verbose=False)
    classes = read_classes(shapes)
    train, val = data(shapes, len(classes))
    model = UperNetSegmenter(SMALL, len(classes), channels=64, aux_channels=32)
    module = module_for(model, classes, lr=1e-3, layer_decay=1.0, iterations=40, warmup_iterations=4)
    t = trainer(40, check_val_every_n_epoch=5)
    datamodule = SegmentData(train, val, 8, 0, seed=0)
    t.fit(module, datamodule=datamodule)
    t.validate(module, datamodule=datamodule, verbose=False)
    background = torch.cat([val[i].mask.flatten() for i in range(len(val))])
    chance = float((background == 0).float().mean()) * 100 / len(classes)  # all background: one IoU of K
    miou = float(t.callback_metrics["val/mIoU"])
    assert miou == pytest.approx(module.last_scores["mIoU"])
    assert miou > max(45.0, chance + 20), (miou, chance)


@pytest.mark.slow
def test_the_plain_smp_reference_loop_learns_the_shapes(shapes, one_thread):
    """The reference phase 2's learnability comparison runs against (tests/helpers.py)."""
    assert plain_segmentation_loop(shapes, steps=30) > 60
