"""scripts/gpu_check.py on CPU: a part runs in its own process and its figures land in the JSON;
a part that needs CUDA is recorded as not run."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def gpu_check(tmp_path, *args):
    out = tmp_path / "figures.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out), *args],
                         capture_output=True, text=True, timeout=120)
    return run, json.loads(out.read_text())


def test_the_cpu_parts_write_their_figures(tmp_path):
    run, report = gpu_check(tmp_path, "--only", "agreement", "fsdp_policy")
    assert run.returncode == 0, run.stderr[-2000:]
    agreement = report["parts"]["agreement"]
    assert agreement["sparse vs dense bf16"]["within"] and agreement["sparse vs dense fp32"]["within"]
    assert 0 < agreement["sparse vs dense fp32"]["gradients"] <= agreement["tolerances"]["gradients"]
    assert "CPU autocast" in report["parts"]["fsdp_policy"]["not_run"]
    assert report["device"] == "cpu" and report["seconds"] > 0
