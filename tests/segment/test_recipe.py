"""configs/segment/<size>.yaml hold the documented recipe (docs/method.md's segmentation table), and
the library's defaults are the recipe's."""
import re
from dataclasses import fields
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fcmae import segmenter
from fcmae.decoders import upernet
from fcmae.encoders import SIZES
from fcmae.segment import module, task, transforms

ROOT = Path(__file__).resolve().parents[2]
SHARED = {"input_size": 512, "scale": None, "ratio_range": [0.5, 2.0], "cat_max_ratio": 0.75,
          "effective_batch": 16, "iterations": 160000, "warmup_iterations": 1500, "lr": 1e-4, "power": 1.0,
          "min_lr": 0.0, "weight_decay": 0.05, "betas": [0.9, 0.999], "layer_decay": 0.9, "aux_weight": 0.4,
          "channels": 512, "aux_channels": 256, "eval_every": 16000, "eval_mode": "slide", "eval_window": None,
          "tta_ratios": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "precision": "auto"}


def documented():
    """{size: (drop path, layer decay type, batch per device)} from docs/method.md's table."""
    text = (ROOT / "docs" / "method.md").read_text().split("## Segmentation recipe")[1]
    rows = re.findall(r"^\| (\w+)\s+\| ([\d.]+)\s+\| (single|group) 0\.9\s+\| (\d+)\s+\|", text, re.M)
    return {size: (float(dp), kind, int(batch)) for size, dp, kind, batch in rows}


@pytest.mark.parametrize("size", list(SIZES))
def test_recipes_match_the_documented_table(size):
    recipe = yaml.safe_load(files("fcmae.configs").joinpath("segment", f"{size}.yaml").read_text())
    assert recipe["model"] == size and {k: recipe[k] for k in SHARED} == SHARED
    assert (recipe["drop_path"], recipe["layer_decay_type"], recipe["batch_size"]) == documented()[size]
    text = files("fcmae.configs").joinpath("segment", f"{size}.yaml").read_text()
    assert ("DERIVED" in text) == (size in ("atto", "femto", "pico", "nano"))


def test_library_defaults_are_the_recipes():
    """What the recipe leaves to the library (a null scale and window) is ADE20K's at 512 px."""
    defaults = {f.name: f.default for f in fields(module.SegmentSettings)}
    keys = ("lr", "weight_decay", "layer_decay", "iterations", "warmup_iterations", "power", "min_lr", "aux_weight")
    assert {k: defaults[k] for k in keys} == {k: SHARED[k] for k in keys}
    assert defaults["betas"] == tuple(SHARED["betas"]) and list(defaults["tta_ratios"]) == SHARED["tta_ratios"]
    assert (upernet.CHANNELS, upernet.AUX_CHANNELS) == (SHARED["channels"], SHARED["aux_channels"])
    assert list(segmenter.SCALE) == [2048, 512] and list(segmenter.WINDOW) == [512, 341]
    assert list(segmenter.TTA_RATIOS) == SHARED["tta_ratios"]
    t = transforms.TrainTransform()
    assert (t.crop_size, list(t.scale), list(t.ratio_range), t.cat_max_ratio) == \
        (SHARED["input_size"], [2048, 512], SHARED["ratio_range"], SHARED["cat_max_ratio"])
    cfg = SimpleNamespace(input_size=512, scale=None, eval_window=None)
    assert task.scale_of(cfg) == (2048, 512) and task.window_of(cfg) == (512, 341)
