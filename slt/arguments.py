"""Checks of what a caller passes to slt's public functions.

The command line types its arguments through argparse; a notebook passes anything. These
small validators give a wrong type or value the same kind of error the CLI prints: one
`ArgumentError` line (a ConfigError) naming the argument, what it must be and what was
given, raised before any work starts or any file is written. numpy and torch scalars
count as the numbers they hold (`workers=np.int64(2)` is 2).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slt.errors import ArgumentError, did_you_mean

DEVICES = ("auto", "cpu", "cuda")


def shown(value: Any) -> str:
    """A short description of a wrong value for a one-line message: its type and a
    repr cut to 60 characters (a Ticket is named by its type, not its whole repr)."""
    kind = type(value).__name__
    if value is None:
        return "None"
    if type(value).__module__.startswith("slt."):
        return f"a {kind}"
    text = repr(value).replace("\n", " ")
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"the {kind} {text}"


def path_arg(value: Any, name: str) -> Path:
    """`value` as a Path when it is a str or os.PathLike naming a path (not empty)."""
    if isinstance(value, str) or (isinstance(value, os.PathLike)
                                  and isinstance(os.fspath(value), str)):
        if not os.fspath(value):
            raise ArgumentError(f"{name}: expected a path, got an empty string")
        return Path(value)
    hint = ""
    if type(value).__name__ == "Ticket":
        hint = " (this argument takes a file path, not a loaded Ticket)"
    raise ArgumentError(f"{name}: expected a path (str or pathlib.Path), got {shown(value)}{hint}")


def ticket_arg(value: Any, name: str = "ticket", paths_too: bool = False) -> Any:
    """`value` when it is a loaded `slt.ticket.Ticket`; a path gets told how to load it
    (`paths_too`: the caller also takes a path, and the message says so)."""
    if any(c.__name__ == "Ticket" and c.__module__ == "slt.ticket"
           for c in type(value).__mro__):  # by name: slt.ticket imports what imports this
        return value
    if paths_too:
        raise ArgumentError(f"{name} must be a Ticket or the path of a ticket file, got "
                            f"{shown(value)}")
    hint = ""
    if isinstance(value, (str, os.PathLike)):
        hint = " (a path: read it first with slt.load_ticket(path))"
    raise ArgumentError(f"{name} must be a Ticket, got {shown(value)}{hint}")


def int_arg(value: Any, name: str, minimum: int | None = None) -> int:
    """`value` as an int: a Python, numpy or torch integer (not a bool, float or string),
    at least `minimum` when given."""
    number: int | None = None
    if not isinstance(value, (bool, float, str, bytes)) and not _is_bool(value):
        try:
            number = operator.index(value)  # int, np.int64, a 0-dim integer tensor
        except TypeError:
            number = None
        if getattr(value, "ndim", 0):  # torch takes a one-element tensor as an index
            number = None
    if number is None:
        raise ArgumentError(f"{name} must be a whole number, got {shown(value)}")
    if minimum is not None and number < minimum:
        raise ArgumentError(f"{name} must be at least {minimum}, got {number}")
    return number


def bool_arg(value: Any, name: str, optional: bool = False) -> bool | None:
    """`value` as a bool (True/False or a numpy bool; None too when `optional`)."""
    if value is None and optional:
        return None
    if isinstance(value, bool):
        return value
    if _is_bool(value):
        return bool(value)
    allowed = "True, False or None" if optional else "True or False"
    raise ArgumentError(f"{name} must be {allowed}, got {shown(value)}")


def _is_bool(value: Any) -> bool:
    """A numpy bool (np.bool_) or a 0-dim boolean tensor: a bool, not a number."""
    kind = type(value)
    if kind.__module__ == "numpy":
        return kind.__name__ in ("bool", "bool_")
    return kind.__module__.startswith("torch") and getattr(value, "dtype", None) is not None \
        and str(value.dtype) == "torch.bool" and value.dim() == 0


def callable_arg(value: Any, name: str) -> Callable[..., Any] | None:
    """`value` when it is callable or None."""
    if value is None or callable(value):
        return value
    raise ArgumentError(f"{name} must be a function (or None), got {shown(value)}")


def device_arg(value: Any, name: str = "device", any_torch: bool = False) -> str | None:
    """A device the caller may ask for: None (the run's), 'auto', 'cpu', 'cuda', 'cuda:N'
    or a torch.device of those (`any_torch`: any device torch knows, 'meta' say); 'cuda'
    only where torch sees a CUDA device. Returned as its string form, checked here so a
    typo or a missing GPU is one line, not torch's."""
    if value is None:
        return None
    text = str(value) if type(value).__name__ == "device" else value
    allowed = f"one of {', '.join(DEVICES)}" + (" or a torch device" if any_torch else "")
    if not isinstance(text, str):
        raise ArgumentError(f"{name} must be {allowed} (or None), got {shown(value)}")
    kind, _, index = text.partition(":")
    import torch

    known = kind in DEVICES and (not index or (kind == "cuda" and index.isdigit()))
    if not known and any_torch and kind != "auto":
        try:
            torch.device(text)
            known = True
        except (RuntimeError, ValueError):
            known = False
    if not known:
        raise ArgumentError(f"{name} must be {allowed} (cuda:N for one GPU), got {text!r}"
                            f"{did_you_mean(kind, list(DEVICES))}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"{name} {text!r} asked for, but torch sees no CUDA device "
                                "here (use 'cpu')")
        if index and int(index) >= torch.cuda.device_count():
            raise ArgumentError(f"{name} {text!r} asked for, but torch sees "
                                f"{torch.cuda.device_count()} CUDA device(s) here")
    return text
