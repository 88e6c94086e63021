"""`build_model`: the architecture a config names, with every built-in builder registered."""

from __future__ import annotations

import torch
from torch import nn

from slt.config.checks import is_reference
from slt.config.schema import ModelConfig
from slt.errors import ConfigError, first_line
from slt.models import conv, mlp, resnet, vgg  # noqa: F401  (they register their builders)
from slt.models.convert import check_searchable, convert
from slt.models.reference import build_reference, check_reference
from slt.models.registry import MODELS
from slt.spec import DataSpec


def build_model(cfg: ModelConfig, spec: DataSpec, trusted: bool = True,
                max_parameters: int | None = None) -> nn.Module:
    """The architecture named by `cfg.name`, sized for the data described by `spec`: a
    built-in, or a reference's module with its searchable weights made masked layers
    (slt.models.convert). On the meta device a reference's output is checked against the
    data (every run lays its network out there first, for the memory check).
    `trusted=False` refuses to import a python: reference (one named by someone's file);
    `max_parameters` bounds a reference's build (slt.models.reference.build_reference)."""
    if not is_reference(cfg.name):
        return MODELS.get(cfg.name)(cfg, spec)
    module = build_reference(cfg, spec, trusted, max_parameters)
    check_searchable(module)
    if any(p.is_meta for p in module.parameters()):
        check_output(cfg.name, module, spec)
    return convert(module)


def check_output(name: str, module: nn.Module, spec: DataSpec) -> None:
    """One ConfigError line unless the module maps a batch of the data's inputs to one
    logit per class (checked on the meta device: shapes only)."""
    x = torch.zeros(2, *spec.shape, device="meta")
    for training in (True, False):  # a search trains it, an evaluation does not
        try:
            with torch.no_grad():
                out = module.train(training)(x)
        except (NotImplementedError, TypeError) as exc:
            if "meta" in str(exc).lower():
                return  # an op with no shape-only form: the first real step will tell
            raise ConfigError(f"model {name} fails on the data's input of shape "
                              f"{tuple(spec.shape)}: {first_line(exc)}") from None
        except Exception as exc:  # the user's forward: any error, one line
            raise ConfigError(f"model {name} fails on the data's input of shape "
                              f"{tuple(spec.shape)} ({type(exc).__name__}: "
                              f"{first_line(exc)})") from None
        finally:
            module.train()
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec.num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            mode = "in training" if training else "in evaluation"
            raise ConfigError(f"model {name} gives {got} {mode} for a batch of 2 inputs, not "
                              f"logits of shape (2, {spec.num_classes}) for the data's "
                              f"{spec.num_classes} classes; give it num_classes "
                              "(model.kwargs), turn off auxiliary outputs, or another head")


def model_known(name: str, trusted: bool = True) -> None:
    """ConfigError unless `name` is a registered model or a reference that exists here."""
    if is_reference(name):
        check_reference(name, trusted)
    else:
        MODELS.get(name)
