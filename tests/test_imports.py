"""No import cycle between our modules, and every module imports on its own, first, in a fresh
interpreter (an import cycle that only bites in one order shows up here)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fcmae": "fcmae", "encoders": "fcmae.encoders", "decoders": "fcmae.decoders", "finetune": "fcmae.finetune",
            "segment": "fcmae.segment"}


def modules():
    """{module name: source path} of every module we install (pyproject's package-dir)."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


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
            if t and t != name and not (t in PACKAGES.values() and name.startswith(t + ".")):
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
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "fcmae.masking" in graph and "fcmae.encoders.backends" in graph
    assert not any(m.startswith("fcmae.encoders") for m in graph["fcmae.masking"]), "masking must not import the encoders"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


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
