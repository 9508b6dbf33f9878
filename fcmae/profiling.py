"""Where a training step's time goes, by kind of work; and the host-device syncs it makes.

    breakdown = step_breakdown(step)          # step: a callable that runs one training step
    print(format_breakdown(breakdown, matmul_rate()))
    syncs = count_syncs(step)                  # {"aten::nonzero": 0, ...}: one call, e.g. forward+backward
    counter = StepSyncs()
    trainer = L.Trainer(..., callbacks=[counter])   # counter.counts: {step: syncs}, through Lightning

`step_breakdown` runs the step under torch.profiler (CPU activity, input shapes) and gives every
operator's self time to one kind of work (`KINDS`), by the innermost enclosing scope or operator
that names one: the optimizer's step; the depthwise convolution (convolutions with one input
channel per group and a kernel larger than 1x1, `encoders/depthwise.py` included); matrix
products (mm, addmm, bmm, linear, other convolutions); gather/scatter and layout copies (index
ops, copies, fills, padding); norms and elementwise (everything else that computes). Python and
dispatch time outside any operator is `other`. It also counts the matrix products' FLOPs from
their shapes, so the achieved fraction of the machine's own matrix-product rate
(`matmul_rate`, measured in the same run) can be read off.

A sync makes a CUDA host wait until the device has caught up: the host stops queueing work
ahead, and CUDA graphs and `torch.compile` graphs break there. On CPU the same ops are counted
as the profiler's operator events (`SYNC_OPS`), so a CPU run shows what would block a CUDA host;
on CUDA, `torch.cuda.set_sync_debug_mode("warn")` names every one (scripts/gpu_check.py).
"""
import time
import warnings
from collections import Counter

import torch
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile

from fcmae.training.callbacks import writes_logs

KINDS = ("matrix products", "depthwise conv", "norms and elementwise", "gather/scatter/copy", "optimizer", "other")

# Profiler scopes (torch.profiler.record_function names) that decide the kind of everything inside.
SCOPES = {"Optimizer.step": "optimizer", "Optimizer.zero_grad": "optimizer"}
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot",
              "aten::_addmm_activation"}
CONV_OPS = {"aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
            "aten::_slow_conv2d_backward", "aten::thnn_conv2d", "aten::_conv_depthwise2d",
            "aten::cudnn_convolution", "aten::convolution_overrideable"}
GATHER_OPS = {"aten::index_select", "aten::index_copy_", "aten::index_add_", "aten::scatter_add_", "aten::scatter_",
              "aten::gather", "aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::nonzero",
              "aten::masked_select", "aten::copy_", "aten::fill_", "aten::zero_", "aten::cat",
              "aten::constant_pad_nd", "aten::flip", "aten::_to_copy", "aten::clone"}
# Ops that make a CUDA host wait for the device: a tensor read into Python, or an output whose
# size depends on the data.
SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


def _scope_kind(name):
    for prefix, kind in SCOPES.items():
        if name.startswith(prefix):
            return kind
    if name.startswith("aten::_fused_adam") or name.startswith("aten::_foreach_"):
        return "optimizer"
    return None


def _is_depthwise(event):
    """A convolution whose weight has one input channel per group and a kernel larger than 1."""
    for shape in event.input_shapes or ():
        if len(shape) == 4 and shape[1] == 1 and shape[2] > 1 and shape[3] > 1:
            return True
    return False


def op_kind(event):
    """The kind of work of one profiler event by its own name and shapes, or None (no own kind)."""
    name = event.name
    if name in MATMUL_OPS:
        return "matrix products"
    if name in CONV_OPS:
        return "depthwise conv" if _is_depthwise(event) else "matrix products"
    if name in GATHER_OPS:
        return "gather/scatter/copy"
    if name.startswith("aten::") and not _is_view_or_dispatch(name):
        return "norms and elementwise"
    return None


