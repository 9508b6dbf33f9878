"""`fcmae bench` runs and prints a well-formed JSON line (structure only: no timing assertions)."""
import json

import pytest

from fcmae.commands import bench
from fcmae.errors import UserError
from fcmae.profiling import KINDS


def parse(args):
    return bench.build_parser().parse_args(args)


def test_bench_one_step_json_line(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    cfg = parse(["--model", "atto", "--input-size", "64", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                 "--backends", "[dense,sparse]", "--mask-ratio", "[0.5,0.75]", "--json", str(out_file)])
    assert bench.run(cfg) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert json.loads(out_file.read_text()) == result
    assert any("x dense" in line for line in lines[:-1]), "a table comes before the JSON line"
    for key in ("model", "input_size", "batch_size", "device", "precision", "steps", "warmup", "threads",
                "visible_flops", "decoder_loss_s", "state_mb", "auto", "fastest", "results"):
        assert key in result
    assert result["auto"] in ("dense", "sparse", "minkowski")
    breakdown = result["breakdown"]  # on by default on the CPU: one profiled step per backend
    assert set(breakdown["backends"]) == {"dense", "sparse"} and breakdown["matmul_rate_flop_per_s"] > 0
    for b in breakdown["backends"].values():
        assert set(b["seconds"]) == set(KINDS) and b["seconds"]["matrix products"] > 0
        assert sum(b["seconds"].values()) == pytest.approx(b["wall_s"], rel=0.05)
    assert sum("of this machine's" in line for line in lines) == 2, "each backend's matmul share of the rate"
    assert set(result["visible_flops"]) == {"encoder_fwd", "decoder_fwd", "step"}
    rows = result["results"]
    assert [(r["mask_ratio"], r["backend"]) for r in rows] == [
        (0.5, "dense"), (0.5, "sparse"), (0.75, "dense"), (0.75, "sparse")]
    for r in rows:
        for key in ("images_per_s", "step_s", "optimizer_s", "ratio_to_dense", "peak_memory_mb", "gflop_per_s"):
            assert isinstance(r[key], float) and r[key] > 0, (key, r[key])
        if r["backend"] == "dense":
            assert r["ratio_to_dense"] == 1.0


def test_bench_runs_as_training_does(capsys, monkeypatch):
    """Training's AdamW, TF32 matrix products and cuDNN's autotuning; one warm-up step on CPU by default."""
    import torch
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        result = bench.run_bench(parse(["--model", "atto", "--input-size", "64", "--batch-size", "2", "--steps", "1",
                                        "--backends", "[dense]", "--no-memory"]))
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    finally:
        torch.set_float32_matmul_precision(precision)
    assert result["warmup"] == 1 and result["optimizer"] == "AdamW (fused)"


def test_visible_flops_match_model_flops():
    """At mask ratio 0 the encoder's count is the usual model FLOPs (tiny: 4.47 G multiply-adds,
    the paper's table (docs/method.md), which include the 0.8 M of the classifier head we do not have)."""
    f = bench.visible_flops("tiny", 224, 1, 0.0)
    assert f["encoder_fwd"] / 2 == pytest.approx(4.47e9, rel=0.01)
    assert bench.visible_flops("tiny", 224, 1, 0.6)["encoder_fwd"] < 0.45 * f["encoder_fwd"]


@pytest.mark.parametrize("args,match", [
    (["--device", "cuda:0"], "no CUDA device|needs --device cuda"),
    (["--precision", "fp16"], "fp16 needs --device cuda"),
    (["--input-size", "48"], "multiple of 32"),
    (["--mask-ratio", "[1.0]"], "must be in"),
])
def test_bench_user_errors(args, match):
    import torch
    if args[:2] == ["--device", "cuda:0"] and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UserError, match=match):
        bench.run(parse(["--model", "atto", "--steps", "1", "--warmup", "0", *args]))


class _Broken:
    """A backend that cannot run this combination: its kernels raise, as MinkowskiEngine's did
    under autocast before its convolutions ran in float32."""
    name = "minkowski"

    def __init__(self, reason=None):
        self.reason = reason

    def unavailable(self, device=None):
        return self.reason

    def forward(self, encoder, imgs, visible):
        raise RuntimeError("convolution_cpu.cpp:63, assertion failed. type mismatch")


@pytest.mark.parametrize("reason", [None, "backend 'minkowski' needs MinkowskiEngine, which is not installed"])
def test_bench_marks_a_backend_that_cannot_run_skipped(monkeypatch, capsys, reason):
    """Not installed (the registry says why) or failing at its first step: the backend is
    listed as skipped with the reason, in the table and the JSON; the others are timed."""
    from fcmae.encoders import BACKENDS
    monkeypatch.setitem(BACKENDS, "minkowski", _Broken(reason))
    result = bench.run_bench(parse(["--model", "atto", "--input-size", "64", "--batch-size", "2", "--steps", "2",
                                    "--warmup", "0", "--no-memory", "--backends", "[dense,sparse,minkowski]"]))
    assert [r["backend"] for r in result["results"]] == ["dense", "sparse"]
    expected = reason or "RuntimeError: convolution_cpu.cpp:63, assertion failed. type mismatch"
    assert result["skipped"] == {"minkowski": expected}
    table = capsys.readouterr().out
    assert f"minkowski  skipped: {expected}" in table


def test_compile_auto_leaves_off_the_backends_it_slows():
    """--compile auto compiles only where it measured faster (bench.COMPILE_PAYS) and says why the
    rest runs eager; on compiles every backend, off none."""
    every = {"dense", "sparse", "minkowski"}
    assert bench.compiled_backends("auto", "cpu", every) == {"dense"}
    assert bench.compiled_backends("on", "cpu", every) == every
    assert bench.compiled_backends("off", "cuda", every) == set()
    assert "minkowski" not in bench.compiled_backends("auto", "cuda", every)
    line = bench.compile_line(["dense", "sparse", "minkowski"], {"dense"})
    assert line.startswith("--compile auto: compiled dense; eager: sparse (torch.compile measured slower")
    assert "minkowski (MinkowskiEngine" in line


def test_compile_auto_prints_its_choice(capsys, monkeypatch):
    """The choice and its line (torch.compile itself stubbed: compiling takes minutes on CPU)."""
    compiled = []
    monkeypatch.setattr(bench.torch, "compile", lambda model: compiled.append(model) or model)
    result = bench.run_bench(parse(["--model", "atto", "--input-size", "64", "--batch-size", "2", "--steps", "1",
                                    "--warmup", "0", "--backends", "[sparse]", "--no-memory", "--no-breakdown",
                                    "--compile", "auto"]))
    assert result["compiled"] == ["dense"] and len(compiled) == 1 and "breakdown" not in result
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("--compile auto")] == [
        "--compile auto: compiled dense; eager: sparse (" + bench.EAGER_BECAUSE["sparse"] + ")"]
