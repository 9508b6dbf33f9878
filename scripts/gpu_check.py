"""What a machine with a GPU has to confirm, in one run of under 8 minutes, into one JSON file of
figures. scripts/gpu_check.sh installs what the machine lacks, then runs this.

    python scripts/gpu_check.py --device cuda --json gpu_check.json
    python scripts/gpu_check.py --device cpu --quick              # the parts a CPU can run, in a minute

Each part runs in a process of its own under its own time limit, so a part that fails or hangs
(a CUDA error, a command this checkout lacks) is recorded with its error and the next one runs;
a part that cannot run here, or is not started by `--budget` seconds, is recorded as `not_run`. The JSON is rewritten after
every part. Parts (`PARTS`):

- bench_tiny, bench_base: `fcmae bench` in bf16 with every backend that runs here; *_compile: with --compile on
  (every backend compiled: what `--compile auto` should pick on CUDA).
- pretrain: 100 steps of `fcmae pretrain --precision bf16-mixed` on the demo data: images/s, loss.
- segment: 20 steps of `fcmae segment` on generated images and masks, where the command exists.
- syncs: host-device syncs per training step through Lightning (fcmae.profiling.StepSyncs), 20
  steps of dense and of sparse; CUDA: torch.cuda.set_sync_debug_mode("warn"), by Python line.
  Expected on steps that write no logs: 1, the finite check (docs/internals.md).
- kernels: the profiler's top kernels of one sparse bf16 training step (which depthwise kernel runs).
- depthwise: which backward of the 7x7 depthwise conv is faster here, per stage shape of tiny and
  precision: `native` (torch's own: cuDNN on CUDA) or `swapped` (encoders/depthwise.py, batch and
  channels swapped); the faster is what `depthwise.BACKWARD` should say for this device type.
- agreement: bf16 sparse vs dense, and vs float32 dense: encoder output and parameter gradients
  within the mixed-precision tolerances of the tests (tests/helpers.py).
- fsdp_policy: FCMAE under the run's FSDP mixed-precision policy (torch FSDP on one rank) vs float32.
- fsdp_2rank: `fcmae pretrain --strategy fsdp --devices 2`, 5 steps per backend, with 2 GPUs or more.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the mixed-precision tolerances and the TINY size live there


# ----------------------------------------------------------------------------- parts

def bench(model, compile_=False):
    def part(cuda, quick, tmp):
        from fcmae.commands import bench as fcmae_bench
        if cuda:
            size = ["--model", model, "--batch-size", "64" if model == "tiny" else "32", "--device", "cuda"]
            size += ["--steps", "5", "--warmup", "3"] if compile_ else ["--steps", "10"]
        else:
            size = ["--model", "atto", "--input-size", "64", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                    "--no-memory"]
        args = [*size, "--precision", "bf16", *(["--compile", "on"] if compile_ else []), "--json", str(tmp / "bench.json")]
        result = fcmae_bench.run_bench(fcmae_bench.build_parser().parse_args(args))
        keep = ("backend", "images_per_s", "step_s", "ratio_to_dense", "peak_memory_mb", "gflop_per_s")
        return {"args": args[:-2], "rows": [{k: r[k] for k in keep} for r in result["results"]],
                **{k: result[k] for k in ("skipped", "auto", "fastest", "optimizer", "warmup", "device_name")}}
    return part


def pretrain_args(cuda, quick, output, *more):
    """`fcmae pretrain` on the demo data, parsed as the command parses it."""
    from fcmae.commands.pretrain import DEFAULT_MODEL, build_parser
    from fcmae.training.flags import with_recipe
    device = ["--devices", "1", "--workers", "8"] if cuda else ["--accelerator", "cpu", "--devices", "1", "--workers",
                                                               "0", "--input-size", "64", "--batch-size", "4"]
    if quick:
        device += ["--decoder-dim", "32"]
    args = [*device, "--no-resume", "--no-export", "--vis-every", "1000", "--ckpt-every", "1000", "--output",
            str(output), *more]
    return build_parser().parse_args(with_recipe("pretrain", args, DEFAULT_MODEL))


def pretrain(cuda, quick, tmp):
    from fcmae.commands.pretrain import fit
    steps = 5 if quick else 100
    start = time.perf_counter()
    trainer, _ = fit(pretrain_args(cuda, quick, tmp / "pretrain", "--precision", "bf16-mixed", "--max-steps",
                                   str(steps), "--log-every", str(min(10, steps))))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {"steps": trainer.global_step, "train_seconds": time.perf_counter() - start,
            "backend": trainer.lightning_module.hparams.backend, "loss": metrics.get("train/loss"),
            "images_per_s": metrics.get("train/images_per_sec")}


def segment(cuda, quick, tmp):
    from fcmae.cli import COMMANDS
    if "segment" not in COMMANDS:
        return {"not_run": "this checkout has no `fcmae segment`"}
    data = segmentation_data(tmp / "seg")
    device = [] if cuda else ["--accelerator", "cpu"]
    args = ["segment", "--data", str(data), "--model", "atto", "--input-size", "64", "--batch-size", "4",
            "--max-steps", "5" if quick else "20", "--log-every", "5", "--val-split", "0", "--precision", "bf16-mixed",
            "--workers", "2",
            "--devices", "1", "--no-resume", "--output", str(tmp / "segment"), *device]
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "fcmae.cli", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"exit {run.returncode}: {run.stderr.strip()[-1500:]}")
    if not (tmp / "segment" / "segmenter.safetensors").is_file():
        raise RuntimeError("the run ended without writing segmenter.safetensors")
    progress = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    return {"args": args, "train_seconds": time.perf_counter() - start, "last_progress": progress[-1:]}


def segmentation_data(root, n=16, size=64):
    """n images with single-channel label maps (0: background, 1-2: a square, a disc) in the
    generic layout: root/train/images/*.png, root/train/masks/*.png."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / "train" / "images").mkdir(parents=True, exist_ok=True)
    (root / "train" / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(16, size - 16, 2).tolist() + [int(rng.integers(6, 14))]
        label = 1 + i % 2
        inside = (abs(yy - cy) < r) & (abs(xx - cx) < r) if label == 1 else (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        mask = np.where(inside, label, 0).astype(np.uint8)
        image = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
        image[inside] = (200, 40, 40) if label == 1 else (40, 40, 200)
        Image.fromarray(image).save(root / "train" / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "train" / "masks" / f"{i:03d}.png")
    return root


def syncs(cuda, quick, tmp):
    from fcmae.commands.pretrain import fit
    from fcmae.profiling import StepSyncs
    from fcmae.training.pretrain import PretrainTask
    result, callbacks = {}, PretrainTask.callbacks
    steps, log_every = (6, 4) if quick else (20, 10)
    precision = "bf16-mixed" if cuda else "32"
    for backend in ("dense", "sparse"):
        counter = StepSyncs()
        PretrainTask.callbacks = lambda self, *a: [*callbacks(self, *a), counter]
        try:
            fit(pretrain_args(cuda, quick, tmp / f"syncs-{backend}", "--backend", backend, "--precision", precision,
                              "--max-steps", str(steps), "--log-every", str(log_every)))
        finally:
            PretrainTask.callbacks = callbacks
        quiet = [n for step, n in counter.counts.items() if counter.quiet[step]]
        result[backend] = {"per_step": counter.counts, "quiet_steps": len(quiet),
                           "per_quiet_step": statistics.median(quiet) if quiet else None,
                           "expected_per_quiet_step": 1, "by_line": dict(counter.places.most_common(15))}
    return result


def training_step(model, backend, input_size, batch, device, dtype, decoder_dim=512):
    """A pre-training step (forward, backward, AdamW) as a closure, on fixed images and masks."""
    import torch

    from fcmae.masking import num_visible, random_mask
    from fcmae.model import FCMAE
    from fcmae.optim import adamw, param_groups
    torch.manual_seed(0)
    net = FCMAE(model, backend, img_size=input_size, decoder_dim=decoder_dim).to(device)
    optimizer = adamw(param_groups(net, 0.05), device, lr=1e-4)
    imgs = torch.randn(batch, 3, input_size, input_size, device=device)
    grid = input_size // 32
    mask = random_mask(batch, grid, grid, 0.6, device=device)
    visible = num_visible(grid * grid, 0.6)  # known, as in training: no sync for the row counts

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss, _, _ = net(imgs, mask, visible)
        loss.backward()
        optimizer.step()
    return step


def kernels(cuda, quick, tmp):
    import torch
    from torch.profiler import ProfilerActivity, profile
    device = torch.device("cuda" if cuda else "cpu")
    step = training_step("tiny" if cuda else "atto", "sparse", 224 if cuda else 64, 32 if cuda else 2, device,
                         torch.bfloat16, decoder_dim=32 if quick else 512)
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    top = [{"name": e.key[:160], "ms": getattr(e, key) / 1e3, "calls": e.count} for e in rows[:25]]
    convolutions = [r for r in top if any(w in r["name"].lower() for w in ("conv", "depthwise", "dgrad", "wgrad"))]
    return {"top": top, "convolutions": convolutions, "model": "tiny" if cuda else "atto"}


def depthwise(cuda, quick, tmp):
    import torch

    from fcmae.encoders import depthwise as dw
    from fcmae.encoders.convnextv2 import size_config
    from fcmae.encoders.depthwise import DepthwiseConv2d
    from fcmae.encoders.rows import VisibleRows, visible_patches
    from fcmae.masking import num_visible, random_mask
    device = torch.device("cuda" if cuda else "cpu")
    size, batch, rounds = (64, 2, 1) if quick else (224, 32, 5)
    grid = size // 32
    per_sample = num_visible(grid * grid, 0.6)
    mask = random_mask(batch, grid, grid, 0.6, device=device)
    stages = []
    for i, dim in enumerate(size_config("tiny")[1]):
        layout = VisibleRows(*visible_patches(mask, per_sample), mask.shape, 8 >> i, per_sample)
        conv = DepthwiseConv2d(dim).to(device)
        rows = torch.randn(layout.index.numel(), dim, device=device)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[:1 if quick else 2]:
            x = rows.to(dtype).requires_grad_()
            entry = {"stage": i, "dim": dim, "side": layout.shape[1], "precision": precision}
            for method in ("native", "swapped"):
                def step():
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        conv.forward_rows(x, layout).float().sum().backward()
                saved, dw.BACKWARD[device.type] = dw.BACKWARD.get(device.type), method
                try:
                    entry[method] = median_seconds(step, cuda, rounds)
                finally:
                    dw.BACKWARD[device.type] = saved
            entry["faster"] = min(("native", "swapped"), key=entry.get)
            stages.append(entry)
    return {"stages": stages, "default": dw.backward_method(device), "input_size": size, "batch": batch}


def median_seconds(step, cuda, rounds):
    """Median wall seconds of `step()` after one untimed call (CUDA: synchronized)."""
    import torch
    step()
    times = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def agreement(cuda, quick, tmp):
    import torch
    from helpers import MIXED_PRECISION_TOLERANCES as TOLERANCES, TINY, randomize_

    from fcmae.encoders import SparseConvNeXtV2
    from fcmae.masking import random_mask
    device = torch.device("cuda" if cuda else "cpu")
    size = 64 if quick else 224
    torch.manual_seed(0)
    encoder = randomize_(SparseConvNeXtV2(TINY, backend="dense")).to(device)
    imgs = torch.randn(4, 3, size, size, device=device)
    mask = random_mask(4, size // 32, size // 32, 0.6, device=device)
    probe = None

    def run(backend, dtype):
        nonlocal probe
        encoder.backend = backend
        encoder.zero_grad()
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = encoder(imgs, mask).float()
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device) if probe is None else probe
        (out * probe).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}

    def worst(a, b):
        return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)
    reference = {"dense bf16": run("dense", torch.bfloat16), "dense fp32": run("dense", None)}
    out, grads = run("sparse", torch.bfloat16)
    forward, gradient = TOLERANCES[torch.bfloat16]
    result = {"input_size": size, "tolerances": {"output": forward, "gradients": gradient}}
    for name, (ref_out, ref_grads) in reference.items():
        errors = {"output": ((out - ref_out).abs().max() / ref_out.abs().max()).item(), "gradients": worst(grads,
                                                                                                           ref_grads)}
        result[f"sparse vs {name}"] = {**errors, "within": errors["output"] <= forward and errors["gradients"] <= gradient}
    return result


def fsdp_policy(cuda, quick, tmp):
    import copy

    import torch
    import torch.distributed as dist
    from helpers import MIXED_PRECISION_TOLERANCES as TOLERANCES, TINY, randomize_
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from fcmae.masking import random_mask
    from fcmae.model import FCMAE
    from fcmae.training.trainer import fsdp_strategy
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 1000))
    dist.init_process_group("nccl", rank=0, world_size=1)
    strategy, result = fsdp_strategy("bf16-mixed"), {}
    imgs = torch.randn(4, 3, 224, 224, device="cuda")
    mask = random_mask(4, 7, 7, 0.6, device="cuda")
    for backend in ("dense", "sparse"):
        torch.manual_seed(0)
        ref = randomize_(FCMAE(TINY, backend, img_size=224, decoder_dim=64)).cuda()
        ref_loss = ref(imgs, mask)[0]
        ref_loss.backward()
        wrapped = FSDP(copy.deepcopy(ref), device_id=torch.device("cuda"), mixed_precision=strategy.mixed_precision,
                       **strategy.kwargs)
        seen = []
        wrapped.module.register_forward_pre_hook(lambda module, args: seen.append(str(args[0].dtype)))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = wrapped(imgs, mask)[0]
        loss.backward()
        with FSDP.summon_full_params(wrapped, with_grads=True):
            grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.float() for n, p in wrapped.named_parameters()}
        worst = max(((grads[n] - p.grad).abs().max() / p.grad.abs().max()).item() for n, p in ref.named_parameters())
        forward, gradient = TOLERANCES[torch.bfloat16]
        loss_error = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
        result[backend] = {"loss_rel_error": loss_error, "gradient_rel_error": worst, "input_dtype": seen[0],
                           "within": loss_error <= forward and worst <= gradient}
    dist.destroy_process_group()
    return result


def fsdp_2rank(cuda, quick, tmp):
    import torch
    if torch.cuda.device_count() < 2:
        return {"not_run": f"{torch.cuda.device_count()} GPU: FSDP shards over 2 or more"}
    result = {}
    for backend in ("dense", "sparse"):
        args = ["pretrain", "--strategy", "fsdp", "--devices", "2", "--precision", "bf16-mixed", "--backend", backend,
                "--max-steps", "5", "--no-export", "--no-resume", "--output", str(tmp / f"fsdp-{backend}")]
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "fcmae.cli", *args], capture_output=True, text=True)
        result[backend] = {"exit": run.returncode, "train_seconds": time.perf_counter() - start,
                           "error": run.stderr.strip()[-1500:] if run.returncode else None}
    return result


class Part(NamedTuple):
    run: Callable  # (cuda, quick, tmp folder) -> its figures
    limit: int  # seconds
    quick: bool = True  # runs with --quick
    cuda_only: str = ""  # why it needs CUDA, if it does


PARTS = {
    "bench_tiny": Part(bench("tiny"), 120),
    "bench_base": Part(bench("base"), 120, quick=False),
    "pretrain": Part(pretrain, 150),
    "segment": Part(segment, 150),
    "syncs": Part(syncs, 120),
    "kernels": Part(kernels, 60),
    "depthwise": Part(depthwise, 120),
    "agreement": Part(agreement, 60),
    "fsdp_policy": Part(fsdp_policy, 60, cuda_only="CPU autocast leaves layer_norm to the parameters' bf16 "
                                                   "(tests/training/test_fsdp_precision.py)"),
    "fsdp_2rank": Part(fsdp_2rank, 180, cuda_only="FSDP through Lightning needs CUDA GPUs"),
    "bench_tiny_compile": Part(bench("tiny", compile_=True), 200, quick=False),
    "bench_base_compile": Part(bench("base", compile_=True), 200, quick=False),
}


# ----------------------------------------------------------------------------- running

def run_part(name, cuda, quick, result_file):
    """One part, in this process: its figures to `result_file`."""
    from fcmae.files import write_atomic
    with tempfile.TemporaryDirectory() as tmp:
        figures = PARTS[name].run(cuda, quick, Path(tmp))
    write_atomic(result_file, json.dumps(figures, default=str))


def run_all(args):
    """Every part in a process of its own, each under its time limit and the overall budget."""
    import torch

    from fcmae.files import write_atomic
    cuda = args.device == "cuda"
    report = {"device": args.device, "quick": args.quick, "torch": torch.__version__,
              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    start = time.perf_counter()
    for name, part in PARTS.items():
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.perf_counter() - start)
        if args.quick and not part.quick:
            entry = {"not_run": "not in --quick"}
        elif part.cuda_only and not cuda:
            entry = {"not_run": part.cuda_only}
        elif left < 10:
            entry = {"not_run": f"the {args.budget:.0f} s budget was spent"}
        else:
            entry = run_child(name, cuda, args.quick, min(part.limit, left))
        report["parts"][name] = entry
        report["seconds"] = time.perf_counter() - start
        write_atomic(args.json, json.dumps(report, indent=1, default=str) + "\n")
        status = "not run: " + entry["not_run"] if "not_run" in entry else (
            "error: " + entry["error"].splitlines()[-1][:200] if "error" in entry else "ok")
        print(f"{name:<20} {entry.get('seconds', 0):6.1f} s  {status}", flush=True)
    failed = [n for n, e in report["parts"].items() if "error" in e]
    print(f"wrote {args.json}: {len(report['parts']) - len(failed)} of {len(report['parts'])} parts without error"
          f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}, {report['seconds']:.0f} s")
    return 1 if failed else 0


def run_child(name, cuda, quick, limit):
    """Run part `name` in a new process; its figures, or {"error": ...}, with "seconds"."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--part", name, "--device", "cuda" if cuda else "cpu",
                   "--result", str(result_file), *(["--quick"] if quick else [])]
        start = time.perf_counter()
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT)
            error = None if run.returncode == 0 else f"exit {run.returncode}: {run.stderr.strip()[-3000:]}"
        except subprocess.TimeoutExpired:
            error = f"stopped at its {limit:.0f} s limit"
        entry = json.loads(result_file.read_text()) if error is None else {"error": error}
    return {**entry, "seconds": round(time.perf_counter() - start, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes and only the parts that have them (CPU: a minute)")
    p.add_argument("--json", default="gpu_check.json", help="where the figures go")
    p.add_argument("--budget", type=float, default=450, help="seconds after which no part is started")
    p.add_argument("--only", nargs="*", choices=tuple(PARTS), help="run these parts only")
    p.add_argument("--part", choices=tuple(PARTS), help=argparse.SUPPRESS)  # a child: one part
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("gpu_check: --device cuda, but torch sees no CUDA device here: run with --device cpu --quick")
    if args.part:
        run_part(args.part, args.device == "cuda", args.quick, args.result)
        return
    sys.exit(run_all(args))


if __name__ == "__main__":
    main()
