"""`fcmae bench`: time a whole FCMAE pre-training step (forward, backward, optimizer step) for
each sparse-encoder backend, side by side in one run.

    fcmae bench --model tiny --batch-size 8 --steps 5             # dense, sparse, minkowski if installed
    fcmae bench --model base --batch-size 4 --steps 3
    fcmae bench --model tiny --backends sparse --mask-ratio 0.4 0.6 0.75          # lists: words, or a,b,c
    python -m fcmae.commands.bench ...                             # the same, without the `fcmae` CLI

Method. One FCMAE model (one parameter set) and one AdamW optimizer (the paper's betas and weight
decay; training's, fcmae.optim.adamw) serve every backend: the encoder's backend
is switched between steps. Each round runs one step per backend, in a rotating order, on the
same images and the same random mask (a new mask per round), so every backend sees the same
work and the same machine load; the table gives the median over rounds, after `--warmup`
untimed steps per backend. Ratios are throughput ratios to `dense` at the same mask ratio. The
device runs as in training: TF32 matrix products (fcmae.precision.use_tf32) and cuDNN's
autotuned kernels (cudnn.benchmark).

Columns.
- img/s: batch / median step time; `x dense`: that throughput over dense's.
- step, opt: median step time and the part of it spent in `optimizer.step()`.
- peak MB: peak memory of one step. CUDA: `torch.cuda.max_memory_allocated()` during the step,
  minus what was allocated when the step began. CPU: the same quantity from the profiler's
  allocation records (torch.profiler, profile_memory=True) of one extra, untimed step: the peak
  of live tensor bytes allocated during the step (activations, gradients, temporaries) above the
  step's starting level. Parameters, optimizer state and inputs exist before the step and are
  the same for every backend; they are printed once as `state MB`.
- GFLOP/s: the visible-only work of one step (see below) over the median step time, the same
  numerator for every backend, so it is the useful FLOP rate.

FLOPs. `visible_flops` counts the multiply-adds (x2) of the computation a sparse encoder has to
do: stem and downsampling on the visible patches, the 7x7 depthwise conv and the pointwise
layers on the visible positions; the dense decoder (1x1 projection, its blocks, the 1x1 head,
on every position); training = 3x forward. At mask ratio 0 and without the decoder it gives the
usual model FLOPs (tiny: 4.47 G multiply-adds of which the head is 0.8 M).

The shared part. The decoder and the loss run dense for every backend; the line
`decoder+loss` times their forward and backward alone (on features of the encoder's output
shape), so the encoder-only ratio and the bound it puts on the whole-step ratio can be read off.

The last line printed is one JSON object (also written to `--json FILE`).
"""
import json
import math
import statistics
import sys
import time
from typing import List, Literal, Optional

import torch
from jsonargparse import ActionYesNo, ArgumentParser

from fcmae.encoders import BACKENDS, SIZES, resolve_backend
from fcmae.encoders.convnextv2 import size_config
from fcmae.errors import UserError
from fcmae.files import write_atomic
from fcmae.listflags import list_flags, list_words
from fcmae.masking import PATCH_SIZE, check_input_size, check_mask_ratio, num_visible, random_mask
from fcmae.precision import ALIASES, DTYPES, PRECISIONS, resolve_precision, use_tf32

DEFAULT_MODEL = "tiny"
CUDA_WARMUP = 10  # untimed steps per backend on CUDA, by default


