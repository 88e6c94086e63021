"""The scorer registry, apart from the package init so rules can import it without cycles.

Rules shipped with slt register on import. Rules of other packages register through the
`slt.scorers` entry-point group: `name = "module:Class"`; they load the first time a
scorer is looked up or listed.
"""

from __future__ import annotations

from slt.registry import Registry

ENTRY_POINT_GROUP = "slt.scorers"

SCORERS: Registry[type] = Registry("scorer", entry_point_group=ENTRY_POINT_GROUP)
