"""The layering of our modules, and that every module imports on its own, first, in a fresh
interpreter (an import cycle that only bites in one order shows up there).

The layers: the library (the core, fcmae/data, fcmae/training, ...), task packages beside it
(TASKS: classification, and the next task's), and commands on top (fcmae/commands/, one module
per subcommand), which only fcmae/cli.py imports."""
import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pyproject's package-dir: {folder: package} of everything we install (a new package is covered
# as soon as it is declared there).
PACKAGES = {folder: package for package, folder in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].items()
            if package != "fcmae.configs"}
# Task packages: the run layer serves them, the library never imports them. Add the next one here.
TASKS = ("fcmae.finetune", "fcmae.segment")
COMMANDS = "fcmae.commands"


def modules():
    """{module name: source path} of every module we install, subpackages included."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [package, *rel.parts[:-1]] + ([] if rel.name == "__init__" else [rel.name])
            found[".".join(parts)] = path
    return found


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def within(module, package):
    return module == package or module.startswith(package + ".")


def imports(name, path, known):
    """Our modules that `name` imports anywhere in its source (top level or inside functions:
    a lazy import still closes a cycle)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            # the longest known module name the target starts with; a package's own
            # __init__ is not an edge of its submodules (Python imports it first anyway)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not (name.startswith(t + ".") and known[t].stem == "__init__"):
                out.add(t)
    return out


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_no_import_cycle():
    g = graph()
    assert "fcmae.masking" in g and "fcmae.encoders.backends" in g and "fcmae.data.reading" in g
    assert not any(m.startswith("fcmae.encoders") for m in g["fcmae.masking"]), "masking must not import the encoders"
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


def test_only_the_cli_imports_commands_and_no_command_another():
    g = graph()
    commands = {m for m in g if within(m, COMMANDS) and m != COMMANDS}
    assert {"fcmae.commands.pretrain", "fcmae.commands.finetune", "fcmae.commands.eval"} <= commands
    for name, targets in g.items():
        imported = {t for t in targets if t in commands}
        if name == "fcmae.cli":
            continue
        assert not imported, f"{name} imports the command module(s) {sorted(imported)}: only fcmae/cli.py may"
    import fcmae.cli
    assert {module for module, _ in fcmae.cli.COMMANDS.values()} == commands  # every command, registered


def test_the_library_imports_no_task_package():
    g = graph()
    assert "fcmae.finetune.task" in g
    for name, targets in g.items():
        if within(name, COMMANDS) or name == "fcmae.cli":
            continue  # commands sit on top: they may use any task
        own = next((task for task in TASKS if within(name, task)), None)
        wrong = sorted(t for t in targets for task in TASKS if within(t, task) and task != own)
        assert not wrong, f"{name} imports {wrong}: a library module (or another task) must not import a task package"


IMPORT_EACH = """
import importlib, json, sys
names = json.loads(sys.argv[1])
def fresh():
    for m in [m for m in sys.modules if m == "fcmae" or m.startswith("fcmae.")]:
        del sys.modules[m]
failures = {}
for first in names:  # each module first, alone
    fresh()
    try:
        importlib.import_module(first)
    except Exception as e:
        failures[first] = repr(e)
for order in (names, names[::-1]):  # then all of them, in both orders
    fresh()
    for n in order:
        try:
            importlib.import_module(n)
        except Exception as e:
            failures[n] = repr(e)
print(json.dumps(failures))
"""


def test_every_module_imports_first_in_any_order():
    names = sorted(modules())
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", IMPORT_EACH, json.dumps(names)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}