def _is_view_or_dispatch(name):
    return name in {"aten::view", "aten::reshape", "aten::permute", "aten::t", "aten::transpose", "aten::expand",
                    "aten::as_strided", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::unsqueeze",
                    "aten::squeeze", "aten::select", "aten::slice", "aten::detach", "aten::alias", "aten::linear",
                    "aten::matmul", "aten::conv2d", "aten::convolution", "aten::_convolution", "aten::resize_",
                    "aten::_unsafe_view", "aten::_reshape_alias", "aten::contiguous", "aten::to", "aten::lift_fresh",
                    "aten::resolve_conj", "aten::resolve_neg", "aten::as_strided_", "aten::new_empty",
                    "aten::new_empty_strided", "aten::split", "aten::chunk", "aten::unbind", "aten::narrow",
                    "aten::flatten", "aten::unflatten", "aten::view_as", "aten::expand_as", "aten::result_type"}


def kind_of(event):
    """The kind an event's self time counts as: the innermost scope or operator naming one."""
    e = event
    while e is not None:
        kind = _scope_kind(e.name)
        if kind is not None:
            return kind
        e = e.cpu_parent
    e = event
    while e is not None:
        kind = op_kind(e)
        if kind is not None:
            return kind
        e = e.cpu_parent
    return "other"


def matmul_flops(event):
    """FLOPs (2 per multiply-add) of a matrix-product event from its input shapes, else 0."""
    shapes = event.input_shapes or []
    name = event.name
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * k * n
        if name in ("aten::addmm", "aten::_addmm_activation"):
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2 * b * m * k * n
        if name == "aten::baddbmm":
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return 2 * b * m * k * n
    except (IndexError, ValueError, TypeError):
        return 0
    return 0


