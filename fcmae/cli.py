"""The `fcmae` command. Each subcommand lives in its own module exposing `build_parser()` (a
jsonargparse parser) and `run(cfg)`; this file only assembles them and turns `UserError` into
one line on stderr and exit code 2, and `Stopped` (a run stopped and saved on SIGTERM, SIGINT or
SIGUSR1) into its one line and exit code 128 + the signal number. A command's `run` may return an
exit code (None: 0)."""
import importlib
import re
import sys
from argparse import ArgumentError

from jsonargparse import ArgumentParser

from fcmae.errors import Stopped, UserError
from fcmae.listflags import list_flags, list_words
from fcmae.training.flags import with_recipe

# One module each under fcmae/commands/, exposing build_parser() and run(cfg); only this file imports them.
COMMANDS = {
    "pretrain": ("fcmae.commands.pretrain", "FCMAE self-supervised pre-training"),
    "finetune": ("fcmae.commands.finetune", "fine-tune (or linear-probe) a classifier"),
    "eval": ("fcmae.commands.eval", "evaluate a classifier checkpoint"),
    "predict": ("fcmae.commands.predict", "predict the classes of images with a classifier (CSV)"),
    "export": ("fcmae.commands.export", "export weights in the public dense layout"),
    "bench": ("fcmae.commands.bench", "benchmark a pre-training step of each backend"),
    "shard": ("fcmae.commands.shard", "write a data folder as WebDataset shards"),
    "knn": ("fcmae.commands.knn", "weighted kNN accuracy of an encoder's frozen features"),
    "analyze": ("fcmae.commands.analyze", "feature collapse: the paper's per-layer feature cosine distance"),
}
RECIPE_COMMANDS = ("pretrain", "finetune")  # have per-size recipe files in configs/<command>/ (training.flags)


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
        text = re.sub(r"^[\w.]*(UserError|SettingError): ", "", text.rstrip().splitlines()[-1])
    return text


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # exit_on_error=False (subcommands included): a bad option is one line below, not a usage
        # block and a multi-line message.
        parser = ArgumentParser(prog="fcmae", description="FCMAE pre-training and fine-tuning of ConvNeXt V2",
                                exit_on_error=False)
        subcommands = parser.add_subcommands(dest="command")
        modules, parsers = {}, {}
        for name, (module_name, help_text) in COMMANDS.items():
            modules[name] = importlib.import_module(module_name)
            parsers[name] = modules[name].build_parser()
            subcommands.add_subcommand(name, parsers[name], help=help_text)
        if argv and argv[0] in parsers:
            argv = [argv[0]] + list_words(argv[1:], list_flags(parsers[argv[0]]))
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
