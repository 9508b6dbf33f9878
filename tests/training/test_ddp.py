"""Scale-out: 2-process DDP on CPU (gloo) through Lightning; both ranks must end with the same
weights, having trained on disjoint shards of the data."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import sys, torch
    from fcmae.training.flags import with_recipe
    from fcmae.commands.pretrain import build_parser, fit
    out = sys.argv[1]
    args = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--precision", "32",
            "--input-size", "64", "--batch-size", "4", "--decoder-dim", "32", "--workers", "0",
            "--backend", "sparse", "--max-steps", "3", "--lr", "1e-3", "--warmup-epochs", "0.01",
            "--vis-every", "3", "--output", out]
    trainer, module = fit(build_parser().parse_args(with_recipe("pretrain", args, "atto")))
    sampler = trainer.datamodule.sampler
    sampler.set_epoch(0)
    torch.save({"weights": module.state_dict(), "keys": list(sampler), "world": trainer.world_size,
                "step": trainer.global_step},
               f"{out}/rank{trainer.global_rank}.pt")
""")


@pytest.mark.slow
def test_two_process_ddp_ranks_end_identical(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["world"] == 2 and r["step"] == 3 for r in ranks)
    a, b = (r["weights"] for r in ranks)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0  # DDP all-reduces: bit-identical
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])  # each rank its own shard
    assert len(ranks[0]["keys"]) == 512  # 1024 demo images / 2 ranks
    # the effective batch (and so the blr scaling) counts both processes
    config = (tmp_path / "config.yaml").read_text()
    assert "effective_batch: 8" in config and "world_size: 2" in config
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "encoder.safetensors").is_file()


KNN_SCRIPT = textwrap.dedent("""
    import sys, torch
    from fcmae.training.flags import with_recipe
    from fcmae.training.monitor import KnnMonitor
    from fcmae.commands.pretrain import build_parser, fit
    data, out = sys.argv[1], sys.argv[2]
    args = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--precision", "32",
            "--data", data, "--input-size", "64", "--batch-size", "3", "--decoder-dim", "16", "--workers", "0",
            "--backend", "sparse", "--max-steps", "2", "--lr", "1e-3", "--warmup-epochs", "0", "--vis-every", "100",
            "--no-export", "--output", out, "--eval-data", data, "--knn-k", "3"]
    trainer, module = fit(build_parser().parse_args(with_recipe("pretrain", args, "atto")))
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, KnnMonitor))
    with torch.inference_mode():  # the gathered features themselves, from both ranks' shares
        from fcmae.encoders import ConvNeXtV2
        encoder = ConvNeXtV2("atto", num_classes=0)
        encoder.load_state_dict(module.model.encoder.state_dict(), strict=False)
        feats, labels = monitor.shard(monitor.val, trainer, encoder.eval(), "32-true")
    torch.save({"last": monitor.last, "encoder": module.model.encoder.state_dict(), "feats": feats, "labels": labels},
               f"{out}/knn_rank{trainer.global_rank}.pt")
""")


@pytest.mark.slow
def test_two_process_knn_monitor_equals_one_device(tmp_path):
    from helpers import labelled_images

    from fcmae.data.labelled import labelled_sets
    from fcmae.encoders import ConvNeXtV2
    from fcmae.features import embed, knn_evaluate as evaluate
    data = labelled_images(tmp_path / "shapes", classes=3, per_class=5, size=64, val_per_class=3)  # 15 / 9: uneven shares
    script = tmp_path / "knn_run.py"
    script.write_text(KNN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(data), str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"knn_rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["last"] == ranks[1]["last"] and ranks[0]["last"]["step"] == 2
    encoder = ConvNeXtV2("atto", num_classes=0)
    encoder.load_state_dict(ranks[0]["encoder"], strict=False)
    train, val, classes = labelled_sets(data, 64)
    one = evaluate(encoder.eval(), train, val, len(classes), k=3)  # the same evaluation on one device
    feats, labels = embed(encoder, torch.utils.data.DataLoader(val, batch_size=4))
    for r in ranks:  # every rank holds all 9 val features, in dataset order, as one device computes them
        assert torch.equal(r["labels"], labels)
        assert torch.allclose(r["feats"], feats, atol=1e-5)
    assert (one["top1"], one["top5"]) == (ranks[0]["last"]["top1"], ranks[0]["last"]["top5"])