def conv_flops(event):
    """FLOPs of a (non-depthwise) convolution event from its shapes and arguments, else 0."""
    shapes, args = event.input_shapes or [], list(getattr(event, "concrete_inputs", None) or [])
    try:
        if event.name == "aten::mkldnn_convolution":  # input, weight, bias, padding, stride, dilation, groups
            (n, _, h, w), (c_out, c_in, kh, kw) = shapes[0], shapes[1]
            (ph, pw), (sh, sw) = args[3], args[4]
            out = n * c_out * ((h + 2 * ph - kh) // sh + 1) * ((w + 2 * pw - kw) // sw + 1)
            return 2 * out * c_in * kh * kw
        if event.name == "aten::convolution_backward":  # grad_out, input, weight, ..., output_mask last
            (n, c_out, ho, wo), (c_out, c_in, kh, kw) = shapes[0], shapes[2]
            grads = sum(bool(m) for m in args[-1][:2]) if args and isinstance(args[-1], (list, tuple)) else 2
            return 2 * n * c_out * ho * wo * c_in * kh * kw * grads
    except (IndexError, ValueError, TypeError):
        return 0
    return 0


def step_breakdown(step, repeats=1):
    """Run `step()` `repeats` times under the profiler -> {"seconds": {kind: s per step}, "wall_s",
    "matmul_flop" (per step, from shapes), "copies" (copy_ calls per step)}."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        wall = (time.perf_counter() - start) / repeats
    seconds, flops, copies = Counter(), 0, 0
    for e in prof.events():
        kind = kind_of(e)
        seconds[kind] += e.self_cpu_time_total / 1e6 / repeats
        if kind == "matrix products":
            flops += matmul_flops(e) + (0 if _is_depthwise(e) else conv_flops(e))
        copies += e.name == "aten::copy_"
    accounted = sum(seconds.values())
    seconds["other"] += max(0.0, wall - accounted)  # Python and gaps between operators
    return {"seconds": {k: seconds.get(k, 0.0) for k in KINDS}, "wall_s": wall,
            "matmul_flop": flops / repeats, "copies": copies / repeats}


def count_syncs(fn):
    """{op: calls} of the host-device sync ops (`SYNC_OPS`) that fn() makes, counted on any device
    (a CPU run shows the ops that would block a CUDA host) as the profiler's operator events.
    Blind spot: on CPU, copies to the host (`.tolist()`, `.cpu()`, `.numpy()`) are no operator;
    CUDA's `torch.cuda.set_sync_debug_mode("warn")` catches them (scripts/gpu_check.sh)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = Counter(e.name for e in prof.events() if e.name in SYNC_OPS)
    return {name: counts.get(name, 0) for name in SYNC_OPS}


def matmul_rate(dtype=torch.float32, n=2048, device="cpu", repeats=3):
    """FLOP/s of an n x n x n matrix product here and now (best of `repeats`, after one warm-up):
    the ceiling a step's matrix products are compared with."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device != "cpu":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def format_breakdown(breakdown, rate=None, step_flop=None):
    """Lines of text: each kind's share of the step; with the machine's matrix-product `rate`
    (FLOP/s), the rate the step's matrix products reached and, with the step's useful FLOPs,
    the whole step's fraction of it."""
    wall = breakdown["wall_s"]
    lines = [f"{'kind of work':<24} {'s/step':>7} {'share':>6}"]
    for kind in KINDS:
        s = breakdown["seconds"][kind]
        lines.append(f"{kind:<24} {s:>7.3f} {s / wall:>6.0%}")
    mm_s = breakdown["seconds"]["matrix products"]
    if rate and mm_s > 0 and breakdown["matmul_flop"] > 0:
        achieved = breakdown["matmul_flop"] / mm_s
        lines.append(f"matrix products: {achieved / 1e9:.0f} GFLOP/s = {achieved / rate:.0%} of this machine's "
                     f"{rate / 1e9:.0f} GFLOP/s (2048^3 product, measured now)")
    if rate and step_flop:
        lines.append(f"whole step: {step_flop / wall / 1e9:.0f} useful GFLOP/s = "
                     f"{step_flop / wall / rate:.0%} of the matrix-product rate")
    return lines


# Profiler scopes whose syncs are not the device's: loading a batch in the training process
# (--workers 0; torchvision's transforms read their random numbers with .item(), on the CPU
# wherever training runs), and on CPU the fused AdamW kernel (fcmae.optim.adamw), which reads each
# parameter's step count, a host tensor there; on CUDA the counts stay on the device.
HOST_SCOPES = ("enumerate(DataLoader)", "aten::_fused_adam")


class StepSyncs(Callback):
    """Counts the host-device syncs of every training step: `counts[step]` covers one whole
    cycle of the loop, from the end of the previous step's batch to the end of this one's (the
    previous step's logging, fetching and moving the batch, forward, backward, optimizer, lr
    schedule, callbacks); `quiet[step]`: neither step wrote logs. The first step has no count.

    CPU: the profiler's SYNC_OPS events outside HOST_SCOPES, one per read. CUDA: the warnings of
    `torch.cuda.set_sync_debug_mode("warn")`; `places` counts them by the Python line that made
    them ("file:line")."""

    def __init__(self):
        self.counts, self.quiet, self.places = {}, {}, Counter()
        self.window, self.cuda, self.logged = None, False, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logged = writes_logs(trainer)
        if self.window is not None:
            step = trainer.global_step
            self.counts[step] = self.close()
            self.quiet[step] = not (logged or self.logged)
        self.logged = logged
        self.open(pl_module.device.type == "cuda")

    def on_train_end(self, trainer, pl_module):
        if self.window is not None:
            self.close()

    def open(self, cuda):
        self.cuda = cuda
        if cuda:
            self.window = warnings.catch_warnings(record=True)
            self.caught = self.window.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self.window = profile(activities=[ProfilerActivity.CPU])
            self.window.start()

    def close(self):
        """The count of the window open now, which it closes."""
        window, self.window = self.window, None
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            syncs = [f"{w.filename}:{w.lineno}" for w in self.caught if "synchroniz" in str(w.message).lower()]
            window.__exit__(None, None, None)
            self.places.update(syncs)
            return len(syncs)
        window.stop()
        # One read nests several sync ops (is_nonzero -> item -> _local_scalar_dense): the outermost counts.
        return sum(e.name in SYNC_OPS and not in_scope(e.cpu_parent, SYNC_OPS) and not in_scope(e, HOST_SCOPES)
                   for e in window.events())


def in_scope(event, prefixes):
    """Whether a profiler event runs inside a scope (an enclosing event) named with one of `prefixes`."""
    while event is not None:
        if event.name.startswith(prefixes):
            return True
        event = event.cpu_parent
    return False
