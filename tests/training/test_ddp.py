"""Scale-out: 2-process DDP on CPU (gloo) through Lightning, with the run layer's DDP settings
(gradients as bucket views, a static graph: fcmae.training.trainer.ddp_strategy); both ranks must
end with the same weights, having trained on disjoint shards of the data, and with the weights
one process trains on the same samples (the union of the ranks' batches), accumulation included."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import sys, torch
    from lightning.pytorch.callbacks import Callback
    from fcmae.training.flags import with_recipe
    from fcmae.training.pretrain import PretrainTask
    from fcmae.commands.pretrain import build_parser, fit
    out = sys.argv[1]

    class Settings(Callback):  # what torch's DDP was built with
        def on_train_start(self, trainer, pl_module):
            ddp = trainer.strategy.model
            self.seen = {"static_graph": ddp.static_graph, "gradient_as_bucket_view": ddp.gradient_as_bucket_view}
    settings, callbacks = Settings(), PretrainTask.callbacks
    PretrainTask.callbacks = lambda self, *a: [*callbacks(self, *a), settings]
    args = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", *sys.argv[2:], "--output", out]
    trainer, module = fit(build_parser().parse_args(with_recipe("pretrain", args, "atto")))
    sampler = trainer.datamodule.sampler
    sampler.set_epoch(0)
    torch.save({"weights": module.state_dict(), "keys": list(sampler), "world": trainer.world_size,
                "step": trainer.global_step, **settings.seen},
               f"{out}/rank{trainer.global_rank}.pt")
""")


# 3 optimizer steps on batches of 4 per rank.
DDP_RUN = ["--precision", "32", "--input-size", "64", "--decoder-dim", "32", "--workers", "0", "--backend", "sparse",
           "--max-steps", "3", "--lr", "1e-3", "--warmup-epochs", "0.01", "--vis-every", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_process_ddp_ranks_end_identical_and_as_one_process(tmp_path, accumulate):
    from fcmae.commands.pretrain import build_parser, fit
    from fcmae.training.flags import with_recipe
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [*DDP_RUN, "--accumulate", str(accumulate)]
    result = subprocess.run([sys.executable, str(script), str(tmp_path), *run, "--batch-size", "4"], env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["world"] == 2 and r["step"] == 3 for r in ranks)
    # the run layer's DDP settings (torch's static graph fails under accumulation's no_sync)
    assert all(r["gradient_as_bucket_view"] and r["static_graph"] == (accumulate == 1) for r in ranks)
    a, b = (r["weights"] for r in ranks)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0  # DDP all-reduces: bit-identical
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])  # each rank its own shard
    assert len(ranks[0]["keys"]) == 512  # 1024 demo images / 2 ranks
    # the effective batch (and so the blr scaling) counts both processes
    config = (tmp_path / "config.yaml").read_text()
    assert f"effective_batch: {8 * accumulate}" in config and "world_size: 2" in config
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "encoder.safetensors").is_file()

    # One process on batches of 8: the same samples at every accumulation step (rank r takes
    # every 2nd key of the permutation), so the same gradients up to summation order.
    args = ["--accelerator", "cpu", "--devices", "1", *run, "--batch-size", "8", "--no-export",
            "--output", str(tmp_path / "one")]
    _, one = fit(build_parser().parse_args(with_recipe("pretrain", args, "atto")))
    c = one.state_dict()
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-5  # float32 round-off through AdamW


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
