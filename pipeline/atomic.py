"""How the project replaces a file, atomically.

`write_atomic` is the one way the project replaces a file: a temporary file in the same
directory (created with the mode the umask gives new files, not tempfile's 0600), flushed and
fsynced, renamed over the target, then the directory fsynced, so that a reader (or a process
killed mid-write) sees the old file or the whole new one, and the new name survives a crash.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the OS allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is done
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str | Callable[[IO[bytes]], Any]) -> Path:
    """Replace `path` with `data` (bytes, text, or a function that writes to a binary file),
    so that readers see the old file or the complete new one. The directory must exist: one
    removed while a run writes into it is an error (ENOENT), never silently made again."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
