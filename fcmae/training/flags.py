"""The flags every training command shares and their checks, and recipes: the per-size recipe
file a command reads first (configs/<command>/<model>.yaml), and telling the values a recipe
gives from the flags a user passed.

A training command adds the groups to its parser (`add_optimization_flags`, `add_hardware_flags`,
`add_run_flags`, then its own flags); `fcmae.cli` puts the recipe file first (`with_recipe`), so
every flag overrides it; a task compares its values with `recipe_values` to know which ones the
user chose (a recipe value may be fitted to the data, a chosen one is kept).
"""
from importlib.resources import files
from typing import Literal, Optional, Union

from jsonargparse import ActionYesNo

from fcmae.errors import UserError
from fcmae.precision import PRECISIONS
from fcmae.rundir import CHECKPOINTS, LAST

STRATEGIES = ("auto", "ddp", "fsdp")


# ----------------------------------------------------------------------------- flags

def add_hardware_flags(parser, devices="auto", strategy=True):
    """--accelerator, --devices, --num-nodes, --strategy (if `strategy`), --precision, --workers,
    --channels-last."""
    g = parser.add_argument_group("hardware")
    g.add_argument("--accelerator", type=str, default="auto", help="auto | cpu | gpu | ...")
    g.add_argument("--devices", type=Union[int, str], default=devices, help="devices per node: N, 'auto' or '0,1'")
    g.add_argument("--num-nodes", type=int, default=1)
    if strategy:
        g.add_argument("--strategy", type=Literal[STRATEGIES], default="auto",
                       help="auto = DDP when more than one device; fsdp shards large/huge")
    g.add_argument("--precision", type=Literal[PRECISIONS], default="auto",
                   help="auto = bf16-mixed on GPUs that support it and on CPUs with AMX or AVX-512 BF16 "
                        "(bf16 matrix products in hardware), else 32; the run prints what it picked")
    g.add_argument("--workers", type=Union[Literal["auto"], int], default="auto",
                   help="data loader processes per device; auto: the node's cores shared among its devices, less "
                        "one per GPU for its training process (on the CPU, less half for its compute threads)")
    g.add_argument("--channels-last", action=ActionYesNo(no_prefix="no-"), default=False,
                   help="convolution weights (and so activations) in channels-last memory format: cuDNN's "
                        "fast depthwise kernels take it; whether a run gains is for `fcmae bench --channels-last` "
                        "to tell")
    return g


def add_optimization_flags(parser, batch_size, epochs, blr, min_lr, warmup_epochs):
    """The flags of the lr schedule and AdamW every training command has, with its defaults.
    Returns the group for the command's own (accumulation, betas, layer decay, ...)."""
    g = parser.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per device per step")
    g.add_argument("--epochs", type=int, default=epochs, help="length of the lr schedule")
    g.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimizer steps (the schedule still spans --epochs); -1: no limit")
    g.add_argument("--blr", type=float, default=blr, help="base lr, per 256 images of effective batch")
    g.add_argument("--lr", type=Optional[float], default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=min_lr, help="lr at the end of the cosine")
    g.add_argument("--warmup-epochs", type=float, default=warmup_epochs, help="linear warmup length")
    g.add_argument("--weight-decay", type=float, default=0.05, help="not on biases, norm weights, GRN gamma/beta")
    g.add_argument("--seed", type=int, default=0)
    return g


def add_run_flags(parser, output_help):
    """--output, --resume, --no-resume, --trust-checkpoint, --log-every, --dry-run. Returns the
    group for the command's own (what it writes, and how often)."""
    g = parser.add_argument_group("run directory")
    g.add_argument("--output", type=Optional[str], default=None, help=output_help)
    g.add_argument("--resume", type=str, default="auto",
                   help=f"'auto': continue from <output>/{CHECKPOINTS}/{LAST} if present; or a .ckpt path")
    g.add_argument("--no-resume", action="store_true",
                   help="start from scratch even if <output> holds checkpoints (they are overwritten)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoint/weights files that need full unpickling: this runs code from the file; "
                        "only for files you trust")
    g.add_argument("--log-every", type=int, default=50, help="steps between scalar logs")
    g.add_argument("--dry-run", action="store_true",
                   help="print the fully resolved configuration (devices, batch, lr, ...) and exit")
    return g


def check(cfg, *at_least_one):
    """Cheap checks of the shared flags, and of the command's `at_least_one` counts (None: not given)."""
    for name in ("batch_size", "epochs", "log_every", *at_least_one):
        if cfg[name] is not None and cfg[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} {cfg[name]}: must be at least 1")
    if cfg.workers != "auto" and cfg.workers < 0:
        raise UserError(f"--workers {cfg.workers}: must be 0 (load in the training process) or more")


# ----------------------------------------------------------------------------- recipes

def recipe_path(command, model):
    """configs/<command>/<model>.yaml, shipped inside the package."""
    path = files("fcmae.configs") / command / f"{model}.yaml"
    if not path.is_file():
        raise UserError(f"no {command} recipe for model '{model}' (looked for configs/{command}/{model}.yaml): "
                        f"pass a known size or --config FILE")
    return str(path)


def with_recipe(command, args, default_model):
    """Put the size's recipe file first, so the command line overrides it; `--config` replaces it."""
    if any(a == "--config" or a.startswith("--config=") for a in args) or "-h" in args or "--help" in args:
        return args
    model = default_model
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args):
            model = args[i + 1]
        elif a.startswith("--model="):
            model = a.split("=", 1)[1]
    return ["--config", recipe_path(command, model)] + args


def recipe_values(parser, cfg):
    """What the recipe file(s) of `cfg` alone give (the parser's defaults without one), to tell
    the user's flags from the recipe's values."""
    args = []
    for path in cfg.get("config") or []:
        args += ["--config", str(path)]
    return parser.parse_args(args)
