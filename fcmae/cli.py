"""The `fcmae` command. Each subcommand lives in its own module exposing `build_parser()` (a
jsonargparse parser) and `run(cfg)`; this file only assembles them and turns `UserError` into
one line on stderr and exit code 2."""
import importlib
import sys
from importlib.resources import files

from jsonargparse import ArgumentParser

from fcmae.errors import UserError

COMMANDS = {
    "pretrain": ("fcmae.pretrain", "FCMAE self-supervised pre-training"),
    "finetune": ("fcmae.finetune.cli", "fine-tune (or linear-probe) a classifier"),
    "eval": ("fcmae.finetune.evaluate", "evaluate a classifier checkpoint"),
    "export": ("fcmae.export", "export weights in the public dense layout"),
    "bench": ("fcmae.bench", "benchmark a pre-training step of each backend"),
}
RECIPE_COMMANDS = ("pretrain", "finetune")  # have per-size recipe files in configs/<command>/


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


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = ArgumentParser(prog="fcmae", description="FCMAE pre-training and fine-tuning of ConvNeXt V2")
        subcommands = parser.add_subcommands(dest="command")
        modules = {}
        for name, (module_name, help_text) in COMMANDS.items():
            modules[name] = importlib.import_module(module_name)
            subcommands.add_subcommand(name, modules[name].build_parser(), help=help_text)
        if argv and argv[0] in RECIPE_COMMANDS:
            argv = [argv[0]] + with_recipe(argv[0], argv[1:], modules[argv[0]].DEFAULT_MODEL)
        cfg = parser.parse_args(argv)
        return modules[cfg.command].run(cfg[cfg.command])
    except UserError as e:
        print(f"fcmae: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("fcmae: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
