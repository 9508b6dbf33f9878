"""Rules the source keeps, checked on its syntax tree: functions stay short, every run-directory
file name is spelled in fcmae/rundir.py only, the patch size is fcmae/masking.py's, and tests
share code through tests/helpers.py and conftest.py only."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("fcmae", "encoders", "decoders", "finetune")  # what we install (a new task package: add it)
EVERYTHING = (*LIBRARY, "benchmarks", "tests")
MAX_LINES = 80
# The names of a run directory's files and folders (fcmae/rundir.py's docstring lists them).
RUN_DIR_NAMES = {"last.ckpt", "best.ckpt", "metrics.jsonl", "config.yaml", "skipped_files.txt", "val_split.txt",
                 "encoder.safetensors", "classifier.safetensors", "classifier_ema.safetensors",
                 "classifier_best.safetensors", "confusion.png", "curves.png", "checkpoints", "tensorboard",
                 "reconstructions"}


def sources(folders):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path.relative_to(ROOT), ast.parse(path.read_text())


def docstrings(tree):
    """The ids of the string constants that are docstrings (they describe, they do not name paths)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def strings(tree):
    """(line, text) of every string constant that is not a docstring, f-string pieces included."""
    skip = docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def test_no_function_is_longer_than_80_lines():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in sources(EVERYTHING) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= MAX_LINES]
    assert not long, "split these functions: " + "; ".join(long)


def test_run_directory_names_are_spelled_in_rundir_only():
    spelled = [f"{path}:{line} {text!r}" for path, tree in sources(LIBRARY) if path != Path("fcmae/rundir.py")
               for line, text in strings(tree) if text.strip("/") in RUN_DIR_NAMES]
    assert not spelled, "use fcmae.rundir for: " + "; ".join(spelled)
    rundir = {text for _, text in strings(ast.parse((ROOT / "fcmae/rundir.py").read_text()))}
    assert {"last.ckpt", "metrics.jsonl", "config.yaml", "checkpoints"} <= rundir


def test_the_patch_size_is_spelled_in_masking_only():
    """No arithmetic with a literal 32 and no "multiple of 32" outside fcmae/masking.py: other
    modules take PATCH_SIZE, check_input_size or check_mask_ratio from it."""
    found = []
    for path, tree in sources(LIBRARY):
        if path == Path("fcmae/masking.py"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.FloorDiv, ast.Div, ast.Mult)):
                if any(isinstance(side, ast.Constant) and side.value == 32 for side in (node.left, node.right)):
                    found.append(f"{path}:{node.lineno} arithmetic with 32")
        found += [f"{path}:{line} {text!r}" for line, text in strings(tree)
                  if "multiple of 32" in text or "32x32" in text]
    assert not found, "take the patch size from fcmae.masking: " + "; ".join(found)


def test_tests_share_code_through_conftest_and_helpers_only():
    """No test module imports another one: what tests share lives in tests/helpers.py or a conftest.py."""
    tests = {path.stem for path in (ROOT / "tests").rglob("test_*.py")}
    found = []
    for path, tree in sources(["tests"]):
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path}:{node.lineno} {name}" for name in names if name.split(".")[-1] in tests]
    assert not found, "move what these share into tests/helpers.py: " + "; ".join(found)
