"""Model references: `torchvision:NAME`, `timm:NAME` and `python:package.module:factory`.

A reference names a factory in another library or in the user's code; `build_reference`
calls it with the config's [model.kwargs] (num_classes from the data unless given) and
checks that it returned a module. Weights the factory draws are never used: the network
builder overwrites every parameter from slt's own seeds (slt.models.convert), so a
library upgrade that changes its init cannot change a ticket.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from slt.config.schema import ModelConfig
from slt.errors import ConfigError, SltError, did_you_mean, first_line
from slt.spec import DataSpec

# Arguments that would load weights slt then throws away (or read files named by a ticket).
REFUSED_KWARGS = ("pretrained", "weights", "weights_backbone", "pretrained_backbone",
                  "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                  "pretrained_strict")
TIMM_MISSING = ("timm: references need the timm extra: pip install timm "
                "(or pip install '.[timm]' in slt's checkout)")


def split_reference(name: str) -> tuple[str, str]:
    """('torchvision' | 'timm' | 'python', the rest), after checking the rest's form."""
    kind, _, target = name.partition(":")
    if kind == "python":
        module, _, attr = target.rpartition(":")
        parts = [*module.split("."), *attr.split(".")]
        if not module or not attr or not all(p.isidentifier() for p in parts):
            raise ConfigError(f"model.name {name!r}: a python reference is "
                              "python:package.module:factory")
    elif not target or not target.replace("_", "").replace(".", "").replace("-", "").isalnum():
        raise ConfigError(f"model.name {name!r}: expected {kind}:MODEL_NAME")
    return kind, target


def library_versions(name: str) -> dict[str, str]:
    """Versions of the library a reference's architecture comes from (recorded in tickets:
    another version may lay a model out differently)."""
    kind, target = split_reference(name)
    dist = {"torchvision": "torchvision", "timm": "timm"}.get(kind)
    if dist is None:
        dist = target.partition(":")[0].split(".")[0]
    try:
        return {dist: importlib.metadata.version(dist)}
    except importlib.metadata.PackageNotFoundError:
        return {}  # the user's own code, not an installed distribution


def check_reference(name: str, trusted: bool = True) -> None:
    """One ConfigError line unless the reference names a factory that exists here: an
    unknown torchvision or timm name (with did-you-mean), timm missing, a python factory
    that cannot be imported. An untrusted python reference (from someone's ticket) is
    refused before anything is imported."""
    factory(name, trusted)


