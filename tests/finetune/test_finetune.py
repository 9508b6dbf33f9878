"""`fcmae finetune` / `fcmae eval` pieces: the recipes, layer-wise lr decay, weight decay, the
four kinds of --pretrained, refusals of mismatched weights, the classifier export (timm loads
it), the linear probe's BatchNorm folding, data checks. Fast: tiny models, no training loop."""
import argparse
from importlib.resources import files

import pytest
import timm
import torch
from helpers import COLORS, TINY, randomize_, shapes_dataset
from PIL import Image
from safetensors.torch import save_file
from timm.models.convnext import checkpoint_filter_fn

from fcmae import FCMAE
from fcmae.checkpoints import classifier_state_dict, read_weights, save_weights
from fcmae.commands.finetune import DEFAULT_MODEL, batch_plan, build_parser, resolve
from fcmae.data import labelled as data, transforms
from fcmae.encoders import SIZES, ConvNeXtV2
from fcmae.encoders.convert import fcmae_to_release
from fcmae.errors import UserError
from fcmae.finetune import layer_decay
from fcmae.finetune.module import FinetuneModule
from fcmae.finetune.weights import load_pretrained
from fcmae.optim import param_groups
from fcmae.training.flags import with_recipe


def parse(*args):
    """Like `fcmae finetune ARGS`: the size's recipe first, then the flags."""
    return build_parser().parse_args(with_recipe("finetune", list(args), DEFAULT_MODEL))


# ----------------------------------------------------------------------------- recipes

# docs/method.md's table: eff. batch, blr, epochs, warmup, layer decay, wd, drop path, mixup, cutmix, smoothing
DOCUMENTED = {
    "atto": (1024, 2e-4, 600, 0, "single", 0.9, 0.3, 0.1, 0.0, 0.0, 0.2),
    "tiny": (1024, 8e-4, 300, 40, "single", 0.9, 0.05, 0.2, 0.8, 1.0, 0.1),
    "base": (1024, 6.25e-4, 100, 20, "group", 0.6, 0.05, 0.1, 0.8, 1.0, 0.1),
}
DERIVED_FROM = {"femto": "atto", "pico": "atto", "nano": "tiny", "large": "base", "huge": "base"}


@pytest.mark.parametrize("size", list(SIZES))
def test_recipes_match_the_table_or_say_where_they_come_from(size):
    cfg = parse("--model", size, "--data", "x")
    source = DERIVED_FROM.get(size, size)
    got = (cfg.effective_batch, cfg.blr, cfg.epochs, cfg.warmup_epochs, cfg.layer_decay_type, cfg.layer_decay,
           cfg.weight_decay, cfg.drop_path, cfg.mixup, cfg.cutmix, cfg.smoothing)
    assert got == DOCUMENTED[source]
    assert (cfg.aa, cfg.reprob, cfg.ema, cfg.model) == ("rand-m9-mstd0.5-inc1", 0.25, True, size)
    text = files("fcmae.configs").joinpath("finetune", f"{size}.yaml").read_text()
    if size in DERIVED_FROM:
        assert "DERIVED" in text and f"{source.capitalize()}'s recipe" in text


def test_flags_override_the_recipe_and_lr_follows_the_effective_batch():
    cfg = parse("--model", "base", "--data", "x", "--epochs", "3", "--blr", "1e-3", "--devices", "1",
                "--batch-size", "64")
    rv = resolve(cfg)
    assert (rv["epochs"], rv["accumulate"], rv["effective_batch"]) == (3, 16, 1024)  # 64 x 1 x 16
    assert rv["lr"] == pytest.approx(1e-3 * 1024 / 256)
    assert rv["output"] == "runs/base-finetune"
    cfg = parse("--model", "base", "--data", "x", "--devices", "1", "--batch-size", "64", "--accumulate", "2")
    assert batch_plan(cfg) == (2, 128)  # --accumulate wins over the recipe's effective batch
    probe = resolve(parse("--model", "atto", "--data", "x", "--linear-probe", "--devices", "1"))
    assert (probe["blr"], probe["weight_decay"], probe["epochs"], probe["mixup"], probe["ema"]) == (0.1, 0.0, 90, 0.0, False)
    assert probe["output"] == "runs/atto-linprobe"


