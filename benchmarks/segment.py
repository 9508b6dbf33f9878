"""Time one segmentation training step per size: images/s, peak memory, and the split of the step
between the encoder, the head (UperNet, the auxiliary head and the loss) and AdamW.

    python benchmarks/segment.py                                  # atto and tiny, 512 px, batch 2
    python benchmarks/segment.py --sizes atto femto pico nano tiny base large huge --devices cuda --batch 16

The step is the recipe's (configs/segment/<size>.yaml: drop path, 512 px crops; 150 classes as
ADE20K): forward with the auxiliary head, cross entropy at the labels' size (main + 0.4 aux),
backward, AdamW; bf16 autocast on cuda, float32 on cpu. The encoder's part is timed alone as
`forward_stages` plus the backward pass of the very gradients the head sent it; the optimizer's
as `step()`; the head's is the rest. Each (size, device) runs in its own process, so its peak
memory is its own: cuda, the allocator's peak; cpu, the peak resident set size above what the
process held before building the model. Median of --steps timed steps after one warmup step.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from importlib.resources import files

import torch
import torch.nn.functional as F
import yaml

from fcmae.encoders import SIZES
from fcmae.decoders.upernet import UperNetSegmenter


def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(size, device, batch, input_size, steps, classes=150):
    """{"step", "encoder", "optimizer" (seconds, medians), "peak_gib"} of one size on one device."""
    recipe = yaml.safe_load(files("fcmae.configs").joinpath("segment", f"{size}.yaml").read_text())
    base = rss_gib()
    torch.manual_seed(0)
    model = UperNetSegmenter(size, classes, drop_path=recipe["drop_path"]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    y = torch.randint(0, classes, (batch, input_size, input_size), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    stage_grads = {}  # stage index -> the gradient the head sends it

    def capture(decoder, inputs):  # the decoder's input: [None, None, *stages]
        for i, stage in enumerate(inputs[0][2:]):
            stage.register_hook(lambda g, i=i: stage_grads.__setitem__(i, g))  # stage 2's: UperNet's + aux's
    model.decoder.register_forward_pre_hook(capture)

    def forward_backward():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits, aux = model.forward_with_aux(x)  # (N, K, S/4, S/4), (N, K, S/16, S/16)
            loss = sum(w * F.cross_entropy(F.interpolate(o, size=y.shape[-2:], mode="bilinear",
                                                         align_corners=False).float(), y)
                       for w, o in ((1.0, logits), (0.4, aux)))
        loss.backward()

    def encoder_alone(grads):
        with autocast:
            stages = model.encoder.forward_stages(x)
        torch.autograd.backward(stages, grads)

    results = {"step": [], "encoder": [], "optimizer": []}
    for i in range(steps + 1):
        stage_grads.clear()
        t_fb, _ = timed(forward_backward, device)
        t_opt, _ = timed(optimizer.step, device)
        grads = [stage_grads[i] for i in range(4)]
        t_enc, _ = timed(lambda: encoder_alone(grads), device)
        if i:  # the first step warms up kernels and the allocator
            results["step"].append(t_fb + t_opt)
            results["encoder"].append(t_enc)
            results["optimizer"].append(t_opt)
    out = {k: statistics.median(v) for k, v in results.items()}
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else rss_gib() - base
    return out


def run_one(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.one, args.device, args.batch, args.input_size, args.steps)
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["atto", "tiny"], choices=list(SIZES))
    p.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, and cuda if present)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--input-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warmup step)")
    p.add_argument("--threads", type=int, default=None, help="cpu threads (default: torch's)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one size
    p.add_argument("--device", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return run_one(args)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"segmentation training step: {args.input_size} px, batch {args.batch}, 150 classes, "
          f"median of {args.steps} steps; cpu {args.threads or torch.get_num_threads()} threads fp32, cuda bf16")
    print(f"{'size':<6} {'device':<6} {'images/s':>9} {'step s':>8} {'encoder':>8} {'head':>6} {'AdamW':>6} "
          f"{'peak GiB':>9}")
    for device in devices:
        for size in args.sizes:
            child = [sys.executable, __file__, "--one", size, "--device", device, "--batch", str(args.batch),
                     "--input-size", str(args.input_size), "--steps", str(args.steps)]
            if args.threads:
                child += ["--threads", str(args.threads)]
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode:
                print(f"{size:<6} {device:<6} failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:100]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            head = r["step"] - r["encoder"] - r["optimizer"]
            print(f"{size:<6} {device:<6} {args.batch / r['step']:>9.2f} {r['step']:>8.2f} "
                  f"{100 * r['encoder'] / r['step']:>7.0f}% {100 * head / r['step']:>5.0f}% "
                  f"{100 * r['optimizer'] / r['step']:>5.0f}% {r['peak_gib']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
