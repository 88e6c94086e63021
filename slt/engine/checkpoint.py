"""A run's checkpoint: the record written, and reading it back with every field checked
against the run before any is used.

`weights_only` loading stops code, not impossible values: a checkpoint that travelled
between machines (or was edited) could hold a step past its epoch, a string where a count
belongs, an ill-shaped tensor or a NaN score, and a resume would carry them into a wrong
finished accuracy. Each is one line naming checkpoint.pt and the field; the file is left in
place for the user to inspect or move away.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slt.config.ids import config_hash, config_hashes
from slt.config.schema import Config
from slt.errors import SltError, first_line
from slt.fileio import torch_file_problem
from slt.network import SltNetwork
from slt.rundir import is_finite_number, is_whole_number


@dataclass
class Progress:
    """Where a run stands, besides model and optimizer: what a checkpoint records. `step`
    global batches of epoch `epoch + 1` are done (0: at an epoch's end), with the training
    totals of that epoch so far (summed over every process)."""

    epoch: int = 0
    step: int = 0
    best_test_acc: float = -1.0
    best_epoch: int = 0
    elapsed: float = 0.0
    # the last epoch's evaluation: the state the ticket is taken from (never a metrics line,
    # which may be missing or damaged)
    test_loss: float | None = None
    test_acc: float | None = None
    train_loss_sum: float = 0.0
    train_correct: float = 0.0
    train_seen: float = 0.0

    @classmethod
    def of(cls, ckpt: dict[str, Any]) -> Progress:
        """The progress a checkpoint records (its other fields left out)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in ckpt.items() if k in known})


def checkpoint_record(cfg: Config, net: SltNetwork, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler,
                      scaler: torch.amp.GradScaler, progress: Progress,
                      scorer_state: dict[str, Any]) -> dict[str, Any]:
    """The one checkpoint record of a run's state, as `restore_checkpoint` reads it back."""
    return {
        "model": net.body.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "config_hash": config_hash(cfg),
        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
        **dataclasses.asdict(progress), "scorer_state": scorer_state,
        **({"weights": [layer.weight_src for layer in net.searched_layers]}
           if net.scorer.stores_weights else {}),
    }


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_test_acc", "best_epoch",
                   "elapsed", "config_hash")