@pytest.mark.parametrize("args, message", [
    (["--model", "base", "--data", "x", "--devices", "1", "--batch-size", "48"], "not a multiple of --batch-size 48"),
    (["--model", "atto", "--data", "x", "--layer-decay-type", "group"], "use single"),
    (["--model", "tiny", "--data", "x", "--batch-size", "7", "--effective-batch", "7"], "must be even"),
    (["--model", "atto", "--data", "x", "--in-chans", "4"], "pass 3 or 1"),
    (["--model", "atto", "--data", "x", "--pretrained", "/no/such/file.pth"], "no such file"),
    (["--model", "atto"], "no --data"),
])
def test_bad_options_are_one_clear_error(args, message):
    with pytest.raises(UserError, match=message):
        resolve(parse(*args))


# ----------------------------------------------------------------------------- layer decay

def scales(model, decay, decay_type, weight_decay=0.05):
    """name -> (lr_scale, weight_decay) from the optimizer groups, each parameter exactly once."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    lr_scale = lambda name: layer_decay.lr_scale(name, model.depths, decay, decay_type)  # noqa: E731
    for group in param_groups(model, weight_decay, lr_scale=lr_scale):
        for p in group["params"]:
            assert names[id(p)] not in out
            out[names[id(p)]] = (group["lr_scale"], group["weight_decay"])
    assert set(out) == set(names.values())
    return out


def test_layer_decay_single_atto():
    model = ConvNeXtV2("atto", num_classes=10)
    got = scales(model, 0.9, "single")
    # depths 2-2-6-2: 12 layers; stem and the first block id 1, the last block 12, head 13.
    expected = {"downsample_layers.0.0.weight": 0.9 ** 12, "downsample_layers.0.1.bias": 0.9 ** 12,
                "stages.0.0.dwconv.weight": 0.9 ** 12, "stages.0.1.pwconv1.weight": 0.9 ** 11,
                "downsample_layers.1.1.weight": 0.9 ** 10, "stages.2.0.grn.gamma": 0.9 ** 8,
                "stages.2.5.pwconv2.weight": 0.9 ** 3, "downsample_layers.3.1.weight": 0.9 ** 2,
                "stages.3.1.pwconv2.weight": 0.9, "stages.3.1.norm.weight": 0.9,
                "norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    for name, scale in expected.items():
        assert got[name][0] == pytest.approx(scale, rel=1e-12), name
    for name, (scale, _) in got.items():  # and every other parameter follows the same rule
        assert scale == pytest.approx(layer_decay.lr_scale(name, model.depths, 0.9, "single"), rel=1e-12)


def test_layer_decay_group_base():
    model = ConvNeXtV2("base", num_classes=10)
    got = scales(model, 0.6, "group")
    # 12 groups + head: stem 0, stage 0 -> 1, stage 1 -> 2, stage 2 three blocks per id 3..11, stage 3 -> 12.
    expected = {"downsample_layers.0.0.weight": 0.6 ** 13, "stages.0.0.dwconv.weight": 0.6 ** 12,
                "stages.0.2.pwconv2.weight": 0.6 ** 12, "downsample_layers.1.1.weight": 0.6 ** 11,
                "stages.1.2.grn.beta": 0.6 ** 11, "downsample_layers.2.1.weight": 0.6 ** 10,
                "stages.2.0.dwconv.weight": 0.6 ** 10, "stages.2.2.pwconv1.weight": 0.6 ** 10,
                "stages.2.3.pwconv1.weight": 0.6 ** 9, "stages.2.26.pwconv2.weight": 0.6 ** 2,
                "downsample_layers.3.1.weight": 0.6, "stages.3.2.pwconv2.weight": 0.6,
                "norm.bias": 1.0, "head.weight": 1.0}
    for name, scale in expected.items():
        assert got[name][0] == pytest.approx(scale, rel=1e-12), name
    for name, (scale, _) in got.items():
        assert scale == pytest.approx(layer_decay.lr_scale(name, model.depths, 0.6, "group"), rel=1e-12)


def test_no_weight_decay_on_biases_norms_and_grn():
    model = ConvNeXtV2(TINY, num_classes=3)
    got = scales(model, 0.9, "single", weight_decay=0.05)
    decayed = {n for n, (_, wd) in got.items() if wd == 0.05}
    # Only conv and linear weight matrices: GRN gamma/beta are (1, 1, 1, C) yet not decayed.
    assert decayed == {n for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim > 1}
    assert {got[n][1] for n in ("stages.0.0.grn.gamma", "stages.0.0.grn.beta", "downsample_layers.1.0.weight",
                                "stages.0.0.norm.weight", "norm.weight", "head.bias")} == {0.0}


# ----------------------------------------------------------------------------- --pretrained

@pytest.fixture(scope="module")
def fcmae_model():
    """A pre-trained FCMAE stand-in with every tensor non-trivial."""
    torch.manual_seed(0)
    return randomize_(FCMAE(model=TINY, img_size=64, decoder_dim=16))


def encoder_weights(fcmae_model):
    return {k: v.clone() for k, v in fcmae_model.encoder.state_dict().items()}


def pretrain_checkpoint(fcmae_model, path):
    """What `fcmae pretrain` writes: a Lightning checkpoint holding the FCMAE as `model.*`."""
    state = {"model." + k: v for k, v in fcmae_model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": "custom", "in_chans": 3, "input_size": 64},
                "global_step": 10, "epoch": 1}, path)
    return path


def assert_trunk_equal(model, expected):
    own = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(own[k], v), k
    assert set(k for k in own if not k.startswith(("norm.", "head."))) == set(expected)


def test_pretrained_from_an_fcmae_export(fcmae_model, tmp_path, capsys):
    from fcmae.checkpoints import export_weights as export
    path = export(pretrain_checkpoint(fcmae_model, tmp_path / "last.ckpt"), tmp_path / "encoder.safetensors")
    model = ConvNeXtV2(TINY, num_classes=3)
    report = load_pretrained(model, path)
    assert_trunk_equal(model, encoder_weights(fcmae_model))
    assert report["missing"] == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert model.head.weight.abs().max() < 1e-3 and not model.head.bias.any()  # the release's std-2e-5 head
    out = capsys.readouterr().out
    assert "loaded" in out and "missing (left at init): head.bias, head.weight, norm.bias, norm.weight" in out


def test_pretrained_from_our_pretraining_checkpoint(fcmae_model, tmp_path, capsys):
    model = ConvNeXtV2(TINY, num_classes=3)
    report = load_pretrained(model, pretrain_checkpoint(fcmae_model, tmp_path / "last.ckpt"))
    assert_trunk_equal(model, encoder_weights(fcmae_model))
    assert report["kind"] == "fcmae pre-training checkpoint"


def test_pretrained_from_a_release_minkowski_checkpoint(fcmae_model, tmp_path):
    # The release saves {"model": ..., "args": argparse.Namespace, ...}: needs full unpickling.
    path = tmp_path / "convnextv2_tiny_1k_224_fcmae.pt"
    torch.save({"model": fcmae_to_release(fcmae_model.state_dict()), "args": argparse.Namespace(model="x"),
                "epoch": 1599}, path)
    model = ConvNeXtV2(TINY, num_classes=3)
    report = load_pretrained(model, path)
    assert_trunk_equal(model, encoder_weights(fcmae_model))  # kernels reshaped back exactly
    assert "MinkowskiEngine" in report["kind"]


def test_pretrained_from_a_dense_public_checkpoint(tmp_path, capsys):
    torch.manual_seed(1)
    source = randomize_(ConvNeXtV2(TINY, num_classes=5))
    path = tmp_path / "dense.pth"
    torch.save({"model": source.state_dict()}, path)
    same_classes = ConvNeXtV2(TINY, num_classes=5)
    load_pretrained(same_classes, path)
    for k, v in source.state_dict().items():  # trunk, final norm and head: everything
        assert torch.equal(same_classes.state_dict()[k], v), k
    other_classes = ConvNeXtV2(TINY, num_classes=3)
    report = load_pretrained(other_classes, path)
    assert report["dropped"] == ["head.weight (5, 32)", "head.bias (5)"]
    assert torch.equal(other_classes.norm.weight, source.norm.weight)
    assert other_classes.head.weight.abs().max() < 1e-3


@pytest.mark.parametrize("file_model, file_chans, message", [
    ({"depths": [2, 2, 3, 2], "dims": [8, 16, 24, 48]}, 3,
     r"does not fit --model \{depths: \[2, 2, 3, 2\], dims: \[8, 16, 24, 32\]\} --in-chans 3: "
     r"\S+ is \(48[,)].* in the file but \(32[,)].* in the model: pass the --model and --in-chans"),
    (TINY, 1, r"downsample_layers\.0\.0\.weight is \(8, 1, 4, 4\) in the file but \(8, 3, 4, 4\) in the model"),
    ({"depths": [2, 2, 4, 2], "dims": [8, 16, 24, 32]}, 3, r"stages\.2\.3\..* is in the file but not in the model"),
    ({"depths": [2, 2, 2, 2], "dims": [8, 16, 24, 32]}, 3, r"stages\.2\.2\..* is in the model but not in the file"),
])
def test_pretrained_of_another_size_or_in_chans_is_refused(tmp_path, file_model, file_chans, message):
    path = tmp_path / "other.safetensors"
    save_file(ConvNeXtV2(file_model, in_chans=file_chans, num_classes=0).state_dict(), path)
    with pytest.raises(UserError, match=message):
        load_pretrained(ConvNeXtV2(TINY, num_classes=3), path)


def test_unreadable_or_empty_pretrained_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_pretrained(ConvNeXtV2(TINY, num_classes=3), junk)
    empty = tmp_path / "empty.pth"
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, empty)
    with pytest.raises(UserError, match="no ConvNeXt V2 weights"):
        load_pretrained(ConvNeXtV2(TINY, num_classes=3), empty)


# ----------------------------------------------------------------------------- weights out

def test_timm_loads_the_exported_classifier_with_its_head(tmp_path):
    torch.manual_seed(2)
    ours = randomize_(ConvNeXtV2("atto", num_classes=7)).eval()
    path = tmp_path / "classifier.safetensors"
    save_weights(path, ours.state_dict(), {"kind": "classifier", "classes": list("abcdefg")})
    weights = read_weights(path)
    state, meta = weights.state, weights.meta
    assert (weights.kind, weights.model, weights.num_classes, weights.classes) == ("classifier", "atto", 7, list("abcdefg"))
    assert (meta["model"], meta["num_classes"], meta["classes"]) == ("atto", 7, list("abcdefg"))
    theirs = timm.create_model("convnextv2_atto", pretrained=False, num_classes=7).eval()
    result = theirs.load_state_dict(checkpoint_filter_fn(state, theirs), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-4)


def test_linear_probe_batchnorm_folds_into_the_head():
    torch.manual_seed(3)
    module = FinetuneModule(randomize_(ConvNeXtV2(TINY, num_classes=3)), linear_probe=True)
    with torch.no_grad():
        module.feature_bn.running_mean.normal_()
        module.feature_bn.running_var.uniform_(0.5, 2.0)
        module.model.head.bias.normal_()
    module.eval()
    folded = ConvNeXtV2(TINY, num_classes=3).eval()
    folded.load_state_dict(classifier_state_dict(module.state_dict()))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), module(x), atol=1e-5, rtol=1e-4)


def test_only_the_model_has_gradients_the_ema_follows_it():
    module = FinetuneModule(ConvNeXtV2(TINY, num_classes=3), ema_decay=0.9)
    assert all(not p.requires_grad for p in module.model_ema.parameters())  # else DDP waits for their grads
    assert all(p.requires_grad for p in module.model.parameters())
    assert set(module.state_dict()) == {f"model.{k}" for k in module.model.state_dict()} | \
        {f"model_ema.module.{k}" for k in module.model.state_dict()}  # what `fcmae export` reads


def test_linear_probe_trains_only_the_head():
    module = FinetuneModule(ConvNeXtV2(TINY, num_classes=3, drop_path_rate=0.1), linear_probe=True)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"model.head.weight", "model.head.bias"}
    module.train()
    assert not module.model.training and module.feature_bn.training  # encoder stays in eval mode


# ----------------------------------------------------------------------------- data

def test_randaugment_survives_posterize_to_zero_bits():
    # "inc1" asks PosterizeIncreasing for 0 bits at magnitude 10; Pillow 13 raises on that.
    transform = transforms.train_transform(64)
    ops = [op for t in transform.transforms for op in getattr(t, "ops", ())]
    assert any(op.name == "PosterizeIncreasing" and op.aug_fn is transforms.posterize for op in ops)
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert transforms.posterize(img, 0).getextrema() == ((0, 0),) * 3  # black, as Pillow < 13 gave
    assert transforms.posterize(img, 4).getpixel((0, 0)) == (192, 96, 48)


def test_data_folders_are_checked(tmp_path):
    root = shapes_dataset(tmp_path / "d", per_class=(2, 1))
    train = data.image_folder(root, "train", None)
    assert train.classes == sorted(COLORS) and len(train) == 6
    with pytest.raises(UserError, match="has no train/ folder"):
        data.image_folder(tmp_path, "train", None)
    (root / "val" / "red_circle" / "000.png").rename(root / "val" / "extra.png")
    (root / "val" / "red_circle").rmdir()
    with pytest.raises(UserError, match="same class folders"):
        data.check_classes(train, data.image_folder(root, "val", None))
    with pytest.raises(UserError, match="not a directory"):
        data.image_folder(tmp_path / "missing", "val", None)


# ----------------------------------------------------------------------------- the command

@pytest.fixture
def fcmae_main(monkeypatch):
    """`fcmae ...` with only this issue's subcommands loaded (the others are not needed here)."""
    import fcmae.cli
    monkeypatch.setattr(fcmae.cli, "COMMANDS", {k: fcmae.cli.COMMANDS[k] for k in ("finetune", "eval")})
    return fcmae.cli.main


