"""`fcmae export RUN --hub DIR`: timm's hub layout (config.json, model.safetensors) that
`timm.create_model("local-dir:DIR", pretrained=True)` loads with our features, and a model card
written from the run; for encoders and classifiers (with their label names)."""
import json

import pytest
import timm
import torch
from helpers import PRETRAIN_TINY, finetune_small, labelled_images, parse_pretrain

from fcmae.checkpoints import read_weights
from fcmae.cli import main
from fcmae.features import load_encoder


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One compute thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short pre-training run with the kNN monitor, and a fine-tuning run of a custom size."""
    from fcmae.commands.pretrain import fit
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = labelled_images(root / "data", classes=2, per_class=6, size=64)
    fit(parse_pretrain(*PRETRAIN_TINY, "--data", str(data / "train"), "--eval-data", str(data), "--max-steps", "3",
                       "--epochs", "1", "--output", str(root / "pretrain"), "--export"))
    finetune_small("--data", str(data), "--max-steps", "2", "--batch-size", "4", "--effective-batch", "4",
                   "--output", str(root / "finetune"))
    torch.set_num_threads(threads)
    return root


def export(source, hub, *more):
    main(["export", str(source), "--hub", str(hub), *map(str, more)])


def test_an_encoder_in_timms_hub_layout_loads_with_our_features(runs, tmp_path):
    hub = tmp_path / "hub"
    export(runs / "pretrain", hub)
    config = json.loads((hub / "config.json").read_text())
    assert config["architecture"] == "convnextv2_atto" and config["num_classes"] == 0 and config["num_features"] == 320
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 64, 64] and cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert cfg["std"] == pytest.approx([0.229, 0.224, 0.225]) and config["model_args"]["in_chans"] == 3
    assert "license" not in cfg and "tag" not in cfg  # the release's provenance is not these weights'
    model = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    ours, _, _ = load_encoder(runs / "pretrain", False, None, None)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ours.forward_features(x), atol=1e-5)
    assert read_weights(hub / "model.safetensors").encoder.keys() == ours.state_dict().keys() - {"norm.weight",
                                                                                                 "norm.bias"}
    card = (hub / "README.md").read_text()
    for needed in ("ConvNeXt V2-atto encoder", "FCMAE self-supervised pre-training", "optimizer steps: 3",
                   "final training loss: ", "## kNN monitor", "![kNN top-1](knn.png)", "![reconstructions]",
                   f'timm.create_model("local-dir:{hub}", pretrained=True)', "HfApi().upload_folder(",
                   f"fcmae knn --checkpoint {hub}/model.safetensors"):
        assert needed in card, needed
    assert (hub / "knn.png").read_bytes()[:4] == b"\x89PNG" and (hub / "reconstruction.png").is_file()
    assert not list(hub.glob("*.tmp"))  # every file written atomically


def test_a_classifier_in_timms_hub_layout_keeps_its_label_names(runs, tmp_path):
    hub = tmp_path / "hub"
    export(runs / "finetune", hub)
    config = json.loads((hub / "config.json").read_text())
    assert config["num_classes"] == 2 and config["label_names"] == ["class0", "class1"]
    assert config["model_args"]["depths"] == [1, 1, 1, 1] and config["model_args"]["dims"] == [8, 16, 32, 64]
    model = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == ["class0", "class1"]
    weights = read_weights(runs / "finetune")
    from fcmae.encoders import ConvNeXtV2
    ours = ConvNeXtV2(weights.model, weights.in_chans, weights.num_classes).eval()
    ours.load_state_dict(weights.state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), atol=1e-5)
    assert read_weights(hub / "model.safetensors").classes == ["class0", "class1"]  # fcmae predict names them
    assert "fine-tuning (classification)" in (hub / "README.md").read_text()


def test_hub_to_a_file_or_with_output_is_one_line(runs, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    for args, expected in ((["--hub", tmp_path / "taken"], f"--hub {tmp_path / 'taken'} is a file, not a folder"),
                           (["--hub", tmp_path / "h", "--output", tmp_path / "e.safetensors"], "--output and --hub")):
        with pytest.raises(SystemExit) as exit:
            main(["export", str(runs / "pretrain"), *map(str, args)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"fcmae: error: {expected}") and err.count("\n") == 1, err
    assert (tmp_path / "taken").read_text() == "x" and not (tmp_path / "h").exists()
