"""The one precision vocabulary: Lightning's names, what `auto` picks, the autocast dtype of each
(for loops outside a Trainer: kNN features, the benchmark), and the float32 matrix-product
precision every training run and the benchmark use."""
import contextlib

import torch

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# Short names `fcmae bench` took before it spoke this vocabulary; still accepted there.
ALIASES = {"fp32": "32", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def resolve_precision(precision):
    """`auto` -> bf16-mixed on GPUs that support it, else 32; an alias -> its name; others pass through."""
    precision = ALIASES.get(str(precision), str(precision))
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32"


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
