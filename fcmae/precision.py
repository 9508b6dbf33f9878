"""The one precision vocabulary: Lightning's names, what `auto` picks, the autocast dtype of each
(for loops outside a Trainer: kNN features, the benchmark), and the float32 matrix-product
precision every training run and the benchmark use."""
import contextlib

import torch

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# Short names `fcmae bench` took before it spoke this vocabulary; still accepted there.
ALIASES = {"fp32": "32", "bf16": "bf16-mixed", "fp16": "16-mixed"}


# CPU feature flags (Linux /proc/cpuinfo names) of bf16 matrix products in hardware: AMX tiles
# (Sapphire Rapids on) and AVX-512 BF16 dot products (Cooper Lake, Zen 4 on). Without either,
# oneDNN computes bf16 through float32 plus conversions: no faster than float32 (measured in
# docs/performance.md), so `auto` stays at 32 there.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags as the kernel lists them; empty where there is no such file."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_units(flags=None, capability=None):
    """The CPU's bf16 units, e.g. ("amx_bf16", "avx512_bf16"), from its flags; where no flags can
    be read, from torch's CPU capability (a name with "AMX" or "BF16" in some builds); () if none."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    if flags:
        return tuple(f for f in CPU_BF16_FLAGS if f in flags)
    capability = (torch.backends.cpu.get_cpu_capability() if capability is None else capability).upper()
    return ("amx_bf16",) if "AMX" in capability else ("avx512_bf16",) if "BF16" in capability else ()


def auto_precision(accelerator="auto"):
    """What `auto` picks, and why (one phrase): bf16-mixed on a GPU that supports it; on the CPU,
    bf16-mixed only where it has bf16 matrix products in hardware (`cpu_bf16_units`), else 32."""
    if accelerator != "cpu" and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "the GPU computes in bf16"
        return "32", "the GPU has no bf16"
    units = cpu_bf16_units()
    if units:
        return "bf16-mixed", f"the CPU has {' and '.join(units)} (bf16 matrix products in hardware)"
    return "32", "the CPU has neither AMX nor AVX-512 BF16, so bf16 would be emulated, no faster than float32"


def resolve_precision(precision, accelerator="auto"):
    """`auto` -> `auto_precision(accelerator)`'s pick; an alias -> its name; others pass through."""
    precision = ALIASES.get(str(precision), str(precision))
    if precision != "auto":
        return precision
    return auto_precision(accelerator)[0]


def autocast(device, precision):
    """The precision for inference or a hand-written step: autocast for the mixed ones, nothing for 32."""
    dtype = DTYPES.get(resolve_precision(precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def use_tf32():
    """float32 matrix products in TF32 on GPUs that have it (Ampere on; cuDNN's convolutions use it
    by default): what every training run and `fcmae bench` compute with. No effect on CPUs."""
    torch.set_float32_matmul_precision("high")