def build_parser():
    p = ArgumentParser(prog="fcmae bench", description=(
        "Time a whole FCMAE pre-training step (forward, backward, AdamW step) per backend, side by "
        "side and interleaved in one run: images/s, peak memory, ratios to dense, the visible-only "
        "FLOPs and the achieved FLOP/s. Prints a table, then one JSON line."))
    p.add_argument("--model", type=Literal[tuple(SIZES)], default=DEFAULT_MODEL, help="ConvNeXt V2 size")
    p.add_argument("--backends", type=List[Literal[tuple(BACKENDS)]], default=list(BACKENDS),
                   help="backends to time; one that cannot run here (e.g. minkowski not installed) is skipped, with the "
                        "reason in the table. "
                        "dense is added when missing, as the reference of the ratios")
    p.add_argument("--input-size", type=int, default=224, help=f"image side in pixels, a multiple of {PATCH_SIZE}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mask-ratio", type=List[float], default=[0.6],
                   help="one or more mask ratios, e.g. 0.4 0.6 0.75 (or 0.4,0.6,0.75); each gets its own rows")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--device", type=str, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precision", type=Literal[tuple(p for p in PRECISIONS if p != "auto") + tuple(ALIASES)],
                   default="32", help="32, or autocast to bf16-mixed / 16-mixed (16-mixed: CUDA only, with a "
                                      "GradScaler); fp32, bf16 and fp16 are the same")
    p.add_argument("--channels-last", action=ActionYesNo(no_prefix="no-"), default=False,
                   help="model and images in channels-last memory format (helps the dense backend's convs)")
    p.add_argument("--compile", type=Literal["off", "auto", "on"], default="off",
                   help="torch.compile the model: on = for every backend; auto = only for the backends it makes "
                        "faster on this device (the others run eager, with a line saying why)")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step per backend each)")
    p.add_argument("--warmup", type=Optional[int], default=None,
                   help="untimed steps per backend first; default 1 on CPU, 10 on CUDA (cuDNN's kernel choice, "
                        "the caching allocator and lazy initialization settle over the first steps)")
    p.add_argument("--memory", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="measure peak memory (CPU: one extra untimed, profiled step per backend)")
    p.add_argument("--breakdown", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="CPU: one more profiled step per backend, split by kind of work, against this machine's "
                        "own matrix-product rate measured in the same run")
    p.add_argument("--threads", type=Optional[int], default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Optional[str], default=None, help="also write the JSON result to this file")
    return p


# ---------------------------------------------------------------------------------------------
# FLOPs of the visible-only computation

