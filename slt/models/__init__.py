"""Architectures for the search: every conv/linear is a Masked layer, registered in forward order.

A builder only lays out the architecture; the network builder (`slt.network`) installs the
frozen weights and the source mask on each `masked_layers(model)` entry afterwards.
"""

from slt.models.build import build_model
from slt.models.registry import MODELS

__all__ = ["MODELS", "build_model"]
