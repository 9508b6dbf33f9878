"""configs/segment/<size>.yaml hold the documented recipe (docs/method.md's segmentation table), and
the library's defaults are the recipe's."""
import inspect
import re
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from fcmae.encoders import SIZES
from fcmae import segmenter
from fcmae.decoders import upernet
from fcmae.segment import module, transforms

ROOT = Path(__file__).resolve().parents[2]
SHARED = {"input_size": 512, "scale": [2048, 512], "ratio_range": [0.5, 2.0], "cat_max_ratio": 0.75,
          "effective_batch": 16, "iterations": 160000, "warmup_iterations": 1500, "lr": 1e-4, "power": 1.0,
          "min_lr": 0.0, "weight_decay": 0.05, "betas": [0.9, 0.999], "layer_decay": 0.9, "aux_weight": 0.4,
          "channels": 512, "aux_channels": 256, "eval_every": 16000, "eval_window": [512, 341],
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
    defaults = {name: p.default for name, p in inspect.signature(module.SegmentModule.__init__).parameters.items()}
    assert {k: defaults[k] for k in ("lr", "weight_decay", "layer_decay", "iterations", "warmup_iterations",
                                     "power", "min_lr", "aux_weight")} == \
        {k: SHARED[k] for k in ("lr", "weight_decay", "layer_decay", "iterations", "warmup_iterations", "power",
                                "min_lr", "aux_weight")}
    assert defaults["betas"] == tuple(SHARED["betas"])
    assert (upernet.CHANNELS, upernet.AUX_CHANNELS) == (SHARED["channels"], SHARED["aux_channels"])
    assert list(segmenter.SCALE) == SHARED["scale"] and list(segmenter.WINDOW) == SHARED["eval_window"]
    assert list(segmenter.TTA_RATIOS) == SHARED["tta_ratios"]
    t = transforms.TrainTransform()
    assert (t.crop_size, list(t.scale), list(t.ratio_range), t.cat_max_ratio) == \
        (SHARED["input_size"], SHARED["scale"], SHARED["ratio_range"], SHARED["cat_max_ratio"])
