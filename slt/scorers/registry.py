"""The scorer registry, apart from the package init so rules can import it without cycles."""

from __future__ import annotations

from slt.registry import Registry

SCORERS: Registry[type] = Registry("scorer")
