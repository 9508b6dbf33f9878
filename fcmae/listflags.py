"""List-valued flags as people type them, for every command: `--backends sparse dense`,
`--backends sparse,dense` and `--backends [sparse,dense]` alike. jsonargparse parses a list
flag from one value in list syntax only; `list_words` rewrites the other two forms into it
before parsing, so jsonargparse still checks every item against the flag's type."""
from typing import Union, get_args, get_origin


def list_flags(parser):
    """The option strings of `parser` whose type is a list or tuple (also inside an Optional)."""
    def is_list(hint):
        if get_origin(hint) is Union:
            return any(is_list(h) for h in get_args(hint))
        return get_origin(hint) in (list, tuple)
    return {o for a in parser._actions if is_list(getattr(a, "_typehint", None)) for o in a.option_strings}


def list_words(args, flags):
    """List-valued flags as people type them: `--backends sparse dense` and `--backends
    sparse,dense` -> `--backends [sparse,dense]`, the one form jsonargparse parses (and checks
    each item of, against the flag's type); `[...]` itself passes as it is. The words are those
    up to the next `--option`."""
    out, i = [], 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag not in flags:
            out.append(args[i])
            i += 1
            continue
        words, i = ([value], i + 1) if eq else ([], i + 1)
        while not eq and i < len(args) and not args[i].startswith("--"):
            words.append(args[i])
            i += 1
        items = [item.strip() for word in words for item in word.split(",") if item.strip()]
        bracketed = len(words) == 1 and words[0].strip().startswith("[")
        out += [flag] + (words if bracketed or not items else [f"[{','.join(items)}]"])
    return out
