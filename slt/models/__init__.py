"""Architectures for the search: every conv/linear is a Masked layer, registered in forward order.

A builder only lays out the architecture; the network builder (`slt.network`) installs the
frozen weights and the source mask on each `masked_layers(model)` entry afterwards.
"""

from slt.models.build import build_model, model_known
from slt.models.convert import ParamRole, other_parameters, restore, seed_parameters
from slt.models.reference import library_versions, reference_of, split_reference
from slt.models.registry import MODELS

__all__ = ["MODELS", "ParamRole", "build_model", "library_versions", "model_known",
           "other_parameters", "reference_of", "restore", "seed_parameters", "split_reference"]
