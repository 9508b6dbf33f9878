"""Small result files (JSON, CSV, PNG) written atomically: a temporary file, fsynced, renamed
over the target, so a reader never sees half a file."""
import os
from pathlib import Path


def write_atomic(path, data):
    """Write `data` (str or bytes) to `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def append_line(path, line):
    """Append one line (a JSON record) and fsync: earlier lines are never rewritten."""
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())
