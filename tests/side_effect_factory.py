"""A module that leaves a mark when imported: a ticket naming it must not import it unless
trusted (tests/test_faults_hostile_references.py)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

if os.environ.get("SLT_TEST_IMPORT_MARK"):
    Path(os.environ["SLT_TEST_IMPORT_MARK"]).write_text("imported")


def build(num_classes: int = 3) -> nn.Module:
    """The layout of the tiny MLP run (8 -> 16 -> 16 -> classes), as a python: factory."""
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, num_classes))
