"""The registry of sparse-encoder backends: the one place that knows which exist.

A backend is an object with
- `name`: what `--backend` and `SparseConvNeXtV2.backend` call it;
- `unavailable(device=None) -> str | None`: None when it can run (on that device), else why not,
  in one line with the fix (e.g. the install hint);
- `forward(encoder, imgs, visible)`: the encoder's forward over the shared trunk
  (`encoder.downsample_layers`, `encoder.stages`): imgs (N, C, H, W) and `visible`, a
  `Visibility` (the last-stage mask, the visible count per sample when known, the per-stage maps)
  -> (N, C_last, H/32, W/32), zero at masked positions. Blocks are called as modules,
  `block(x, ...)` (`convnextv2.Block.forward`), never through their submodules, so that wrappers
  of a block (FSDP units) see its parameters used. It must run under bf16 and fp16 autocast
  (tests/test_mixed_precision.py).

All backends compute the same function with one parameter set (tests/test_backends.py).
Adding one: write it in its own file (as `dense_backend.py`, `sparse_backend.py`, `minkowski.py`)
and add it to BACKENDS below; the CLI's choices, `fcmae bench` and the tests pick it up from here.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from fcmae.masking import stage_visibility

from .dense_backend import DENSE
from .minkowski import MINKOWSKI
from .sparse_backend import SPARSE

BACKENDS = {b.name: b for b in (DENSE, SPARSE, MINKOWSKI)}
BACKEND_CHOICES = ("auto", *BACKENDS)  # what `--backend` accepts

# The fastest backend per device type, from whole-step measurements with `fcmae bench` (README,
# Performance). CPU (2 cores, fp32, 224, mask 0.6): sparse is ahead of dense by 2x and more and
# ahead of minkowski (see the table). CUDA: not measured on this project's machines; sparse runs
# the depthwise conv through cuDNN and everything else as dense matmuls on the visible rows, while
# MinkowskiEngine's CUDA kernels are gather-scatter based, so sparse is the default there too until
# `fcmae bench --device cuda` says otherwise. Every entry is a backend that needs no extra install.
FASTEST = {"cpu": "sparse", "cuda": "sparse"}


@dataclass(frozen=True)
class Visibility:
    """What a backend is told of the mask: `mask` (N, H/32, W/32), 1 = masked; `per_sample`, the
    visible count of every sample when the caller knows it (then no host-device sync is needed to
    lay out the rows), else None."""
    mask: torch.Tensor
    per_sample: Optional[int] = None

    def stages(self):
        """Per-stage visibility (bool) maps (N, H/s, W/s), s = 4..32 (`fcmae.masking.stage_visibility`)."""
        return stage_visibility(self.mask)


class BackendUnavailable(ImportError, ValueError):
    """A known backend that cannot run here (e.g. MinkowskiEngine not installed). An ImportError
    for code that expects one from a missing package, a ValueError for `check_backend`'s callers."""


def _device_type(device):
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def resolve_backend(backend, device="cpu"):
    """`auto` -> the fastest backend for the device type (`FASTEST`, measured by `fcmae bench`);
    any other name is returned unchanged. Resolve once, where the device is known."""
    if backend != "auto":
        return backend
    return FASTEST.get(_device_type(device), "sparse")


def check_backend(name, device=None):
    """Raise ValueError (one line: the reason and the fix) unless `name` is a backend that can run
    here (on `device` when given); `auto` always can (it resolves to one that needs no install)."""
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}': choose one of {', '.join(BACKENDS)}")
    reason = BACKENDS[name].unavailable(device)
    if reason is not None:
        raise BackendUnavailable(reason)