def load_checkpoint(path: Path, device: torch.device, cfg: Config) -> dict[str, Any] | None:
    """The run's checkpoint, checked to be slt's and this config's; None when there is none.
    Anything else is one error line saying what to do: never a half-applied resume."""
    if not path.exists():
        return None
    fix = "move it away (or delete it) to restart this run from scratch"
    if problem := torch_file_problem(path):
        raise SltError(f"{path} is damaged: {problem}: {fix}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise SltError(f"{path} is unreadable ({type(exc).__name__}): {fix}") from None
    if not isinstance(ckpt, dict):
        raise SltError(f"{path} is not a checkpoint of slt (it holds a "
                       f"{type(ckpt).__name__}): {fix}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise SltError(f"{path} is not a checkpoint of slt (no {', '.join(missing)}): {fix}")
    if not isinstance(ckpt["config_hash"], str) or ckpt["config_hash"] not in config_hashes(cfg):
        raise SltError(f"{path} belongs to another config: {fix}")
    epoch = ckpt["epoch"]
    if not is_whole_number(epoch) or not 0 <= epoch <= cfg.search.epochs:
        raise SltError(f"{path} records epoch {_short(epoch)}, outside 0..{cfg.search.epochs}: "
                       f"{fix}")
    return ckpt


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, Tensor) else \
        f"a tensor of shape {list(value.shape)}"
    return text if len(text) <= 40 else text[:37] + "..."


class CheckpointDamage(Exception):
    """One field of a checkpoint that this run cannot resume from: (field, what is wrong)."""


def _need(ok: bool, field: str, problem: str) -> None:
    if not ok:
        raise CheckpointDamage(field, problem)


def _tensor_like(value: Any, like: Tensor, field: str) -> None:
    """A tensor of `like`'s shape and dtype whose values are finite (when floating)."""
    _need(isinstance(value, Tensor), field, f"is {_short(value)}, not a tensor")
    _need(value.shape == like.shape and value.dtype == like.dtype, field,
          f"is a {value.dtype} tensor of shape {list(value.shape)}, not {like.dtype} of "
          f"shape {list(like.shape)}")
    _need(not value.is_floating_point() or bool(torch.isfinite(value).all()), field,
          "holds a NaN or an infinity")
    _need(value.is_floating_point() or value.dtype == torch.bool or bool((value >= 0).all()),
          field, "holds a negative count")


def _check_progress(ckpt: dict[str, Any], cfg: Config, steps_per_epoch: int) -> None:
    """The counters of `Progress`: types, ranges and agreement with each other."""
    epoch, step = ckpt["epoch"], ckpt.get("step", 0)
    _need(is_whole_number(step) and 0 <= step < steps_per_epoch, "step",
          f"is {_short(step)}, outside 0..{steps_per_epoch - 1} (steps of an epoch)")
    _need(step == 0 or epoch < cfg.search.epochs, "step",
          f"is {step} after the last epoch {epoch}")
    best_epoch = ckpt["best_epoch"]
    _need(is_whole_number(best_epoch) and 0 <= best_epoch <= epoch, "best_epoch",
          f"is {_short(best_epoch)}, outside 0..{epoch}")
    _need(is_finite_number(ckpt["best_test_acc"]) and -1 <= ckpt["best_test_acc"] <= 1,
          "best_test_acc", f"is {_short(ckpt['best_test_acc'])}, not an accuracy")
    for key in ("elapsed", "train_loss_sum", "train_correct", "train_seen"):
        value = ckpt.get(key, 0.0)
        _need(is_finite_number(value) and value >= 0, key,
              f"is {_short(value)}, not a finite non-negative number")
    seen = ckpt.get("train_seen", 0.0)
    _need(ckpt.get("train_correct", 0.0) <= seen <= step * cfg.search.batch_size,
          "train_seen", f"is {seen}, not what {step} steps of this epoch can have seen")
    for key, top in (("test_acc", 1.0), ("test_loss", math.inf)):
        value = ckpt.get(key)
        _need(value is None or (is_finite_number(value) and 0 <= value <= top), key,
              f"is {_short(value)}, not a finite {'accuracy' if top == 1 else 'loss'}")
    _need(epoch == 0 or ckpt.get("test_acc") is not None or "test_acc" not in ckpt,
          "test_acc", f"is missing after epoch {epoch}")


def _check_optimizer(state: Any, params: list[Tensor], cfg: Config) -> None:
    """SGD's state: one group over every score, the config's settings, momentum buffers
    of the scores' shapes."""
    _need(isinstance(state, dict) and isinstance(state.get("state"), dict)
          and isinstance(state.get("param_groups"), list) and len(state["param_groups"]) == 1
          and isinstance(state["param_groups"][0], dict), "optimizer",
          "is not the state of one SGD parameter group")
    group, s = state["param_groups"][0], cfg.search
    _need(group.get("params") == list(range(len(params))), "optimizer.param_groups.params",
          f"is {_short(group.get('params'))}, not the {len(params)} score tensors")
    for key, want in (("momentum", s.momentum), ("weight_decay", s.weight_decay)):
        _need(is_finite_number(group.get(key)) and group.get(key) == want, f"optimizer.{key}",
              f"is {_short(group.get(key))}, but the config says {want}")
    _need(group.get("nesterov") is s.nesterov, "optimizer.nesterov",
          f"is {_short(group.get('nesterov'))}, but the config says {s.nesterov}")
    for key in ("lr", "initial_lr", "dampening"):
        value = group.get(key, 0.0)
        _need(is_finite_number(value) and value >= 0, f"optimizer.{key}",
              f"is {_short(group.get(key))}, not a finite non-negative number")
    for index, entry in state["state"].items():
        _need(is_whole_number(index) and 0 <= index < len(params) and isinstance(entry, dict),
              "optimizer.state", f"has an entry {_short(index)} for no score tensor")
        buf = entry.get("momentum_buffer")
        if buf is not None:
            _tensor_like(buf, params[index].detach(), f"optimizer.state[{index}].momentum_buffer")


def _check_scheduler(state: Any, epoch: int, step: int, steps_per_epoch: int) -> None:
    _need(isinstance(state, dict), "scheduler", f"is {_short(state)}, not a scheduler state")
    done = epoch * steps_per_epoch + step
    _need(state.get("last_epoch") == done and is_whole_number(state.get("last_epoch")),
          "scheduler.last_epoch", f"is {_short(state.get('last_epoch'))}, but epoch {epoch} "
          f"and step {step} make {done} steps")
    _need(is_whole_number(state.get("_step_count", 0)) and state.get("_step_count", 0) >= 0,
          "scheduler._step_count", f"is {_short(state.get('_step_count'))}, not a count")
    for key in ("base_lrs", "_last_lr"):
        value = state.get(key, [])
        _need(isinstance(value, list) and all(is_finite_number(v) and v >= 0 for v in value),
              f"scheduler.{key}", f"is {_short(value)}, not a list of learning rates")


def check_checkpoint(ckpt: dict[str, Any], cfg: Config, net: SltNetwork, params: list[Tensor],
                     steps_per_epoch: int, device: torch.device) -> None:
    """Every field of a checkpoint checked against the run's config and network before any
    is applied (`params`: the optimizer's score tensors). CheckpointDamage(field, problem)
    on the first field that is wrong."""
    _check_progress(ckpt, cfg, steps_per_epoch)
    model = ckpt["model"]
    own = net.body.state_dict()
    odd = sorted(map(str, set(model) ^ set(own))) if isinstance(model, dict) else model
    _need(isinstance(model, dict) and not odd, "model",
          f"does not fit this run's network (unlike it: {_short(odd)})")
    for name, like in own.items():
        _tensor_like(model[name], like, f"model[{name}]")
    if net.scorer.stores_weights:
        weights = ckpt.get("weights")
        layers = net.searched_layers
        _need(isinstance(weights, list) and len(weights) == len(layers), "weights",
              f"is not a list of {len(layers)} weight tensors")
        for i, (w, layer) in enumerate(zip(weights, layers)):
            _tensor_like(w, layer.weight_src.detach(), f"weights[{i}]")
    _check_optimizer(ckpt["optimizer"], params, cfg)
    _check_scheduler(ckpt["scheduler"], ckpt["epoch"], ckpt.get("step", 0), steps_per_epoch)
    if "scaler" in ckpt:
        scaler = ckpt["scaler"]
        _need(isinstance(scaler, dict) and all(is_finite_number(v) and v >= 0
                                               for v in scaler.values())
              and scaler.get("scale", 1.0) > 0, "scaler",
              "is not a gradient scaler's state of finite positive numbers")
    state = ckpt.get("scorer_state", {})
    _need(isinstance(state, dict) and all(isinstance(k, str) for k in state), "scorer_state",
          f"is {_short(state)}, not a table")
    for key, value in state.items():  # a rule's own state: tensors or plain values
        _need(isinstance(value, (Tensor, str, bool)) or is_finite_number(value),
              f"scorer_state.{key}", f"is {_short(value)}, not a tensor or a finite value")
        _need(not isinstance(value, Tensor) or not value.is_floating_point()
              or bool(torch.isfinite(value).all()), f"scorer_state.{key}",
              "holds a NaN or an infinity")
        if key == "generator":  # a random generator's state: bytes of a fixed size
            _need(isinstance(value, Tensor), f"scorer_state.{key}",
                  f"is {_short(value)}, not a tensor")
            size = torch.Generator(device=device).get_state().numel()
            _need(value.dtype == torch.uint8 and value.shape == (size,), f"scorer_state.{key}",
                  f"is not the {size}-byte state of a {device.type} generator")


def restore_checkpoint(path: Path, cfg: Config, net: SltNetwork, params: list[Tensor],
                       optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler,
                       scaler: torch.amp.GradScaler, steps_per_epoch: int,
                       device: torch.device) -> tuple[Progress, dict[str, Any]] | None:
    """Apply the checkpoint at `path` to the network, optimizer, scheduler and scaler once
    every field is checked (a damaged one is one line, left in place); its (progress, scorer
    state), or None when there is none."""
    ckpt = load_checkpoint(path, device, cfg)
    if ckpt is None:
        return None
    fix = f"move {path} away (or delete it) to restart this run from scratch"
    try:
        check_checkpoint(ckpt, cfg, net, params, steps_per_epoch, device)
    except CheckpointDamage as exc:
        field, problem = exc.args
        raise SltError(f"{path} is damaged: {field} {problem}: {fix}") from None
    try:
        net.body.load_state_dict(ckpt["model"])
        for layer, weight in zip(net.searched_layers, ckpt.get("weights", [])):
            layer.weight_src = weight.to(device)  # re-randomised weights
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise SltError(f"{path} does not fit this run's network "
                       f"({first_line(exc)}): {fix}") from None
    return Progress.of(ckpt), ckpt.get("scorer_state", {})
