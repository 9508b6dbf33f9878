"""`fcmae segment` on 2 CPU processes (gloo) and stopped by a scheduler's SIGTERM.

DDP: the ranks train on different images with SyncBatchNorm and end with the same weights; the
validation shares are uneven (3 images on 2 ranks) and the confusion matrix is summed over the
ranks, so the mIoU both ranks report is that of all 3 images, once each: `fcmae eval` of the
written segmenter in one process gives the same figure.

Preemption: SIGTERM mid-run leaves checkpoints/last.ckpt at the step reached, exit code 143 and no
segmenter file; the same command then continues to the end of the run."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import segment_args, segmentation_images

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from helpers import segment_small
    out, data = sys.argv[2], sys.argv[3]
    result = segment_small("--data", data, "--output", out, "--devices", "2", "--effective-batch", "4",
                           "--iterations", "3", "--eval-every", "3", "--drop-path", "0.1")
    module = result["module"]
    torch.save({"weights": module.state_dict(), "world": module.trainer.world_size, "step": module.global_step,
                "history": result["history"]}, f"{out}/rank{module.global_rank}.pt")
""")


def test_two_process_segment_ranks_agree_on_weights_and_on_the_whole_validation(tmp_path):
    data = segmentation_images(tmp_path / "d", train=8, val=3, size=64, classes=4)
    script = tmp_path / "ddp_segment.py"
    script.write_text(SCRIPT)
    tests = os.path.dirname(os.path.dirname(__file__))
    result = subprocess.run([sys.executable, str(script), tests, str(tmp_path / "run"), str(data)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["world"] == 2 and r["step"] == 3 for r in ranks)
    a, b = (r["weights"] for r in ranks)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0  # all-reduced: bit-identical
    assert ranks[0]["history"][-1]["mIoU"] == ranks[1]["history"][-1]["mIoU"]

    from fcmae.commands.eval import build_parser, evaluate
    scores = evaluate(build_parser().parse_args(["--checkpoint", str(tmp_path / "run" / "segmenter.safetensors"),
                                                 "--data", str(data), "--accelerator", "cpu", "--workers", "0",
                                                 "--precision", "32"]))
    assert scores["images"] == 3 and abs(scores["mIoU"] - ranks[0]["history"][-1]["mIoU"]) <= 1e-6


def shown_step(log):
    """The last optimizer step the progress lines printed (stdout is a file: a line per --log-every)."""
    counts = re.findall(rb"^step (\d+)/", log.read_bytes(), re.M) if log.exists() else []
    return int(counts[-1]) if counts else 0


def test_sigterm_leaves_last_ckpt_and_the_rerun_finishes(tmp_path):
    data = segmentation_images(tmp_path / "d", train=8, val=2, size=64, classes=4)
    run, log = tmp_path / "run", tmp_path / "first.log"
    argv = [sys.executable, "-m", "fcmae.cli", *segment_args("--data", data, "--output", run, "--iterations", 60,
                                                              "--eval-every", 1000, "--ckpt-every", 1000)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "wb") as f:
        child = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while shown_step(log) < 3 and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert child.poll() is None and shown_step(log) >= 3, log.read_text(errors="replace")[-3000:]
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 143, log.read_text(errors="replace")[-3000:]  # 128 + SIGTERM
    last = run / "checkpoints" / "last.ckpt"
    k = torch.load(last, weights_only=True)["global_step"]
    assert 3 <= k < 60
    text = log.read_text(errors="replace")
    assert f"fcmae: stopped by SIGTERM at step {k}; checkpoint saved to {last}" in text
    assert not (run / "segmenter.safetensors").exists()  # a stopped run writes no final files

    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {last}" in rerun.stdout
    assert torch.load(last, weights_only=True)["global_step"] == 60 and (run / "segmenter.safetensors").is_file()
