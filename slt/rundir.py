"""A run directory: its file names, its one-writer lock, and careful reads of what a run left.

Everything that decides whether a run is finished, resumable or damaged reads through here,
so `slt search`, `slt sweep` and `slt report` judge a run directory the same way.

The lock is `flock` on `<run>/.lock`: the kernel drops it when the holding process exits,
however it exits (kill -9 included), so a dead run never leaves a stale lock. The file stays
behind on purpose (deleting a lock file races with a process about to lock it); it holds the
holder's pid and host, for messages only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slt.errors import StorageError, first_line, storage_error

if TYPE_CHECKING:
    from slt.config.schema import Config

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
TICKET = "ticket.slt"
SUMMARY = "summary.json"
ERROR = "error.json"
LOCK = ".lock"
MAGIC = b"SLTTICK1"  # a ticket file's first bytes (slt.ticket writes it)
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, TICKET, SUMMARY, ERROR)

# errno values of a filesystem that does not implement flock (NFS mounted with `nolock`,
# some FUSE filesystems): the run goes on unlocked, with a warning.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """The exclusive right to write one run directory, held until `release` (or exit)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None
        self.unsupported = ""  # why the filesystem could not lock, when it could not

    def acquire(self, wait: bool, on_wait: Callable[[str], None] | None = None,
                poll_s: float = 0.5, record: bool = True) -> bool:
        """Take the lock. With `wait`, block until the holder exits (calling `on_wait` once
        with the holder's description); without, return False when another process holds it.
        With `record`, write this process as the holder (a mere probe does not)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(exc, "open the lock file", self.path) from None
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        os.close(fd)
                        return False
                    if not told and on_wait is not None:
                        on_wait(self.holder())
                        told = True
                    time.sleep(poll_s)  # polled, so Ctrl-C still interrupts the wait at once
                except OSError as exc:
                    if exc.errno not in _NO_LOCKS:
                        raise
                    self.unsupported = os.strerror(exc.errno)
                    break
        except BaseException:  # an error, or Ctrl-C while waiting: no descriptor left open
            os.close(fd)
            raise
        self._fd = fd
        if not record:
            return True
        try:  # who holds it, for the messages of a process that waits
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same
        return True

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ("pid 123 on host")."""
        try:
            text = self.path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        return text or "another process"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_alive(run_dir: Path) -> bool | None:
    """Whether the process named in `run_dir/.lock` still runs, without touching the lock
    (a probe that took it, however briefly, could make a sweep skip the point): False when
    it is a process of this host that has exited (a killed or interrupted run), True when
    it lives, None when that cannot be told (no holder recorded, another host)."""
    try:
        text = (run_dir / LOCK).read_text(errors="replace")
    except OSError:
        return None
    parts = text.split()
    if len(parts) != 4 or parts[0] != "pid" or parts[2] != "on" or not parts[1].isdigit():
        return None
    if parts[3] != socket.gethostname():
        return None
    return pid_alive(parts[1])


def pid_alive(pid: Any) -> bool:
    """Whether process `pid` of this host runs (False for no such process or no pid)."""
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except OSError:
        return True  # it exists, as another user's process
    return True


def locked_by(run_dir: Path) -> str | None:
    """The holder's description when another process writes `run_dir` now, else None."""
    lock = RunLock(run_dir)
    if not lock.path.is_file():
        return None
    try:
        if lock.acquire(wait=False, record=False):
            lock.release()
            return None
    except OSError:
        return None  # cannot tell (e.g. a read-only folder): the writer's own lock decides
    return lock.holder()


def clean_temp_files(run_dir: Path) -> list[str]:
    """Remove temporary files that interrupted atomic writes left (`.checkpoint.pt.*.tmp`
    and the like). Only the run's own files: a report may be writing its cache beside them.
    Call with the lock held, so no writer of this run is mid-write."""
    removed = []
    for name in RUN_FILES:
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp.name)
            except FileNotFoundError:
                pass
    return removed


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(rows, number of damaged lines) of a metrics.jsonl: a row is a JSON object with an
    integer epoch. Lines cut short by an interruption, garbage and undecodable bytes are
    counted, not raised."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    rows, bad = [], 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # bad bytes, bad JSON, nested past the stack
            bad += 1
            continue
        if isinstance(row, dict) and is_whole_number(row.get("epoch")) \
                and is_finite_number(row.get("test_acc")):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def read_json(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(object, "") for a file holding one JSON object, else (None, what is wrong with it);
    a missing file is (None, "")."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"{path.name} cannot be read ({exc.strerror})"
    if not raw.strip():
        return None, f"{path.name} is empty"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, f"{path.name} is not UTF-8 text"
    except json.JSONDecodeError as exc:
        return None, f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno})"
    except RecursionError:
        return None, f"{path.name} is not valid JSON (nested too deeply)"
    except ValueError as exc:  # an integer of more digits than Python converts
        return None, f"{path.name} is not valid JSON ({first_line(exc)})"
    if not isinstance(obj, dict):
        return None, f"{path.name} holds a JSON {type(obj).__name__}, not an object"
    return obj, ""