def factory(name: str, trusted: bool = True) -> Callable[..., Any]:
    """The callable a reference names."""
    kind, target = split_reference(name)
    if kind == "torchvision":
        from torchvision import models as tv

        known = sorted(tv.list_models())
        if target not in known:
            raise ConfigError(f"unknown torchvision model {target!r}{did_you_mean(target, known)}")
        return lambda **kw: tv.get_model(target, **kw)
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise ConfigError(TIMM_MISSING) from None
        if not timm.is_model(target):
            known = timm.list_models()
            raise ConfigError(f"unknown timm model {target!r}{did_you_mean(target, known)}")
        return lambda **kw: timm.create_model(target, **kw)
    if not trusted:
        raise ConfigError(f"model {name} is code named by the file, not a library model: "
                          "rebuilding it imports and runs that code; pass trust_model=True "
                          "(--trust-model of slt eval, export or report) if you trust where "
                          "it came from")
    module_name, _, attr = target.rpartition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # an import runs the user's code: any error, one line
        raise ConfigError(f"model {name}: cannot import {module_name} "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model {name}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model {name}: {attr} is not callable")
    return obj


def factory_arguments(name: str, model_kwargs: dict[str, Any], spec: DataSpec,
                      call: Callable[..., Any]) -> dict[str, Any]:
    """The arguments the factory gets: the config's, with num_classes from the data (and
    timm's in_chans from the data's channels) unless given or not accepted."""
    refused = sorted(set(model_kwargs) & set(REFUSED_KWARGS))
    if refused:
        raise ConfigError(f"model.kwargs.{refused[0]}: slt draws every weight from run.seed "
                          "(pretrained weights would be overwritten); leave it out")
    kwargs = dict(model_kwargs)
    filled = {"num_classes": spec.num_classes}
    if name.startswith("timm:") and len(spec.shape) == 3:
        filled["in_chans"] = int(spec.shape[0])
    for key, value in filled.items():
        if key not in kwargs and _accepts(call, key, name):
            kwargs[key] = value
    if name.startswith("torchvision:"):  # some builders load a backbone unless told not to
        from torchvision.models import get_model_builder

        params = inspect.signature(get_model_builder(name.partition(":")[2])).parameters
        kwargs.update({key: None for key in ("weights", "weights_backbone") if key in params})
    return kwargs


def _accepts(call: Callable[..., Any], key: str, name: str) -> bool:
    if not name.startswith("python:"):
        return True  # torchvision and timm builders take num_classes / in_chans
    try:
        params = inspect.signature(call).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == key or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_reference(cfg: ModelConfig, spec: DataSpec, trusted: bool = True,
                    max_parameters: int | None = None) -> nn.Module:
    """The module a reference's factory returns for `spec` (on the current default device,
    so the meta device lays it out without storage). `max_parameters`: stop the build
    once it registers more parameters than that (a file's arguments asking for a model far
    larger than the file describes: depth = 10**6 would take hours even on meta)."""
    call = factory(cfg.name, trusted)
    kwargs = factory_arguments(cfg.name, dict(cfg.kwargs), spec, call)
    try:
        with torch.random.fork_rng(devices=[]), _parameter_limit(cfg.name, max_parameters):
            module = call(**kwargs)  # the library's init draws, not from the caller's
    except SltError:
        raise
    except TypeError as exc:
        raise ConfigError(f"model {cfg.name} rejects its arguments "
                          f"{_shown_kwargs(kwargs)}: {first_line(exc)}") from None
    except Exception as exc:  # the factory is the user's or a library's code: one line
        raise ConfigError(f"model {cfg.name} failed to build with {_shown_kwargs(kwargs)} "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model {cfg.name} returned a {type(module).__name__}, "
                          "not a torch.nn.Module")
    return module


@contextmanager
def _parameter_limit(name: str, limit: int | None) -> Iterator[None]:
    """Raise a ConfigError inside the factory once it has registered `limit` parameters."""
    if limit is None:
        yield
        return
    count = 0

    def counted(module: nn.Module, attr: str, param: Any) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise ConfigError(f"model {name} builds more than {limit} parameters, far more "
                              "than the file describes")

    handle = register_module_parameter_registration_hook(counted)
    try:
        yield
    finally:
        handle.remove()


def _shown_kwargs(kwargs: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
    return f"({text})" if len(text) < 120 else f"({text[:117]}...)"


def reference_of(call: Any) -> str:
    """`python:module:qualname` of an importable callable (the API's `model=`); a lambda,
    a closure or a local function, which no ticket could rebuild, is a ConfigError."""
    if isinstance(call, str):
        return call
    module = getattr(call, "__module__", None)
    qualname = getattr(call, "__qualname__", None)
    if not callable(call) or not module or not qualname:
        raise ConfigError(f"model must be a model name, a reference string or an importable "
                          f"factory function, got {type(call).__name__}")
    if "<lambda>" in qualname or "<locals>" in qualname or module == "__main__":
        where = "__main__" if module == "__main__" else qualname
        raise ConfigError(f"model {where}: a factory must be importable by name (a function at "
                          "the top level of a module other than __main__), so that its ticket "
                          "can rebuild it; a lambda, closure or script-level function cannot")
    ref = f"python:{module}:{qualname}"
    try:
        found = factory(ref)
    except ConfigError:
        found = None
    if found is not call:
        raise ConfigError(f"model {qualname}: importing {module} does not give back this "
                          "function, so no ticket could rebuild it")
    return ref

