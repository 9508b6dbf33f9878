"""Writing files so that nothing already written is lost: every result, checkpoint, export,
shard and listing goes to `<path>.tmp`, is fsynced, then renamed over `<path>` (atomic on POSIX:
a reader sees the old file or the whole new one), and the directory is fsynced so the rename
itself survives a crash. A failure (a kill, a full disk) leaves the previous file whole."""
import errno
import io
import os
from pathlib import Path

from fcmae.errors import SettingError


def os_error(e):
    """The OSError behind `e`, if any: torch.save's zip writer may replace a failed write's
    OSError (e.g. ENOSPC) with a RuntimeError of its own while closing the file."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def atomic_write(path, write, mode=None, tmp=None):
    """write(tmp) fills a temporary file beside `path` (`<path>.tmp`, or `tmp`: e.g. one per
    process where several may write the same file); it is fsynced and renamed over `path`.
    A full disk or an unwritable folder is a one-line UserError; the partial file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = os_error(e)
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SettingError(f"no space left on device while saving {path}: free space or point `output` "
                               f"elsewhere; the previous checkpoint is intact") from e
        if cause is not None:
            raise SettingError(f"cannot write {path} ({cause}): check the disk, or point `output` elsewhere; "
                               f"the previous checkpoint is intact") from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_atomic(path, data, mode=0o644):
    """`data` (str or bytes) to `path`, atomically; returns the path."""
    data = data.encode() if isinstance(data, str) else data
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), mode=mode)


def append_line(path, line):
    """Append one line (e.g. a JSON record) and fsync: earlier lines are never rewritten."""
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_figure(fig, path, dpi=120):
    """A matplotlib figure as a PNG at `path`, atomically; returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return write_atomic(path, buf.getvalue())
