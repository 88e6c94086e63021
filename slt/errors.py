"""Errors that the CLI turns into one clear line and exit code 2."""

from __future__ import annotations

import difflib


class SltError(Exception):
    """Base of every user-facing error: the message alone must say what is wrong."""


class ConfigError(SltError):
    """A config key, value or combination that cannot be run."""


class ArgumentError(ConfigError, TypeError):
    """A public function called with an argument of the wrong type or value
    (slt.arguments): one line naming the argument, what it must be and what was given."""


class DataError(SltError):
    """A dataset that cannot be found or read."""


def did_you_mean(name: str, choices: list[str]) -> str:
    """A ' (did you mean 'x'?)' suffix for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): what a
    one-line error quotes of a library's multi-line message."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class StorageError(SltError):
    """A file or folder that cannot be written or read: full disk, read-only filesystem,
    permissions, a name too long. Named with its path and the system's reason."""


def storage_error(exc: OSError, action: str | None = None, path: object = None
                  ) -> StorageError:
    """One line for a failed filesystem call: what was done, where, the system's reason."""
    where = path if path is not None else (exc.filename or "a file")
    reason = exc.strerror or str(exc)
    return StorageError(f"cannot {action} {where}: {reason}" if action else f"{where}: {reason}")


class TicketError(SltError):
    """A ticket file that is corrupt, or cannot be rebuilt on this machine."""


class NonFiniteScoreError(SltError, ValueError):
    """A score is NaN or infinite: never turned into a mask silently."""


class ExportError(SltError):
    """A ticket that cannot be exported in the asked format (a missing extra, say)."""


class VersionWarning(UserWarning):
    """A ticket of a model reference rebuilt under another version of its library."""
