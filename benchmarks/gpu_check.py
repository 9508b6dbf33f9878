"""The encoder's device checks, for a machine with a GPU (runs on CPU too, as a smoke test):

    python benchmarks/gpu_check.py --device cuda --json gpu_encoder.json
    python benchmarks/gpu_check.py --device cpu --batch 2 --input-size 64      # smoke test

1. depthwise: which backward of the 7x7 depthwise conv is faster on this device, per stage shape
   of `--model` and precision: `native` (torch's own: cuDNN on CUDA, channels-last) or `swapped`
   (`encoders/depthwise.py`); the winner is what `depthwise.BACKWARD[device type]` should say.
2. syncs: host-device syncs of `--steps` forward + backward steps of the sparse and dense
   backends with the visible count given (CUDA: `torch.cuda.set_sync_debug_mode("warn")`, every
   warning counted; CPU: the profiler's sync ops, `fcmae.profiling.count_syncs`). Expected: 0.
3. kernels: the profiler's top kernels (self device time) of one sparse training step, which
   shows the depthwise kernels that ran.
4. agreement: the sparse backend under bf16 autocast against the dense one, within the
   mixed-precision tolerances of tests/test_mixed_precision.py.

Prints a line per check and, last, one JSON object (also written to `--json`).
"""
import argparse
import json
import statistics
import time
import warnings

import torch

from fcmae.encoders import depthwise
from fcmae.encoders.convnextv2 import size_config
from fcmae.encoders.depthwise import DepthwiseConv2d
from fcmae.encoders.rows import VisibleRows, visible_patches
from fcmae.masking import num_visible, random_mask
from fcmae.model import FCMAE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, rounds):
    fn()
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def depthwise_methods(model, input_size, batch, device, rounds=5, mask_ratio=0.6):
    """Seconds of one rows depthwise forward + backward per stage, precision and method."""
    grid = input_size // 32
    per_sample = num_visible(grid * grid, mask_ratio)
    mask = random_mask(batch, grid, grid, mask_ratio, device=device)
    out = []
    for i, dim in enumerate(size_config(model)[1]):
        layout = VisibleRows(*visible_patches(mask, per_sample), mask.shape, 8 >> i, per_sample)
        conv = DepthwiseConv2d(dim).to(device)
        rows = torch.randn(layout.index.numel(), dim, device=device)
        for precision, dtype in DTYPES.items():
            x = rows.to(dtype).requires_grad_()
            entry = {"stage": i, "dim": dim, "side": layout.shape[1], "precision": precision}
            for method in ("native", "swapped"):
                saved = depthwise.BACKWARD.get(device.type)
                depthwise.BACKWARD[device.type] = method
                try:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        step = lambda: conv.forward_rows(x, layout).float().sum().backward()  # noqa: E731
                        entry[method] = timed(step, device, rounds)
                finally:
                    depthwise.BACKWARD[device.type] = saved
            entry["faster"] = min(("native", "swapped"), key=entry.get)
            out.append(entry)
    return out


def model_step(backend, model, input_size, batch, device, dtype):
    torch.manual_seed(0)
    net = FCMAE(model, backend, img_size=input_size).to(device)
    imgs = torch.randn(batch, 3, input_size, input_size, device=device)
    grid = input_size // 32
    count = num_visible(grid * grid, net.mask_ratio)

    def step():
        mask = random_mask(batch, grid, grid, net.mask_ratio, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _, _ = net(imgs, mask, count)
        loss.backward()
    return net, step


def count_syncs(backend, model, input_size, batch, device, steps):
    from fcmae.profiling import count_syncs as profiled
    _, step = model_step(backend, model, input_size, batch, device, torch.float32)
    step()
    sync(device)
    if device.type != "cuda":
        return sum(sum(profiled(step).values()) for _ in range(steps))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def top_kernels(model, input_size, batch, device, rows=15):
    from torch.profiler import ProfilerActivity, profile
    _, step = model_step("sparse", model, input_size, batch, device, DTYPES["bf16"])
    step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"name": e.key, "ms": getattr(e, key) / 1e3, "calls": e.count} for e in events]


def agreement(model, input_size, batch, device):
    """Max |sparse - dense| over max |dense| of the encoder output and parameter gradients, bf16."""
    from fcmae.encoders import SparseConvNeXtV2
    torch.manual_seed(0)
    encoder = SparseConvNeXtV2(model, backend="dense").to(device)
    imgs = torch.randn(batch, 3, input_size, input_size, device=device)
    grid = input_size // 32
    mask = random_mask(batch, grid, grid, 0.6, device=device)
    results = {}
    for backend in ("dense", "sparse"):
        encoder.backend = backend
        encoder.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = encoder(imgs, mask)
        out.float().square().mean().backward()
        results[backend] = (out.float(), {n: p.grad.float().clone() for n, p in encoder.named_parameters()})
    (d_out, d_grads), (s_out, s_grads) = results["dense"], results["sparse"]
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # noqa: E731
    return {"output": rel(s_out, d_out), "worst_gradient": max(rel(s_grads[n], d_grads[n]) for n in d_grads),
            "tolerances (output, gradients)": [5 * 2 ** -8, 25 * 2 ** -8]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="tiny")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes
    result = {"device": str(device), "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result["depthwise"] = depthwise_methods(args.model, args.input_size, args.batch, device)
    for e in result["depthwise"]:
        print(f"depthwise stage {e['stage']} ({e['dim']}x{e['side']}) {e['precision']}: "
              f"native {e['native'] * 1e3:.2f} ms, swapped {e['swapped'] * 1e3:.2f} ms -> {e['faster']}")
    result["syncs"] = {b: count_syncs(b, args.model, args.input_size, args.batch, device, args.steps)
                       for b in ("dense", "sparse")}
    print(f"host-device syncs in {args.steps} forward+backward steps: {result['syncs']}")
    result["top_kernels"] = top_kernels(args.model, args.input_size, args.batch, device)
    for k in result["top_kernels"]:
        print(f"  {k['ms']:9.2f} ms {k['calls']:5d}  {k['name'][:90]}")
    result["bf16_sparse_vs_dense"] = agreement(args.model, args.input_size, min(args.batch, 8), device)
    print(f"bf16 sparse vs dense: {result['bf16_sparse_vs_dense']}")
    line = json.dumps(result, separators=(",", ":"))
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
