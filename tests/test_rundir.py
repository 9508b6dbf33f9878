"""Run directories keep the layout that main 4359032 wrote (tests/fixtures/rundir_4359032.json:
its file names, the keys of its checkpoints, hyper_parameters, callbacks' state, config.yaml,
metrics.jsonl and exports, recorded by running `make_runs` on that commit), and a run directory of
that layout still resumes, exports, and loads with --pretrained, eval and predict.

Together the two say that what 4359032 wrote loads here: the first pins what the files hold,
the second that the code reads it. To record the fixture again on another commit, with that
commit's fcmae installed: `python tests/test_rundir.py OUT.json` (run from outside the checkout).
"""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import labelled_images
from safetensors import safe_open

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "rundir_4359032.json"
HARDWARE = ["--workers", "0", "--accelerator", "cpu", "--devices", "1", "--precision", "32"]
PRETRAIN = ["--model", "atto", "--input-size", "64", "--batch-size", "4", "--decoder-dim", "32", "--epochs", "2",
            "--ckpt-every", "2", "--vis-every", "2", "--save-every-epochs", "1", "--backend", "sparse", *HARDWARE]
FINETUNE = ["--model", "atto", "--input-size", "32", "--batch-size", "4", "--epochs", "2", "--aa", "null",
            "--reprob", "0", *HARDWARE]


def fcmae(*args):
    """`fcmae ARGS` in this process (the console script's code)."""
    from fcmae.cli import main
    main([str(a) for a in args])


def make_runs(root):
    """A pre-training run (kNN monitor, periodic and last checkpoints, export) and a fine-tuning
    run from its encoder (held-out validation split, EMA, best checkpoint, report)."""
    root = Path(root)
    torch.set_num_threads(1)
    data = labelled_images(root / "data", classes=2, per_class=6, size=64)
    fcmae("pretrain", *PRETRAIN, "--data", data / "train", "--eval-data", data, "--max-steps", "3",
          "--output", root / "pretrain")
    fcmae("finetune", *FINETUNE, "--data", data, "--pretrained", root / "pretrain" / "encoder.safetensors",
          "--max-steps", "3", "--output", root / "finetune")
    return root


def digest(shapes):
    """Tensor names and shapes ({name: shape}), as a count and a short hash: the names, not the
    values, are the layout."""
    items = sorted(f"{k}:{tuple(shape)}" for k, shape in shapes.items())
    return {"tensors": len(items), "sha256": hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]}


def checkpoint_layout(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    return {"keys": sorted(ckpt), "unsafe_globals": torch.serialization.get_unsafe_globals_in_checkpoint(path),
            "hyper_parameters": sorted(hparams), "config": sorted(hparams.get("config") or {}),
            "callbacks": sorted(ckpt["callbacks"]), "state_dict": digest({k: v.shape for k, v in ckpt["state_dict"].items()}),
            "optimizer_groups": [[sorted(k for k in g if k != "params"), len(g["params"])]
                                 for s in ckpt["optimizer_states"] for g in s["param_groups"]],
            "loops": sorted(ckpt["loops"]), "global_step": ckpt["global_step"], "epoch": ckpt["epoch"]}


def layout(root):
    """What the run directories under `root` hold, in names and keys (JSON-able)."""
    out = {}
    for run in ("pretrain", "finetune"):
        folder = Path(root) / run
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        info = {"files": [("tensorboard/events.*" if "tfevents" in f else f) for f in files]}
        for f in files:
            path = folder / f
            if f.endswith(".ckpt"):
                info[f] = checkpoint_layout(path)
            elif f.endswith(".safetensors"):
                with safe_open(str(path), "pt") as st:
                    meta = st.metadata()
                    info[f] = {"metadata": sorted(meta), "config": sorted(json.loads(meta.get("config", "{}"))),
                               "state": digest({k: st.get_slice(k).get_shape() for k in st.keys()})}
            elif f == "config.yaml":
                info[f] = sorted(yaml.safe_load(path.read_text()))
            elif f == "metrics.jsonl":
                info[f] = sorted({tuple(sorted(json.loads(line))) for line in path.read_text().splitlines()})
        for entry in info.values():  # a resolved configuration saved again: said once
            if isinstance(entry, dict) and entry.get("config") == info.get("config.yaml"):
                entry["config"] = "the keys of config.yaml"
        out[run] = info
    return json.loads(json.dumps(out))  # tuples as lists, as the fixture holds them


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        yield make_runs(tmp_path_factory.mktemp("runs"))
    finally:
        torch.set_num_threads(threads)


# Settings added to the resolved configuration since 4359032, on purpose: a run of that layout
# lacks them and resumes with their defaults (the next test).
ADDED_SETTINGS = {"channels_last",  # --channels-last
                  "world_size"}  # fine-tuning records its device count, as pre-training does


def without_added_settings(found, expected):
    """`found` with ADDED_SETTINGS taken out of every list of configuration keys the fixture lacks them in."""
    for run, info in found.items():
        for name, entry in info.items():
            old = expected.get(run, {}).get(name)
            if name == "config.yaml" and isinstance(old, list):
                info[name] = [k for k in entry if k in old or k not in ADDED_SETTINGS]
            elif isinstance(entry, dict) and isinstance(entry.get("config"), list) and isinstance(old, dict):
                entry["config"] = [k for k in entry["config"] if k in old.get("config", []) or k not in ADDED_SETTINGS]
    return found


def test_run_directories_keep_the_layout_of_4359032(runs):
    expected = json.loads(FIXTURE.read_text())
    found = without_added_settings(layout(runs), expected)
    for run in expected:
        assert found[run]["files"] == expected[run]["files"], run
        for name, value in expected[run].items():
            assert found[run][name] == value, (run, name)
    assert found == expected


def test_a_run_of_that_layout_resumes_exports_and_loads(runs, tmp_path, capsys):
    from fcmae.checkpoints import read_weights
    pretrain, finetune, data = runs / "pretrain", runs / "finetune", runs / "data"
    fcmae("pretrain", *PRETRAIN, "--data", data / "train", "--max-steps", "5", "--output", pretrain)  # resumes at 3
    assert torch.load(pretrain / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    fcmae("export", pretrain / "checkpoints" / "last.ckpt", "--output", tmp_path / "encoder.safetensors")
    assert read_weights(tmp_path / "encoder.safetensors").kind == "encoder"
    for source in (pretrain / "checkpoints" / "last.ckpt", tmp_path / "encoder.safetensors"):
        fcmae("finetune", *FINETUNE, "--data", data, "--pretrained", source, "--max-steps", "1",
              "--output", tmp_path / f"ft-{source.stem}")
        assert "loaded" in capsys.readouterr().out
    fcmae("finetune", *FINETUNE, "--data", data, "--max-steps", "4", "--output", finetune)  # resumes at 3
    assert torch.load(finetune / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    fcmae("eval", "--checkpoint", finetune / "checkpoints" / "last.ckpt", "--data", data / "train",
          *HARDWARE[:2], "--accelerator", "cpu", "--confusion", tmp_path / "confusion.png")
    assert "top-1" in capsys.readouterr().out
    fcmae("predict", "--checkpoint", finetune / "classifier.safetensors", data / "train",
          "--output", tmp_path / "predictions.csv", "--workers", "0", "--device", "cpu")
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 and rows[1].split(",")[1] in ("class0", "class1")


if __name__ == "__main__":  # record the fixture with the installed fcmae
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        Path(sys.argv[1]).write_text(json.dumps(layout(make_runs(tmp)), indent=0, sort_keys=True) + "\n")
