"""fcmae.checkpoints: every kind of weights file reads into one description without running code
from the file, and every write is atomic and fsynced. (Real pre-training and fine-tuning
last.ckpt files, and the malicious file through each command: tests/faults/test_checkpoint_faults.py.)"""
import argparse
import json
import os
import pathlib

import pytest
import timm
import torch
from helpers import TINY, randomize_, release_checkpoint
from safetensors import safe_open

import fcmae.checkpoints
from fcmae import FCMAE
from fcmae.checkpoints import (SAFE_GLOBALS, architecture, describe, load, read_run_checkpoint, read_weights,
                               save_torch, save_weights, size_name)
from fcmae.encoders import SIZES, ConvNeXtV2
from fcmae.errors import UserError


class Touch:
    """Unpickling this calls pathlib.Path.touch(marker): code run by merely loading the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def malicious(path, marker):
    """A .pth with real-looking weights whose pickle also creates `marker` when loaded."""
    torch.save({"model": ConvNeXtV2(TINY, num_classes=0).state_dict(), "payload": Touch(marker)}, path)
    return path


def test_a_file_that_would_run_code_is_refused_before_it_runs(tmp_path):
    path, marker = malicious(tmp_path / "evil.pth", tmp_path / "marker"), tmp_path / "marker"
    for read in (load, read_weights, describe):
        with pytest.raises(UserError) as e:
            read(path)
        assert "--trust-checkpoint" in str(e.value) and "runs code from the file" in str(e.value)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()
    load(path, trust=True)  # the flag is the only way past, and it does run the file's code
    assert marker.exists()


def test_allow_list_is_exactly_what_real_files_need():
    assert SAFE_GLOBALS == [argparse.Namespace]


def test_release_checkpoint_with_its_namespace_loads(tmp_path):
    torch.manual_seed(0)
    ours = randomize_(FCMAE(TINY, img_size=64, decoder_dim=16)).state_dict()
    path = tmp_path / "convnextv2_tiny_1k_224_fcmae.pt"
    # The release's files: {"model", "optimizer", "epoch", "scaler", "args"}, args an argparse.Namespace.
    torch.save({**release_checkpoint(ours), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="convnextv2_tiny", input_size=224,
                                                                       mask_ratio=0.6, norm_pix_loss=True)}, path)
    w = read_weights(path)
    assert (w.kind, w.model, w.in_chans, w.num_classes, w.has_ema) == ("release-pretrain", TINY, 3, 0, False)
    assert w.meta["input_size"] == 224 and w.meta["args"]["mask_ratio"] == 0.6 and w.meta["epoch"] == 1599
    for k, v in ours.items():
        if k.startswith("encoder."):
            assert torch.equal(w.state[k[len("encoder."):]], v), k
    assert set(w.encoder) == set(w.state)


def test_release_dense_checkpoint_with_ema(tmp_path):
    model, ema = randomize_(ConvNeXtV2(TINY, num_classes=4)), randomize_(ConvNeXtV2(TINY, num_classes=4), seed=1)
    path = tmp_path / "finetuned.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 99,
                "args": argparse.Namespace(input_size=64)}, path)
    for use_ema, source in ((False, model), (True, ema)):
        w = read_weights(path, ema=use_ema)
        assert (w.kind, w.num_classes, w.has_ema, w.meta["input_size"]) == ("release-finetune", 4, True, 64)
        assert all(torch.equal(w.state[k], v) for k, v in source.state_dict().items())
        assert set(w.encoder) == {k for k in w.state if not k.startswith(("norm.", "head."))}
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(UserError, match="holds no EMA weights: drop --ema"):
        read_weights(path, ema=True)


def test_timm_layout_weights_read_into_the_same_network(tmp_path):
    theirs = timm.create_model("convnextv2_atto", pretrained=False, num_classes=5).eval()
    with torch.no_grad():  # GRN's weight starts at zero in timm: give every tensor a value to carry
        for name, p in theirs.named_parameters():
            if "grn" in name or name.endswith(".bias"):
                p.normal_(0, 0.3)
    path = tmp_path / "timm.pth"
    torch.save(theirs.state_dict(), path)
    w = read_weights(path)
    assert (w.kind, w.model, w.num_classes) == ("dense", "atto", 5)
    ours = ConvNeXtV2("atto", num_classes=5).eval()
    ours.load_state_dict(w.state)  # strict: every tensor present and of the right shape
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_exports_round_trip_with_class_names(tmp_path, suffix):
    model = randomize_(ConvNeXtV2(TINY, in_chans=1, num_classes=3))
    path = tmp_path / f"classifier{suffix}"
    save_weights(path, model.state_dict(), {"kind": "classifier", "classes": ["cat", "dog", "emu"],
                                            "input_size": 64, "steps": 12})
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    w = read_weights(path)
    assert (w.kind, w.model, w.in_chans, w.num_classes, w.classes) == ("classifier", TINY, 1, 3, ["cat", "dog", "emu"])
    assert (w.meta["input_size"], w.meta["steps"], w.meta["layout"]) == (64, 12, "convnextv2-dense")
    assert all(torch.equal(w.state[k], v) for k, v in model.state_dict().items())
    line = describe(path)
    assert "\n" not in line and "classifier" in line and "in_chans 1" in line and "cat, dog, emu" in line
    assert "step 12" in line
    if suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            assert json.loads(f.metadata()["classes"]) == ["cat", "dog", "emu"]
    else:
        assert torch.load(path, weights_only=True)["meta"]["model"] == "custom"  # loads without an allow-list


def test_architecture_and_size_names():
    for name, (depths, dims) in SIZES.items():
        assert size_name(depths, dims) == name
    assert size_name([1, 1, 1, 1], [8, 16, 32, 64]) is None
    state = ConvNeXtV2("atto", in_chans=4, num_classes=0).state_dict()
    assert architecture(state) == ("atto", 4, 0)
    assert architecture(ConvNeXtV2(TINY, num_classes=7).state_dict()) == (TINY, 3, 7)


def test_unreadable_and_foreign_files_are_one_line(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(UserError, match=f"no checkpoint at {missing}: the file does not exist"):
        read_weights(missing)
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(UserError, match="cannot read .*text.pth as a checkpoint"):
        load(tmp_path / "text.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="holds a list, not a checkpoint"):
        load(tmp_path / "list.pth")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(UserError, match="no ConvNeXt V2 weights found in .*foreign.pth: pass "):
        read_weights(tmp_path / "foreign.pth")


def test_read_run_checkpoint(tmp_path):
    lightning = {"state_dict": {}, "loops": {}, "hyper_parameters": {"model": "atto"}, "global_step": 3}
    save_torch(lightning, tmp_path / "last.ckpt")
    assert read_run_checkpoint(tmp_path / "last.ckpt", "pretrain")["global_step"] == 3
    save_torch({"model": {}}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match=r"other.ckpt is not a Lightning checkpoint of `fcmae finetune`: pass one "
                                        r"to --resume \(<run>/checkpoints/last.ckpt\), or --no-resume"):
        read_run_checkpoint(tmp_path / "other.ckpt", "finetune")
    (tmp_path / "junk.ckpt").write_text("junk")
    with pytest.raises(UserError, match=r"cannot read .*junk.ckpt \(.*\): pass an fcmae pretrain checkpoint to "
                                        r"--resume, or --no-resume to start over"):
        read_run_checkpoint(tmp_path / "junk.ckpt", "pretrain")
    malicious(tmp_path / "evil.ckpt", tmp_path / "marker")
    with pytest.raises(UserError, match="--trust-checkpoint"):
        read_run_checkpoint(tmp_path / "evil.ckpt", "pretrain")
    assert not (tmp_path / "marker").exists()


@pytest.fixture
def fsyncs(monkeypatch):
    """os.fsync, recording what it was called on (file or directory)."""
    calls, real = [], os.fsync

    def fsync(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.mark.parametrize("writer", ["save_torch", "save_weights .safetensors", "save_weights .pth"])
def test_writes_are_atomic_and_fsynced(tmp_path, monkeypatch, fsyncs, writer):
    suffix = ".ckpt" if writer == "save_torch" else writer.split()[-1]
    path = tmp_path / f"file{suffix}"
    old, new = ConvNeXtV2(TINY, num_classes=2).state_dict(), ConvNeXtV2(TINY, num_classes=3).state_dict()

    def save(state):
        save_torch(state, path) if writer == "save_torch" else save_weights(path, state, {"kind": "classifier"})
    save(old)
    assert fsyncs == [str(path) + ".tmp", str(tmp_path)]  # the file's data, then the rename in its directory
    before = path.read_bytes()

    def broken(obj, target, **kwargs):  # a writer that dies halfway: some bytes out, then the disk fails
        with open(getattr(target, "name", target), "ab") as f:
            f.write(b"PK\x03\x04partial")
        raise OSError(5, "Input/output error")
    real_torch_save, real_save_file = torch.save, fcmae.checkpoints.save_file
    monkeypatch.setattr(torch, "save", broken)
    monkeypatch.setattr(fcmae.checkpoints, "save_file", broken)
    with pytest.raises(UserError, match=f"cannot write {path} .*Input/output error.*the previous checkpoint is intact"):
        save(new)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == [path.name]  # old file whole, no .tmp
    monkeypatch.setattr(torch, "save", real_torch_save)
    monkeypatch.setattr(fcmae.checkpoints, "save_file", real_save_file)
    save(new)
    assert read_weights(path).num_classes == 3
