"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import functools
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from slt.errors import storage_error


@functools.cache
def _umask() -> int:
    """The process's umask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: the old content stays whole
    until the new one is. A filesystem failure (full disk, read-only, permissions) is one
    StorageError naming `path`."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise storage_error(exc, "write", path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            # mkstemp makes the file private (0600); a run is a shared result: the usual mode
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # left for the run's next writer to clean (slt.rundir.clean_temp_files)
        if isinstance(exc, OSError):
            raise storage_error(exc, "write", path) from None
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    buf = io.BytesIO()
    import torch  # here: what only reads and writes text needs no torch

    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
