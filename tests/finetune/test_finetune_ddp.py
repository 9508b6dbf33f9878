"""`fcmae finetune` on 2 CPU processes (gloo) under the run layer's DDP settings (gradients as
bucket views, a static graph: fcmae.training.trainer.ddp_strategy): with drop path and the EMA
copy, and as a linear probe (frozen encoder, BatchNorm without affine, LARS), both ranks end with
the same weights. The ranks train on different images, so a parameter whose gradient DDP failed
to reduce at any step would differ."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import sys, torch
    from lightning.pytorch.callbacks import Callback
    sys.path.insert(0, sys.argv[1])
    from helpers import finetune_small
    from fcmae.finetune.task import FinetuneTask
    out, data, rest = sys.argv[2], sys.argv[3], sys.argv[4:]

    class Settings(Callback):  # what torch's DDP was built with
        def on_train_start(self, trainer, pl_module):
            self.static_graph = trainer.strategy.model.static_graph
    settings, callbacks = Settings(), FinetuneTask.callbacks
    FinetuneTask.callbacks = lambda self, *a: [*callbacks(self, *a), settings]
    result = finetune_small("--data", data, "--output", out, "--devices", "2", "--batch-size", "4",
                            "--effective-batch", "8", *rest)
    module = result["module"]
    torch.save({"weights": module.state_dict(), "world": module.trainer.world_size, "step": module.global_step,
                "static_graph": settings.static_graph}, f"{out}/rank{module.global_rank}.pt")
""")

RECIPES = {"ema and drop path": ["--drop-path", "0.1", "--ema-decay", "0.5"], "linear probe": ["--linear-probe"]}


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_process_finetune_ranks_end_identical(recipe, tmp_path):
    from helpers import shapes_dataset
    data = shapes_dataset(tmp_path / "shapes", per_class=(8, 2))  # 24 train images: 3 steps of 8
    args = [*RECIPES[recipe], "--epochs", "1", "--max-steps", "3", "--warmup-epochs", "0", "--val-split", "0"]
    script = tmp_path / "ddp_finetune.py"
    script.write_text(SCRIPT)
    tests = os.path.dirname(os.path.dirname(__file__))
    result = subprocess.run([sys.executable, str(script), tests, str(tmp_path / "run"), str(data), *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["world"] == 2 and r["step"] == 3 and r["static_graph"] for r in ranks)
    a, b = (r["weights"] for r in ranks)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0  # all-reduced: bit-identical
