"""The user's module made searchable, keeping its own class and forward.

Every weight of an `nn.Linear`, `nn.Conv1d/2d/3d` and `nn.MultiheadAttention` (its input
projections; `out_proj` is a Linear) becomes a `WeightSlot`: a masked layer whose frozen
weights, source mask and scores slt draws and owns. Every other parameter gets one role,
by one stated policy (docs/models.md), and slt's own seeded values:

- searched: a slot the search prunes; frozen: a slot kept dense, a bias under
  `model.bias = "random"`, and every other raw parameter (position embeddings, class
  tokens, embedding tables, layer scales), drawn from run.seed;
- constant: a bias under `model.bias = "zero"`, a normalisation layer's scale (1) and
  shift (0) under `model.norm = "fixed"` (edge-popup's non-affine BatchNorm);
- learned: the normalisation parameters under `model.norm = "learned"`.

So nothing of the user's model is trained unless asked, and nothing keeps the library's
own init: a library upgrade that changes its init cannot change a ticket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slt.config.schema import ModelConfig
from slt.errors import ConfigError
from slt.layers import MaskedLayer, WeightSlot
from slt.seeding import generator

SEARCHABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
BIASES = ("bias", "in_proj_bias", "bias_k", "bias_v")
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
         *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
RAW_STD = 0.02  # std of raw parameters (position embeddings, tokens): the ViT convention


def _slot_place(module: nn.Module, attr: str) -> bool:
    """Whether `module.attr` is a weight the search takes."""
    if isinstance(module, SEARCHABLE):
        return attr == "weight"
    return isinstance(module, nn.MultiheadAttention) and attr in ATTENTION_WEIGHTS


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORMS) or type(module).__name__.endswith(
        ("Norm", "Norm1d", "Norm2d", "Norm3d"))


def convert(module: nn.Module) -> nn.Module:
    """Replace, in place, every searchable weight of `module` by a WeightSlot registered
    under the parameter's name; returns the module. A weight tied to several places
    becomes one slot that every owner reads."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for owner in module.modules():
        for attr, param in list(owner._parameters.items()):
            if param is not None:
                places.setdefault(id(param), []).append((owner, attr))
                params[id(param)] = param
    for key, where in places.items():
        if not any(_slot_place(owner, attr) for owner, attr in where):
            continue
        slot = WeightSlot(tuple(params[key].shape), list(where))
        for owner, attr in where:
            del owner._parameters[attr]
            owner._modules[attr] = slot
    for owner in module.modules():
        if isinstance(owner, nn.MultiheadAttention):  # input projections run before out_proj
            first = [a for a in ATTENTION_WEIGHTS if a in owner._modules]
            owner._modules = {**{a: owner._modules[a] for a in first}, **owner._modules}
    check_searchable(module)
    return module


def check_searchable(module: nn.Module) -> None:
    """ConfigError unless the module has a weight `convert` makes a searched layer."""
    if not any(isinstance(owner, MaskedLayer) or any(_slot_place(owner, a)
                                                     for a in owner._parameters)
               for owner in module.modules()):
        raise ConfigError(f"the model ({type(module).__name__}) has no layer slt can search: "
                          "no nn.Linear, nn.Conv1d/2d/3d or nn.MultiheadAttention weight")


@dataclass(frozen=True)
class ParamRole:
    """One parameter of the converted model and what the search does with it."""

    name: str
    shape: tuple[int, ...]
    role: str  # searched, frozen, constant or learned
    kind: str  # weight, bias, norm or raw


def other_parameters(body: nn.Module, model: ModelConfig) -> list[ParamRole]:
    """Roles of every parameter of a converted reference that is not a slot's (slots'
    roles are the network's: searched or frozen dense)."""
    rows = []
    for owner_name, owner in body.named_modules():
        if isinstance(owner, MaskedLayer):
            continue
        for attr, param in owner._parameters.items():
            if param is None:
                continue
            name = f"{owner_name}.{attr}" if owner_name else attr
            shape = tuple(param.shape)
            if attr in BIASES and (isinstance(owner, SEARCHABLE)
                                   or isinstance(owner, nn.MultiheadAttention)):
                role = "constant" if model.bias == "zero" else "frozen"
                rows.append(ParamRole(name, shape, role, "bias"))
            elif _is_norm(owner):
                role = "constant" if model.norm == "fixed" else "learned"
                rows.append(ParamRole(name, shape, role, "norm"))
            else:
                rows.append(ParamRole(name, shape, "frozen", "raw"))
    return rows


def seed_parameters(body: nn.Module, model: ModelConfig, run_seed: int) -> None:
    """Give every non-slot parameter its policy's value, from slt's seeds (never the
    library's init): zero or random biases, norm scale 1 and shift 0, raw parameters
    N(0, 0.02^2); only `learned` ones keep requires_grad."""
    fan_in = {}
    for owner_name, owner in body.named_modules():
        slots = [m for m in owner.children() if isinstance(m, WeightSlot)]
        if slots:
            fan_in[owner_name] = slots[0].fan_in
    with torch.no_grad():
        for row in other_parameters(body, model):
            param = body.get_parameter(row.name)
            gen = generator("parameter", run_seed, row.name)
            if row.kind == "bias" and row.role == "frozen":
                bound = 1.0 / math.sqrt(fan_in.get(row.name.rpartition(".")[0], 1))
                value = (torch.rand(row.shape, generator=gen) * 2 - 1) * bound
            elif row.kind == "bias":
                value = torch.zeros(row.shape)
            elif row.kind == "norm":
                is_scale = row.name.rpartition(".")[2] == "weight"
                value = torch.ones(row.shape) if is_scale else torch.zeros(row.shape)
            else:
                value = torch.randn(row.shape, generator=gen) * RAW_STD
            if param.device.type != "meta":
                param.copy_(value.to(param.dtype))
            param.requires_grad_(row.role == "learned")


def restore(body: nn.Module) -> nn.Module:
    """Undo `convert` on a network's body: every slot's current (effective) weight back as
    the parameter its owners had (one Parameter for a tied weight), every slot removed,
    every parameter trainable as torch makes them (ready to fine-tune). Returns the user's
    own module, of the user's own class."""
    for slot in [m for m in body.modules() if isinstance(m, WeightSlot)]:
        weight = nn.Parameter(slot.release())
        for owner, attr in slot.targets:
            del owner._modules[attr]
            owner._parameters[attr] = weight
    for param in body.parameters():
        param.requires_grad_(True)
    return body