def visible_flops(model, input_size, batch, mask_ratio, in_chans=3, decoder_dim=512, decoder_depth=1,
                  patch=PATCH_SIZE):
    """FLOPs (2 per multiply-add) of one training step's useful work: forward, x3 for training.
    Returns a dict with `encoder_fwd`, `decoder_fwd` and `step`."""
    depths, dims = size_config(model)
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    grid = (h // patch) * (w // patch)
    visible_frac = max(1, int(grid * (1 - mask_ratio))) / grid  # random_mask keeps int(L*(1-r))
    enc = 0.0
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        positions = batch * (h // (4 * 2 ** i)) * (w // (4 * 2 ** i)) * visible_frac
        if i == 0:
            enc += positions * (in_chans * 16) * dim  # stem 4x4 s4
        else:
            enc += positions * (4 * dims[i - 1]) * dim  # 2x2 s2 downsampling
        per_block = 49 * dim + 2 * (dim * 4 * dim)  # depthwise 7x7 + two pointwise linears
        enc += depth * positions * per_block
    last = batch * grid
    dec_block = 49 * decoder_dim + 2 * (decoder_dim * 4 * decoder_dim)
    dec = last * (dims[-1] * decoder_dim + decoder_depth * dec_block + decoder_dim * patch * patch * in_chans)
    enc, dec = 2 * enc, 2 * dec
    return {"encoder_fwd": enc, "decoder_fwd": dec, "step": 3 * (enc + dec)}


# ---------------------------------------------------------------------------------------------
# Timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_backends(requested, device):
    """(usable, skipped: {name: reason}); dense first. Asks each backend of the registry."""
    usable, skipped = [], {}
    for name in ["dense"] + [b for b in requested if b != "dense"]:
        if name in usable:
            continue
        reason = BACKENDS[name].unavailable(device)
        if reason is not None:
            skipped[name] = reason
        else:
            usable.append(name)
    return usable, skipped


def _attempt(fn, backend, backends, skipped, *args):
    """fn(backend, *args), or None when it raises RuntimeError: a combination that cannot run here
    (a kernel without the precision, a non-finite loss) is then dropped from `backends` and
    reported in `skipped` (and the table) rather than ending the benchmark. dense is the
    reference of every ratio: its errors propagate."""
    if backend == "dense":
        return fn(backend, *args)
    try:
        return fn(backend, *args)
    except RuntimeError as e:
        skipped[backend] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        backends.remove(backend)
        print(f"note: skipping backend {backend} from here on: {skipped[backend]}", file=sys.stderr)
        return None


# Where torch.compile makes a backend's step faster, by device type (`--compile auto`), and why
# the others stay eager. CPU, tiny 224 px batch 8: dense 2.9 -> 4.9 img/s compiled, sparse 11.5 ->
# 8.9 (docs/performance.md). CUDA: not measured yet (scripts/gpu_check.py times --compile on).
COMPILE_PAYS = {"cpu": ("dense",), "cuda": ("dense", "sparse")}
EAGER_BECAUSE = {
    "sparse": "torch.compile measured slower than eager on the CPU: graph breaks around its row layout",
    "minkowski": "MinkowskiEngine's operations are opaque to torch.compile (a graph break at each)",
}


def compiled_backends(setting, device_type, backends):
    """The backends whose steps run compiled under `--compile setting`."""
    if setting == "on":
        return set(backends)
    if setting == "auto":
        return set(backends) & set(COMPILE_PAYS.get(device_type, ()))
    return set()


def compile_line(backends, compiled):
    """One line: what `--compile auto` compiled, and why the rest runs eager."""
    eager = [f"{b} ({EAGER_BECAUSE.get(b, 'not measured to gain')})" for b in backends if b not in compiled]
    return f"--compile auto: compiled {', '.join(sorted(compiled)) or 'none'}" + (
        f"; eager: {'; '.join(eager)}" if eager else "")


class Stepper:
    """One model and optimizer; `step(backend, imgs, mask)` runs and times one training step."""

    def __init__(self, cfg, device):
        from fcmae.model import FCMAE  # heavy imports only when running

        self.device = device
        self.mask_ratio = cfg.mask_ratio[0]  # of the masks being timed (`time_ratio` sets it)
        self.dtype = DTYPES[resolve_precision(cfg.precision)]
        self.model = FCMAE(cfg.model, backend="dense", in_chans=cfg.in_chans, img_size=cfg.input_size,
                           mask_ratio=cfg.mask_ratio[0]).to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        from fcmae.optim import adamw, param_groups
        groups = param_groups(self.model, weight_decay=0.05)  # pre-training's weight-decay split
        self.optimizer = adamw(groups, device, lr=1.5e-4, betas=(0.9, 0.95))  # training's AdamW
        self.optimizer_kind = "fused" if self.optimizer.defaults.get("fused") else "foreach"
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        self.compiled_backends = compiled_backends(cfg.compile, device.type, {"dense", *cfg.backends})
        self.compiled = torch.compile(self.model) if self.compiled_backends else None

    def state_bytes(self):
        tensors = list(self.model.parameters()) + [t for s in self.optimizer.state.values()
                                                   for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def step(self, backend, imgs, mask):
        """-> (seconds for the step, seconds for optimizer.step())."""
        self.model.encoder.backend = backend
        _sync(self.device)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        visible = num_visible(mask[0].numel(), self.mask_ratio)  # the masks' count, as training passes it: no sync
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            forward = self.compiled if backend in self.compiled_backends else self.model
            loss, _, _ = forward(imgs, mask, visible)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        _sync(self.device)
        t1 = time.perf_counter()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        _sync(self.device)
        t2 = time.perf_counter()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"backend {backend}: non-finite loss {loss.item()}")
        return t2 - t0, t2 - t1

    def decoder_step(self, imgs, mask):
        """Forward and backward of the decoder and the loss alone (the part every backend shares)."""
        from fcmae.loss import masked_patch_loss
        from fcmae.masking import patchify

        n, _, h, w = imgs.shape
        enc = self.model.encoder
        feats = torch.randn(n, enc.num_features, h // PATCH_SIZE, w // PATCH_SIZE, device=self.device,
                            requires_grad=True)
        m = mask.to(imgs.dtype)
        _sync(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            pred = self.model.decoder(feats * (1 - m).unsqueeze(1), m).flatten(2).transpose(1, 2)
            loss = masked_patch_loss(pred, patchify(imgs), m.flatten(1), self.model.norm_pix_loss)
        loss.backward()
        _sync(self.device)
        self.model.decoder.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def peak_memory(self, backend, imgs, mask):
        """Peak bytes allocated during one step above the step's starting level (see module doc)."""
        if self.device.type == "cuda":
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(backend, imgs, mask)
            return torch.cuda.max_memory_allocated(self.device) - base
        from torch.profiler import ProfilerActivity, profile

        self.optimizer.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step(backend, imgs, mask)
        events = sorted((e for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
                        key=lambda e: e.start_ns())
        level = peak = 0
        for e in events:
            level += e.nbytes()
            peak = max(peak, level)
        return peak


def bench_device(cfg):
    """The device and the checks of the flags, before anything is built; the device settings of
    a training run (TF32 matrix products, cuDNN's kernel choice for fixed shapes)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    use_tf32()
    torch.backends.cudnn.benchmark = True  # as training's Trainer(benchmark=True)
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise UserError(f"--device {cfg.device}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {cfg.device}: choose cpu or cuda[:N]")
    if resolve_precision(cfg.precision) == "16-mixed" and device.type != "cuda":
        raise UserError(f"--precision {cfg.precision} needs --device cuda (on CPU use bf16-mixed or 32)")
    check_input_size(cfg.input_size)
    if cfg.warmup is None:
        cfg.warmup = CUDA_WARMUP if device.type == "cuda" else 1
    if cfg.batch_size < 1 or cfg.steps < 1 or cfg.warmup < 0:
        raise UserError("--batch-size and --steps must be >= 1, --warmup >= 0")
    if not cfg.mask_ratio:
        raise UserError("--mask-ratio []: pass at least one ratio, e.g. [0.6]")
    grid = cfg.input_size // PATCH_SIZE
    for r in cfg.mask_ratio:
        check_mask_ratio(r, grid * grid, image=f"a {cfg.input_size}px image")
    return device


def time_ratio(cfg, stepper, imgs, ratio, backends, skipped, gen):
    """One mask ratio: `--warmup` untimed steps per backend, then `--steps` rounds of one step
    per backend in a rotating order, each round on a new mask. Returns (result rows, the
    decoder+loss times of each round)."""
    grid = cfg.input_size // PATCH_SIZE
    masks = [random_mask(cfg.batch_size, grid, grid, ratio, generator=gen).to(imgs.device)
             for _ in range(cfg.warmup + cfg.steps)]
    stepper.mask_ratio = ratio
    times, opt_times, decoder_times = {b: [] for b in backends}, {b: [] for b in backends}, []
    for b in list(backends):
        for k in range(cfg.warmup):
            if _attempt(stepper.step, b, backends, skipped, imgs, masks[k]) is None:
                break
    for k in range(cfg.steps):
        mask = masks[cfg.warmup + k]
        for b in backends[k % len(backends):] + backends[:k % len(backends)]:  # rotate
            timing = _attempt(stepper.step, b, backends, skipped, imgs, mask)
            if timing is not None:
                times[b].append(timing[0])
                opt_times[b].append(timing[1])
        decoder_times.append(stepper.decoder_step(imgs, mask))
        print(f"mask {ratio} round {k + 1}/{cfg.steps}: " +
              ", ".join(f"{b} {times[b][-1]:.2f}s" for b in backends), file=sys.stderr, flush=True)
    flops = visible_flops(cfg.model, cfg.input_size, cfg.batch_size, ratio, cfg.in_chans)
    dense_median = statistics.median(times["dense"])
    rows = []
    for b in list(backends):
        med = statistics.median(times[b])
        peak = _attempt(stepper.peak_memory, b, backends, skipped, imgs, masks[-1]) if cfg.memory else None
        if b not in backends:
            continue
        rows.append({
            "backend": b, "mask_ratio": ratio,
            "images_per_s": cfg.batch_size / med,
            "step_s": med, "step_s_min": min(times[b]), "step_s_max": max(times[b]),
            "optimizer_s": statistics.median(opt_times[b]),
            "ratio_to_dense": dense_median / med,
            "peak_memory_mb": None if peak is None else peak / 2 ** 20,
            "gflop_per_s": flops["step"] / med / 1e9,
            "visible_gflop_per_step": flops["step"] / 1e9,
        })
    return rows, decoder_times


def run_bench(cfg):
    """Run the benchmark; returns the result dict (also printed as a table and a JSON line)."""
    device = bench_device(cfg)
    backends, skipped = available_backends(cfg.backends, device)
    for name, why in skipped.items():
        print(f"note: skipping backend {name}: {why}", file=sys.stderr)

    torch.manual_seed(cfg.seed)
    stepper = Stepper(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    imgs = torch.randn(cfg.batch_size, cfg.in_chans, cfg.input_size, cfg.input_size, generator=gen).to(device)
    if cfg.channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    rows, decoder_times = [], []
    for ratio in cfg.mask_ratio:
        ratio_rows, ratio_decoder_times = time_ratio(cfg, stepper, imgs, ratio, backends, skipped, gen)
        rows += ratio_rows
        decoder_times += ratio_decoder_times
    main_ratio = 0.6 if 0.6 in cfg.mask_ratio else cfg.mask_ratio[0]
    fastest = max((r for r in rows if r["mask_ratio"] == main_ratio), key=lambda r: r["images_per_s"])["backend"]
    result = {
        "model": cfg.model, "input_size": cfg.input_size, "batch_size": cfg.batch_size,
        "device": str(device), "device_name": _device_name(device), "threads": torch.get_num_threads(),
        "precision": resolve_precision(cfg.precision), "channels_last": cfg.channels_last, "compile": cfg.compile,
        "compiled": sorted(stepper.compiled_backends),
        "steps": cfg.steps, "warmup": cfg.warmup, "optimizer": f"AdamW ({stepper.optimizer_kind})",
        "torch": torch.__version__, "memory_measure": _memory_measure(device) if cfg.memory else None,
        "state_mb": stepper.state_bytes() / 2 ** 20,
        "decoder_loss_s": statistics.median(decoder_times),
        "visible_flops": visible_flops(cfg.model, cfg.input_size, cfg.batch_size, main_ratio, cfg.in_chans),
        "skipped": skipped, "auto": resolve_backend("auto", device.type), "fastest": fastest,
        "results": rows,
    }
    if cfg.compile == "auto":
        print(compile_line(backends, stepper.compiled_backends))
    print_table(result)
    if cfg.breakdown and device.type == "cpu":
        result["breakdown"] = breakdowns(cfg, stepper, imgs, backends, main_ratio, gen)
    line = json.dumps(result, separators=(",", ":"))
    if cfg.json:
        write_atomic(cfg.json, line + "\n")
    print(line)
    return result


def breakdowns(cfg, stepper, imgs, backends, ratio, gen):
    """One profiled step per backend split by kind of work (fcmae.profiling.step_breakdown), and
    the machine's float32 matrix-product rate measured now; printed, and returned for the JSON.
    CPU only: the profiler's CPU times of a CUDA step are the host's, not the device's."""
    from fcmae.profiling import format_breakdown, matmul_rate, step_breakdown
    grid = cfg.input_size // PATCH_SIZE
    mask = random_mask(cfg.batch_size, grid, grid, ratio, generator=gen).to(imgs.device)
    stepper.mask_ratio = ratio
    rate = matmul_rate()
    step_flop = visible_flops(cfg.model, cfg.input_size, cfg.batch_size, ratio, cfg.in_chans)["step"]
    out = {"matmul_rate_flop_per_s": rate, "backends": {}}
    for b in backends:
        breakdown = step_breakdown(lambda: stepper.step(b, imgs, mask))
        out["backends"][b] = breakdown
        print(f"where a {b} step's time goes (one profiled step, {breakdown['wall_s']:.3f} s, "
              f"{breakdown['copies']:.0f} copies):")
        print("\n".join("  " + line for line in format_breakdown(breakdown, rate, step_flop)))
    return out


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def _memory_measure(device):
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one step, minus memory allocated at its start"
    return "torch.profiler allocation records of one untimed step: peak live tensor bytes above the step's start"


def print_table(result):
    r0 = result
    print(f"fcmae bench: {r0['model']} {r0['input_size']}x{r0['input_size']}, batch {r0['batch_size']}, "
          f"{r0['precision']}, {r0['device']} ({r0['device_name']}, {r0['threads']} threads), "
          f"median of {r0['steps']} interleaved steps after {r0['warmup']} warm-up, {r0['optimizer']}"
          f"{', channels-last' if r0['channels_last'] else ''}{', compiled: ' + ' '.join(r0['compiled']) if r0['compiled'] else ''}")
    print(f"{'mask':>5} {'backend':<10} {'img/s':>8} {'x dense':>8} {'step s':>8} {'min s':>7} {'opt s':>7} "
          f"{'peak MB':>9} {'GFLOP/s':>8}")
    for r in result["results"]:
        mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        print(f"{r['mask_ratio']:>5.2f} {r['backend']:<10} {r['images_per_s']:>8.2f} {r['ratio_to_dense']:>7.2f}x "
              f"{r['step_s']:>8.3f} {r['step_s_min']:>7.3f} {r['optimizer_s']:>7.3f} {mem:>9} {r['gflop_per_s']:>8.1f}")
    for name, why in result["skipped"].items():
        print(f"{'':>5} {name:<10} skipped: {why}")
    f = result["visible_flops"]
    print(f"visible-only work per step: {f['step'] / 1e9:.1f} GFLOP (encoder fwd {f['encoder_fwd'] / 1e9:.1f}, "
          f"decoder fwd {f['decoder_fwd'] / 1e9:.1f}; step = 3 x fwd)")
    print(f"shared by all backends: decoder+loss fwd/bwd {result['decoder_loss_s']:.3f} s; "
          f"state (params + optimizer) {result['state_mb']:.0f} MB")
    if result["memory_measure"]:
        print(f"peak MB: {result['memory_measure']}")
    note = "" if result["auto"] == result["fastest"] else "  (differs from the fastest measured here)"
    print(f"auto -> {result['auto']}; fastest measured: {result['fastest']}{note}")


def run(cfg):
    run_bench(cfg)
    return 0


def main(argv=None):
    parser = build_parser()
    cfg = parser.parse_args(list_words(list(sys.argv[1:] if argv is None else argv), list_flags(parser)))
    try:
        run(cfg)
    except UserError as e:
        print(f"fcmae bench: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
