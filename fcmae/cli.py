"""The `fcmae` command. Each subcommand lives in its own module exposing `build_parser()` (a
jsonargparse parser) and `run(cfg)`; this file only assembles them and turns `UserError` into
one line on stderr and exit code 2, and `Stopped` (a run stopped and saved on SIGTERM, SIGINT or
SIGUSR1) into its one line and exit code 128 + the signal number. A command's `run` may return an
exit code (None: 0)."""
import importlib
import re
import sys
from argparse import ArgumentError
from importlib.resources import files

from jsonargparse import ArgumentParser

from fcmae.errors import Stopped, UserError

COMMANDS = {
    "pretrain": ("fcmae.pretrain", "FCMAE self-supervised pre-training"),
    "finetune": ("fcmae.finetune.cli", "fine-tune (or linear-probe) a classifier"),
    "eval": ("fcmae.finetune.evaluate", "evaluate a classifier checkpoint"),
    "predict": ("fcmae.predict", "predict the classes of images with a classifier (CSV)"),
    "export": ("fcmae.export", "export weights in the public dense layout"),
    "bench": ("fcmae.bench", "benchmark a pre-training step of each backend"),
    "shard": ("fcmae.shard", "write a data folder as WebDataset shards"),
    "knn": ("fcmae.knn", "weighted kNN accuracy of an encoder's frozen features"),
    "analyze": ("fcmae.analyze", "feature collapse: the paper's per-layer feature cosine distance"),
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


def option_error(message, command):
    """jsonargparse's error (several lines: `Parser key "x":` then the expected type) -> one line
    that names the option and points at --help."""
    message = re.sub(r'^Parser key "([^"]+)":', lambda m: "--" + m[1].replace("_", "-") + ":", message)
    message = re.sub(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)",
                     lambda m: f"got '{m[2].strip()}', pass one of {m[1].replace(chr(39), '')}", message, flags=re.S)
    message = re.sub(r"<class '(\w+)'>", r"\1", message)
    message = re.sub(r"Does not validate against any of the Union subtypes\s+Subtypes: \[(.*?)\].*Given value: (.*)",
                     lambda m: f"got '{m[2].strip()}', expected one of {m[1]}", message, flags=re.S)
    message = re.sub(r"Expected a (\w+)\. Got value: (.*)", lambda m: f"got '{m[2].strip()}', expected {m[1]}",
                     message, flags=re.S)
    help_command = f"fcmae {command} --help" if command in COMMANDS else "fcmae --help"
    return f"{' '.join(message.split())} (see {help_command})"


def user_message(e):
    """A UserError raised in a DataLoader worker comes back wrapped with the worker's traceback:
    keep its own message, the last line."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
    return text


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # exit_on_error=False (subcommands included): a bad option is one line below, not a usage
        # block and a multi-line message.
        parser = ArgumentParser(prog="fcmae", description="FCMAE pre-training and fine-tuning of ConvNeXt V2",
                                exit_on_error=False)
        subcommands = parser.add_subcommands(dest="command")
        modules = {}
        for name, (module_name, help_text) in COMMANDS.items():
            modules[name] = importlib.import_module(module_name)
            subcommands.add_subcommand(name, modules[name].build_parser(), help=help_text)
        if argv and argv[0] in RECIPE_COMMANDS:
            argv = [argv[0]] + with_recipe(argv[0], argv[1:], modules[argv[0]].DEFAULT_MODEL)
        cfg = parser.parse_args(argv)
        code = modules[cfg.command].run(cfg[cfg.command])
    except ArgumentError as e:
        print(f"fcmae: error: {option_error(str(e), argv[0] if argv else '')}", file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f"fcmae: error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:  # a scheduler's signal: the run is saved (fcmae/preemption.py)
        if e.rank == 0:
            print(f"fcmae: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("fcmae: interrupted", file=sys.stderr)
        sys.exit(130)
    if code:  # a command's own failure code, e.g. predict's 1: some files could not be read
        sys.exit(code)


if __name__ == "__main__":
    main()
