"""`fcmae analyze`: the paper's feature cosine distance, per block, and its plots."""
import math

import pytest
import torch

from fcmae.features import cosine_distance


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One compute thread (tests/conftest.py)."""


def gram_distance(x):
    """The definition spelled out: the full Gram matrix of the normalized channel vectors."""
    v = torch.nn.functional.normalize(x.flatten(1).double(), dim=1)  # (C, HW)
    return ((1 - v @ v.T) / 2).mean().item()


def test_identical_channels_have_distance_zero():
    x = torch.rand(1, 1, 7, 7).expand(2, 64, 7, 7) * torch.rand(2, 64, 1, 1)  # scaled copies of one map
    assert cosine_distance(x).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_disjoint_channels_have_distance_half_of_c_minus_one_over_c():
    c = 16
    x = torch.zeros(1, c, 4, 8)
    for i in range(c):  # channel i lives on position i only
        x[0, i].view(-1)[i] = 1 + i
    assert cosine_distance(x).item() == pytest.approx(0.5 * (c - 1) / c, abs=1e-6)


def test_random_gaussian_channels_are_close_to_orthogonal_and_match_the_gram_matrix():
    torch.manual_seed(0)
    c = 64
    x = torch.randn(3, c, 28, 28)
    d = cosine_distance(x)
    assert d.shape == (3,)
    assert d.tolist() == pytest.approx([0.5 * (c - 1) / c] * 3, abs=2e-3)
    assert d.tolist() == pytest.approx([gram_distance(x[i]) for i in range(3)], abs=1e-5)
    # ReLU'd Gaussians are correlated (expected cosine 1/pi): a lower distance, exactly the definition's
    y = x.relu()
    assert cosine_distance(y)[0].item() == pytest.approx(gram_distance(y[0]), abs=1e-5)
    assert cosine_distance(y)[0].item() == pytest.approx((1 - 1 / math.pi) / 2 * (c - 1) / c, abs=5e-3)


# ----------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """TINY weights as a pre-training run directory and in the release's layout, and images."""
    from helpers import TINY, labelled_images, randomize_, release_checkpoint

    from fcmae.module import PretrainModule
    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    module = randomize_(PretrainModule(model=TINY, backend="sparse", input_size=64, decoder_dim=16,
                                       config={"input_size": 64}))
    (root / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3},
               root / "run" / "checkpoints" / "last.ckpt")
    torch.save(release_checkpoint(module.model.state_dict()), root / "release.pt")
    labelled_images(root / "data", classes=3, per_class=4, size=64)
    return root


def analyze(*args):
    from fcmae.commands.analyze import analyze as analyze_command, build_parser
    return analyze_command(build_parser().parse_args(["--input-size", "64", "--workers", "0", "--device", "cpu", *args]))


def test_images_are_spread_over_the_classes(checkpoints):
    from fcmae.commands.analyze import pick_images
    picked = pick_images(checkpoints / "data", 6)
    assert [p.parent.name for p in picked] == ["class0", "class1", "class2"] * 2


def test_analyze_writes_the_table_and_both_plots(checkpoints, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "out"
    record = analyze("--checkpoint", str(checkpoints / "run"), "--checkpoint", str(checkpoints / "release.pt"),
                     "--random-init", "--data", str(checkpoints / "data"), "--images", "5", "--output", str(out))
    assert record["images"] == 5 and record["layer"] == "2.1"  # TINY: 3 blocks in stage 2
    run_blocks, release_blocks, random_blocks = (e["blocks"] for e in record["encoders"].values())
    assert list(run_blocks) == ["0.0", "0.1", "1.0", "1.1", "2.0", "2.1", "2.2", "3.0", "3.1"]
    assert list(random_blocks) == list(run_blocks)  # random init: the checkpoint's architecture, untrained
    flat = {name: [v for d in blocks.values() for v in (d["expansion"], d["output"])]
            for name, blocks in (("run", run_blocks), ("release", release_blocks), ("random", random_blocks))}
    assert flat["run"] == pytest.approx(flat["release"], abs=1e-6)  # the same weights in two layouts
    assert all(0 <= v <= 0.5 for v in flat["random"])
    assert flat["run"] != pytest.approx(flat["random"], abs=1e-3)
    csv_lines = (out / "distances.csv").read_text().splitlines()
    assert csv_lines[0] == "encoder,block,layer_index,expansion,output" and len(csv_lines) == 1 + 3 * 9
    assert csv_lines[1].startswith("run,0.0,0.0,") and csv_lines[9].startswith("run,3.1,1.0,")
    for png in ("collapse.png", "activations.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.width > 200
    assert "feature cosine distance per block" in capsys.readouterr().out


def test_analyze_one_line_errors(checkpoints, tmp_path):
    from fcmae.errors import UserError
    with pytest.raises(UserError, match="nothing to analyze"):
        analyze("--data", str(checkpoints / "data"))
    with pytest.raises(UserError, match="no such block"):
        analyze("--random-init", "--data", str(checkpoints / "data"), "--images", "1", "--layer", "7.0",
                "--output", str(tmp_path))
