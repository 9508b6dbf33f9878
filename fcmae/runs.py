"""What `fcmae pretrain` and `fcmae finetune` share about a run: where it resumes from, and the
precision it trains in."""
from pathlib import Path

import torch

from fcmae.errors import UserError


def resume_checkpoint(command, no_resume, resume, output, expected):
    """The checkpoint a run continues from, or None.

    `resume` is "auto" (OUTPUT/checkpoints/last.ckpt if present) or a path; `expected` maps
    hyperparameter names to this run's values: a checkpoint that disagrees is refused.
    """
    if no_resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise UserError(f"--resume {resume}: no such checkpoint file: pass a .ckpt path, or --resume auto")
    else:
        path = Path(output) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            return None
    try:  # mmap: only the hyperparameters are read here, however large the checkpoint
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise UserError(f"cannot read {path} ({str(e).splitlines()[0][:100]}): pass an fcmae {command} "
                        f"checkpoint to --resume, or --no-resume to start over") from None
    if not isinstance(checkpoint, dict) or "loops" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint of `fcmae {command}`: pass one to --resume "
                        f"(<run>/checkpoints/last.ckpt), or --no-resume")
    saved = checkpoint.get("hyper_parameters", {})
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise UserError(f"{path} was trained with {key}={saved[key]}, this run asks for {value}: "
                            f"use another --output, or --no-resume to start over")
    return str(path)


def make_precision(precision):
    """`auto` -> bf16-mixed on GPUs that support it, else 32; other values pass through."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32"