def test_print_config_shows_the_recipe_with_overrides(fcmae_main, capsys):
    with pytest.raises(SystemExit) as exit_:
        fcmae_main(["finetune", "--model", "atto", "--epochs", "5", "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for line in ("model: atto", "blr: 0.0002", "epochs: 5", "layer_decay_type: single", "smoothing: 0.2"):
        assert line in out.splitlines(), line


def test_a_size_mismatch_is_one_line_and_exit_2(fcmae_main, tmp_path, capsys):
    root = shapes_dataset(tmp_path / "d", per_class=(2, 1))
    encoder = tmp_path / "tiny_encoder.safetensors"
    save_file({k: v for k, v in ConvNeXtV2(TINY, num_classes=0).state_dict().items() if not k.startswith("norm.")},
              encoder)
    with pytest.raises(SystemExit) as exit_:
        fcmae_main(["finetune", "--model", "atto", "--data", str(root), "--pretrained", str(encoder),
                    "--accelerator", "cpu", "--devices", "1", "--workers", "0", "--batch-size", "2",
                    "--effective-batch", "2", "--output", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("fcmae: error: --pretrained") and "does not fit --model atto --in-chans 3: " \
        "downsample_layers.0.0.weight is (8, 3, 4, 4) in the file but (40, 3, 4, 4) in the model" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_eval_of_a_missing_checkpoint_is_one_line(fcmae_main, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        fcmae_main(["eval", "--checkpoint", str(tmp_path / "nope.ckpt"), "--data", str(tmp_path)])
    assert exit_.value.code == 2
    assert "does not exist" in capsys.readouterr().err
