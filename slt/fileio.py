"""Atomic file writes, and where a path the user typed may be written.

Atomic: a reader (or a resumed run) never sees a half-written file. Safe outputs: `--out`
never destroys. A typed output file is written only when it is new or an existing regular
file that the command does not read; a symlink is written through (its target replaced
atomically, the link kept), never replaced by a file; devices, FIFOs, sockets and folders
are never replaced.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slt.errors import StorageError, storage_error

PathLike = str | os.PathLike[str]


@functools.cache
def _umask() -> int:
    """The process's umask (read once: reading it means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def link_target(path: PathLike) -> Path | None:
    """`path` with every symlink resolved (absolute): where a write lands, also for a link
    whose target does not exist yet. None for a symlink loop (writing there would replace a
    link). A path that cannot be looked up (a component that is a file, a name too long) is
    returned as far as it resolves: the write that follows names the system's reason."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError as exc:
        real = Path(os.path.realpath(path))
        if exc.errno == errno.ELOOP or os.path.islink(real):  # islink: never raises
            return None
        return real


def output_file(path: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """Where to write the output file the user named `path`: itself, or a symlink's target
    (written through: the link is kept). Raises StorageError with one line unless that is a
    new file in an existing folder, or an existing regular file that is none of `inputs`
    (same file by device and inode, so a hard link or a symlink to an input counts; a
    folder in `inputs` makes every file under it an input). A name ending in '/' is a
    folder, never a file."""
    text = os.fspath(path)
    if not text:
        raise StorageError("cannot write '': the output path is empty")
    if text.endswith(("/", os.sep)):
        raise StorageError(f"cannot write {text}: a path ending in '/' names a folder, and "
                           "this output is one file: add the file's name")
    target = link_target(text)
    if target is None:
        raise StorageError(f"cannot write {text}: it is a symlink loop")
    via = f" (a symlink to {target})" if os.path.islink(text) else ""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if not os.path.isdir(target.parent):
            raise StorageError(f"cannot write {text}{via}: folder {target.parent} does not "
                               "exist") from None
        return target
    except OSError as exc:
        raise storage_error(exc, "write", text) from None
    if not stat.S_ISREG(st.st_mode):
        raise StorageError(f"cannot write {text}{via}: it is {_kind(st.st_mode)}, not a "
                           "regular file (slt writes only new or regular files)")
    for given in inputs:
        if _is_input(target, st, given):
            which = ("" if os.path.abspath(given) == os.path.abspath(text)
                     else f" (the same file as {os.fspath(given)})")
            raise StorageError(f"cannot write {text}{via}: it is an input of this "
                               f"command{which}; choose another output file")
    return target


def _is_input(target: Path, st: os.stat_result, given: PathLike) -> bool:
    """Whether the existing file `target` (stat `st`) is the input `given`, or lies under
    it when `given` is a folder."""
    try:
        inp = os.stat(given)
    except OSError:
        return False  # an input that is gone cannot be overwritten
    if (inp.st_dev, inp.st_ino) == (st.st_dev, st.st_ino):
        return True
    return stat.S_ISDIR(inp.st_mode) and target.is_relative_to(os.path.realpath(given))


def output_dir(path: PathLike, create: bool = True, name: str = "output folder") -> Path:
    """The output folder the user named `path` (as typed; a symlink to a folder is used as
    the folder), created with its parents when missing and `create`. Raises StorageError
    with one line, calling it the `name`, when it exists and is not a folder (a file, a
    device, a FIFO, a symlink to one of those, to nothing or to itself), or cannot be
    created. Without `create`, a path that cannot be looked up is left to its creator."""
    text = os.fspath(path)
    if not text:
        raise StorageError(f"cannot use '' as the {name}: the path is empty")
    target = link_target(text)
    if target is None:
        raise StorageError(f"cannot use {text} as the {name}: it is a symlink loop")
    via = f" (a symlink to {target})" if os.path.islink(text) else ""
    try:
        st = os.stat(target)
    except OSError as exc:
        if via and isinstance(exc, FileNotFoundError):  # where a link points: never made
            raise StorageError(f"cannot use {text} as the {name}: it is a symlink to "
                               f"{target}, which does not exist") from None
        if create:  # missing, or not looked up: creating it says why, in one line
            try:
                os.makedirs(text, exist_ok=True)
            except OSError as err:
                raise storage_error(err, f"create the {name}", text) from None
        return Path(text)
    if not stat.S_ISDIR(st.st_mode):
        what = "a regular file" if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)
        raise StorageError(f"cannot use {text}{via} as the {name}: it is {what}, not a "
                           "folder")
    return Path(text)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: the old content stays whole
    until the new one is. A symlink is written through (the temporary file goes beside its
    target, which the rename replaces; the link stays); a device, FIFO, socket or folder is
    never replaced. A filesystem failure (full disk, read-only, permissions) is one
    StorageError naming `path`."""
    shown = path
    path = link_target(path)
    if path is None:
        raise StorageError(f"cannot write {os.fspath(shown)}: it is a symlink loop")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # missing (the usual case), or unreadable: mkstemp or rename will say
    if mode is not None and not stat.S_ISREG(mode):
        raise StorageError(f"cannot write {os.fspath(shown)}: it is {_kind(mode)}, not a "
                           "regular file")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise storage_error(exc, "write", shown) from None
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
            raise storage_error(exc, "write", shown) from None
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def torch_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a file is not one torch.save wrote, or None. torch.save stores its zip entries
    uncompressed, so entries that inflate past the file's own size are a zip bomb, which
    `weights_only` loading does not stop. Files that are not zips are left to torch.load."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
        size = os.path.getsize(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None  # torch.load says what it is (or why it cannot be read)
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        return "its entries are compressed, which torch.save never writes"
    if sum(e.file_size for e in entries) > size:
        return "its entries claim more bytes than the file holds"
    return None


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    buf = io.BytesIO()
    import torch  # here: what only reads and writes text needs no torch

    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