def is_whole_number(value: Any) -> bool:
    """An int read from a file, not a bool (JSON's true is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An int or float read from a file, finite and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def read_summary(run_dir: Path, expect_hash: str | Collection[str] | None = None
                 ) -> tuple[dict[str, Any] | None, str]:
    """(summary, "") for a finished run; (None, "") for a run without a summary; (None,
    what is wrong) when summary.json or the ticket it vouches for is damaged. A run counts as
    finished only on a summary that parses, has its figures and matches an intact ticket.
    `expect_hash` may name several hashes (config.config_hashes: today's and the legacy)."""
    summary, problem = read_json(run_dir / SUMMARY)
    if summary is None:
        return None, problem
    for key in ("final_test_acc", "best_test_acc", "epochs"):
        if not is_finite_number(summary.get(key)):
            return None, f"{SUMMARY} lacks a valid {key}"
    layers = summary.get("layers")
    if not isinstance(layers, list) or not all(
            isinstance(row, dict) and isinstance(row.get("name"), str)
            and is_finite_number(row.get("source_density")) for row in layers):
        return None, f"{SUMMARY} lacks a valid per-layer table (layers)"
    if not isinstance(summary.get("config_hash"), str):
        return None, f"{SUMMARY} lacks its config_hash"
    allowed = (expect_hash,) if isinstance(expect_hash, str) else expect_hash
    if allowed is not None and summary["config_hash"] not in allowed:
        return None, f"{SUMMARY} belongs to another config (hash {summary.get('config_hash')})"
    ticket_problem = ticket_damage(run_dir / TICKET, summary["config_hash"])
    if ticket_problem:
        return None, ticket_problem
    return summary, ""


def locate_run(out_root: Path, cfg: Config) -> Path:
    """The run directory of `cfg` under `out_root`. A run written under its legacy name
    (before run ids hashed only changed values) is renamed to today's name once, when no
    process holds it; a held one is used where it is, so its writer is not pulled away."""
    from slt.config.ids import legacy_run_id, run_id

    path = Path(out_root) / run_id(cfg)
    old = Path(out_root) / legacy_run_id(cfg)
    try:
        if path.exists() or old == path or not old.is_dir():
            return path
    except OSError:  # a name too long, a folder not readable: creating the run says so
        return path
    try:
        with RunLock(old) as lock:
            if not lock.acquire(wait=False, record=False):
                return old if old.is_dir() else path  # held: or renamed meanwhile
            os.rename(old, path)  # the lock's inode moves with it and is released after
    except FileNotFoundError:
        pass  # renamed by another process meanwhile
    except StorageError:  # its lock file vanished with it: renamed by another process
        if old.is_dir():
            raise
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise storage_error(exc, f"rename {old} to", path) from None
    return path


def ticket_damage(path: Path, expect_hash: str | None = None) -> str:
    """What is wrong with a ticket file ("" when it is intact): missing, unreadable,
    truncated, failing its checksum, or (with `expect_hash`) another config's ticket.
    Cheaper than loading it: the header alone is parsed (slt.ticket.load checks the rest)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror})"
    if len(raw) < len(MAGIC) + 8 + 32 or not raw.startswith(MAGIC):
        return f"{path.name} is not an slt ticket file"
    if hashlib.sha256(raw[:-32]).digest() != raw[-32:]:
        return f"{path.name} fails its checksum (corrupt or truncated)"
    if expect_hash is not None:
        start = len(MAGIC) + 8
        try:
            (length,) = struct.unpack("<Q", raw[len(MAGIC):start])
            header = json.loads(raw[start:start + length].decode("utf-8"))
            found = header.get("config_hash") if isinstance(header, dict) else None
        except (ValueError, struct.error, RecursionError):  # a header nested 100,000 deep
            found = None
        if found != expect_hash:
            return f"{path.name} is the ticket of another config (hash {str(found)[:40]})"
    return ""
