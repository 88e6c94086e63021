"""Errors that the CLI turns into one clear line and exit code 2."""

from __future__ import annotations


class SltError(Exception):
    """Base of every user-facing error: the message alone must say what is wrong."""


class ConfigError(SltError):
    """A config key, value or combination that cannot be run."""


class DataError(SltError):
    """A dataset that cannot be found or read."""


class TicketError(SltError):
    """A ticket file that is corrupt, or cannot be rebuilt on this machine."""


class NonFiniteScoreError(SltError, ValueError):
    """A score is NaN or infinite: never turned into a mask silently."""
