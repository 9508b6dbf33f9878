"""`fcmae export`: pre-training checkpoints -> the dense encoder, fine-tuning checkpoints -> the
classifier, in the public release's layout that timm and `fcmae finetune` load."""
import json

import pytest
import timm
import torch
from helpers import randomize_
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.convnext import checkpoint_filter_fn

from fcmae.checkpoints import export_weights as export
from fcmae.commands.export import build_parser, run
from fcmae.encoders import ConvNeXtV2
from fcmae.errors import UserError
from fcmae.module import PretrainModule

TIMM_HEAD = {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A run directory whose last.ckpt is laid out as Lightning writes it (atto, 64 px)."""
    torch.manual_seed(0)
    module = randomize_(PretrainModule(model="atto", backend="sparse", input_size=64, decoder_dim=32,
                                       config={"input_size": 64}))
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "checkpoints").mkdir()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "global_step": 7, "epoch": 1}, run_dir / "checkpoints" / "last.ckpt")
    return run_dir, module.model.encoder


def timm_atto(weights, num_classes=1000):
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=num_classes)
    result = model.load_state_dict(checkpoint_filter_fn(weights, model), strict=False)
    return model.eval(), set(result.missing_keys), set(result.unexpected_keys)


def test_encoder_export_loads_in_timm_with_the_same_features(pretrain_run):
    run_dir, encoder = pretrain_run
    path = export(run_dir)
    assert path == run_dir / "encoder.safetensors"
    weights = load_file(path)
    assert all(k.startswith(("downsample_layers.", "stages.")) for k in weights)
    assert weights["stages.0.0.dwconv.weight"].shape == (40, 1, 7, 7)
    assert weights["stages.0.0.grn.gamma"].shape == (1, 1, 1, 160)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert (meta["model"], meta["in_chans"], meta["input_size"], meta["steps"]) == ("atto", "3", "64", "7")
    assert meta["kind"] == "encoder" and json.loads(meta["config"])["input_size"] == 64

    model, missing, unexpected = timm_atto(weights)
    assert missing == TIMM_HEAD and not unexpected  # only the head is missing
    ours = ConvNeXtV2("atto").eval()
    assert set(ours.load_state_dict(weights, strict=False).missing_keys) == {"norm.weight", "norm.bias",
                                                                            "head.weight", "head.bias"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours_features = ours.forward_features(x)
        assert torch.allclose(model.forward_features(x), ours_features, atol=1e-5)
        # ...and the same network as the pre-training encoder with nothing masked
        assert torch.allclose(encoder.eval()(x, torch.zeros(2, 2, 2)), ours_features, atol=1e-5)


def test_pth_export_and_finetune_loads_it(pretrain_run, tmp_path):
    run_dir, _ = pretrain_run
    path = export(run_dir / "checkpoints" / "last.ckpt", tmp_path / "encoder.pth")
    saved = torch.load(path, weights_only=True)
    assert saved["meta"]["model"] == "atto" and "stages.3.1.pwconv2.weight" in saved["model"]
    assert timm_atto(saved)[1] == TIMM_HEAD  # timm's filter unwraps {"model": ...} too
    from fcmae.finetune.weights import load_pretrained  # what `fcmae finetune --pretrained` calls
    for file in (path, run_dir / "encoder.safetensors"):
        model = ConvNeXtV2("atto", num_classes=10)
        info = load_pretrained(model, file)
        assert set(info["missing"]) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
        assert torch.equal(model.stages[2][5].grn.gamma, saved["model"]["stages.2.5.grn.gamma"])


def test_finetuning_checkpoint_exports_the_classifier(tmp_path):
    torch.manual_seed(1)
    model, ema = randomize_(ConvNeXtV2("atto", num_classes=10)), randomize_(ConvNeXtV2("atto", num_classes=10), seed=1)
    state = {**{"model." + k: v for k, v in model.state_dict().items()},
             **{"model_ema.module." + k: v for k, v in ema.state_dict().items()}}
    ckpt = tmp_path / "ft" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "global_step": 3}, ckpt)
    x = torch.randn(2, 3, 64, 64)
    for use_ema, source in ((False, model), (True, ema)):
        run(build_parser().parse_args([str(tmp_path / "ft"), *(["--ema"] if use_ema else [])]))
        path = tmp_path / "ft" / "classifier.safetensors"
        weights = load_file(path)
        assert {"norm.weight", "head.weight", "head.bias"} <= set(weights)
        assert all(torch.equal(weights[k], v) for k, v in source.state_dict().items())
        timm_model, missing, unexpected = timm_atto(weights, num_classes=10)
        assert not missing and not unexpected
        with torch.no_grad():
            assert torch.allclose(timm_model(x), source.eval()(x), atol=1e-5)
        with safe_open(path, "pt") as f:
            assert f.metadata()["ema"] == json.dumps(use_ema) and f.metadata()["num_classes"] == "10"


def test_export_errors(pretrain_run, tmp_path):
    run_dir, _ = pretrain_run
    with pytest.raises(UserError, match="no EMA"):
        export(run_dir, tmp_path / "x.safetensors", ema=True)
    with pytest.raises(UserError, match="no checkpoint"):
        export(tmp_path / "nothing-here")
    with pytest.raises(UserError, match="unknown format"):
        export(run_dir, tmp_path / "x.onnx")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        export(tmp_path / "junk.ckpt")
