"""Weighted kNN on frozen features: the classifier, the stratified split, and `fcmae knn` on
every kind of weights we read."""
import json

import pytest
import torch
from helpers import TINY, labelled_images, randomize_, release_checkpoint

from fcmae.checkpoints import export_weights as export
from fcmae.cli import main
from fcmae.commands.knn import build_parser, knn as knn_command
from fcmae.data.labelled import labelled_sets, stratified_split
from fcmae.errors import UserError
from fcmae.features import knn_accuracy, knn_scores
from fcmae.module import PretrainModule


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One compute thread (tests/conftest.py)."""


def test_separable_features_are_classified_perfectly():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    def cloud(n):
        labels = torch.arange(4).repeat_interleave(n)
        return torch.nn.functional.normalize(centres[labels] + 0.05 * torch.randn(len(labels), 16), dim=1), labels
    (train, train_y), (val, val_y) = cloud(10), cloud(5)
    assert knn_accuracy(train, train_y, val, val_y, 4, k=20) == {"top1": 100.0, "top5": 100.0}
    shuffled = val_y[torch.randperm(len(val_y))]  # wrong labels: top-1 must drop
    assert knn_accuracy(train, train_y, val, shuffled, 4)["top1"] < 100.0


def test_votes_are_weighted_by_similarity():
    q = torch.tensor([[1.0, 0.0]])
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]]), dim=1)
    labels = torch.tensor([0, 1, 1])  # one exact match of class 0, two farther of class 1
    assert knn_scores(train, labels, q, 2, k=3, temperature=0.07).argmax().item() == 0  # sharp: the nearest wins
    assert knn_scores(train, labels, q, 2, k=3, temperature=10.0).argmax().item() == 1  # flat: the majority wins
    assert knn_scores(train, labels, q, 2, k=1).tolist()[0][1] == 0.0  # k=1: only the nearest votes


def test_stratified_split_is_per_class_disjoint_and_seeded():
    labels = [0] * 20 + [1] * 10 + [2] * 1
    kept, held = stratified_split(labels, 0.1, seed=3)
    assert sorted(kept + held) == list(range(31)) and not set(kept) & set(held)
    assert [sum(labels[i] == c for i in held) for c in range(3)] == [2, 1, 0]  # a class of one stays in kept
    assert stratified_split(labels, 0.1, seed=3) == (kept, held)
    assert stratified_split(labels, 0.1, seed=4) != (kept, held)


def test_labelled_sets_hold_out_a_split_and_cap_the_train_set(tmp_path):
    labelled_images(tmp_path, classes=3, per_class=10, size=32)
    train, val, classes = labelled_sets(tmp_path, 32, val_split=0.2)
    assert classes == ["class0", "class1", "class2"] and (len(train), len(val)) == (24, 6)
    capped, val2, _ = labelled_sets(tmp_path, 32, val_split=0.2, max_train=12)
    assert len(capped) == 12 and list(val2.indices) == list(val.indices)
    assert set(capped.indices) <= set(train.indices)
    image, label, skipped = capped[0]
    assert image.shape == (3, 32, 32) and skipped == 0


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One set of TINY encoder weights as a pre-training run directory, its export, and the
    release's pre-training layout; plus a labelled set (train/ and val/)."""
    root = tmp_path_factory.mktemp("knn")
    torch.manual_seed(0)
    module = randomize_(PretrainModule(model=TINY, backend="sparse", input_size=64, decoder_dim=16,
                                       config={"input_size": 64}))
    run_dir = root / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 5,
                "epoch": 0}, run_dir / "checkpoints" / "last.ckpt")
    exported = export(run_dir)
    release = root / "release.pt"
    torch.save(release_checkpoint(module.model.state_dict()), release)
    data = labelled_images(root / "data", classes=3, per_class=6, size=64, val_per_class=3)
    return {"run": run_dir, "export": exported, "release": release, "data": data, "root": root}


def knn(*args):
    return knn_command(build_parser().parse_args(["--input-size", "64", "--workers", "0", "--device", "cpu", *args]))


def test_knn_reads_every_kind_of_weights_the_same(weights):
    records = {}
    for kind in ("run", "export", "release"):
        out = weights["root"] / f"{kind}.json"
        records[kind] = knn("--checkpoint", str(weights[kind]), "--data", str(weights["data"]), "--k", "5",
                            "--output", str(out))
        assert json.loads(out.read_text())["top1"] == records[kind]["top1"]
        assert (records[kind]["train"], records[kind]["val"], records[kind]["classes"]) == (18, 9, 3)
    assert records["run"]["kind"] == "pretrain-checkpoint"
    # the same weights in three files: the same features, the same accuracy
    assert records["run"]["top1"] == records["export"]["top1"] == records["release"]["top1"]
    assert records["run"]["top5"] == 100.0  # 3 classes: the top-5 is every class


def test_knn_random_init_and_one_line_errors(weights, tmp_path, capsys):
    record = knn("--random-init", "--data", str(weights["data"]), "--output", str(tmp_path / "r.json"))
    assert record["random_init"] and 0 <= record["top1"] <= 100
    assert "top-1" in capsys.readouterr().out
    assert main(["knn", "--random-init", "--data", str(weights["data"]), "--input-size", "64", "--workers", "0",
                 "--output", str(tmp_path / "cli.json")]) is None  # the console script exits 0
    assert json.loads((tmp_path / "cli.json").read_text())["top1"] == record["top1"]
    with pytest.raises(UserError, match="exactly one of"):
        knn("--random-init", "--checkpoint", str(weights["run"]), "--data", str(weights["data"]))
    with pytest.raises(SystemExit) as exit_info:
        main(["knn", "--checkpoint", str(weights["run"]), "--data", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "--data" in capsys.readouterr().err
    with pytest.raises(UserError, match="--eval-data .*no .*train folder"):
        from fcmae.training.monitor import KnnMonitor
        KnnMonitor(str(tmp_path), tmp_path)


# ----------------------------------------------------------------------------- the pre-training monitor

def test_pretraining_logs_knn_each_evaluation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fcmae.commands.pretrain import build_parser as pretrain_parser, fit
    from fcmae.training.flags import with_recipe
    data = labelled_images(tmp_path / "shapes", classes=3, per_class=6, size=64)  # train/ only: a split is held out
    out = tmp_path / "run"
    args = ["--data", str(data), "--input-size", "64", "--batch-size", "4", "--decoder-dim", "16", "--workers", "0",
            "--accelerator", "cpu", "--devices", "1", "--precision", "32", "--backend", "sparse", "--epochs", "2",
            "--warmup-epochs", "0", "--lr", "1e-3", "--vis-every", "100", "--no-export", "--output", str(out),
            "--eval-data", str(data), "--eval-every", "1", "--eval-val-split", "0.34", "--eval-max-train", "9",
            "--knn-k", "5"]
    trainer, _ = fit(pretrain_parser().parse_args(with_recipe("pretrain", args, "atto")))
    assert trainer.global_step == 8  # 18 images / batch 4 = 4 steps per epoch
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/knn_top1" in r]
    assert [r["step"] for r in evals] == [4, 8]  # after each epoch; the end (step 8) is not evaluated twice
    assert all(0 <= r["eval/knn_top1"] <= r["eval/knn_top5"] == 100.0 for r in evals)
    assert evals[0]["eval/train_images"] == 9 and evals[0]["eval/val_images"] == 6
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    logged = events.Scalars("eval/knn_top1")
    assert [e.step for e in logged] == [4, 8]
    assert [e.value for e in logged] == pytest.approx([r["eval/knn_top1"] for r in evals])
