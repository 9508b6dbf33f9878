"""What this machine can do, measured or read from it: the matrix-product rate, and whether the
CPU has bf16 matrix units (so that bf16 autocast can pay off there).

A CPU without AMX-BF16 or AVX512-BF16 computes bf16 by converting to float32 and back: bf16
autocast is then slower than float32 (docs/performance.md), and `auto` precision should stay at
float32 on it.
"""
import time

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of the units that compute bf16


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags (Linux /proc/cpuinfo), or an empty set where that cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_units(flags=None, capability=None):
    """The bf16 units of this CPU, e.g. ("amx_bf16", "avx512_bf16"), from its flags, and from
    torch's CPU capability ("AVX512_BF16"/"AMX..." in some builds) where the flags are unknown;
    () when there are none."""
    flags = cpu_flags() if flags is None else set(flags)
    units = tuple(f for f in BF16_CPU_FLAGS if f in flags)
    if units or flags:
        return units
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return ("amx_bf16",) if "AMX" in capability.upper() else ("avx512_bf16",) if "BF16" in capability.upper() else ()


def bf16_pays_off(device="cpu", flags=None):
    """(bool, why): whether bf16 autocast can be faster than float32 on `device`. CUDA: from
    compute capability 8.0 (Ampere) on. CPU: with AMX-BF16 or AVX512-BF16 units."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        ok = major >= 8
        return ok, f"CUDA compute capability {major}.{minor}: bf16 tensor cores {'present' if ok else 'absent'}"
    units = cpu_bf16_units(flags)
    if units:
        return True, f"CPU has {' and '.join(units)}"
    return False, "CPU has neither AMX-BF16 nor AVX512-BF16: bf16 is computed through float32 and is slower"


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
