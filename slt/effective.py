"""Effective density: how much of a ticket (or a source) lies on an input-to-output path.

Pruning strands edges: a unit left with no incoming edges only passes constants on, one
with no outgoing edges feeds nothing. Such edges count toward the nominal density but can
carry no signal, so the nominal density overstates what a ticket keeps. An edge is
*effective* when it lies on a path from an input unit to an output unit through present
edges (unsearched dense layers are fully present); a unit (output row of a Linear, output
channel of a Conv) is *alive* when one of its incoming edges is effective.

One backward pass through the architecture itself finds the paths (SynFlow-like), so any
model the network runs is handled without a graph of its own: see `effective_masks`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slt.layers import MaskedLayer
from slt.models.convert import NORMS
from slt.network import SltNetwork

MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
ADAPTIVE_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


@dataclass(frozen=True)
class LayerEffect:
    """One searched layer: weights, edges present and effective, units and alive units."""

    name: str
    numel: int
    present: int
    effective: int
    units: int
    alive: int


@dataclass(frozen=True)
class EffectiveDensity:
    """Per searched layer and in total; densities are over all searched prunable weights."""

    layers: tuple[LayerEffect, ...]

    def total(self, field: str) -> int:
        """Sum of one count (numel, present, effective, units, alive) over the layers."""
        return sum(getattr(row, field) for row in self.layers)

    @property
    def effective_density(self) -> float:
        return self.total("effective") / self.total("numel")

    @property
    def nominal_density(self) -> float:
        return self.total("present") / self.total("numel")

    @property
    def effective_fraction(self) -> float:
        return _ratio(self.total("effective"), self.total("present"))

    @property
    def alive_fraction(self) -> float:
        return _ratio(self.total("alive"), self.total("units"))

    def to_dict(self) -> dict:
        """JSON-ready: the four ratios, the totals, and one row per searched layer."""
        return {"effective_density": self.effective_density,
                "nominal_density": self.nominal_density,
                "effective_fraction": self.effective_fraction,
                "alive_fraction": self.alive_fraction,
                **{k: self.total(k) for k in ("numel", "present", "effective", "units", "alive")},
                "layers": [{**asdict(row),
                            "effective_fraction": _ratio(row.effective, row.present),
                            "alive_fraction": _ratio(row.alive, row.units)}
                           for row in self.layers]}


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 1.0


def effective_density(net: SltNetwork, masks: Sequence[Tensor] | None,
                      input_shape: tuple[int, ...]) -> EffectiveDensity:
    """Counts of `effective_masks` per searched layer, named as in `net.infos`."""
    effective = effective_masks(net, masks, input_shape)
    names, rows = [info.name for info in net.infos if info.searched], []
    for i, (layer, eff) in enumerate(zip(net.searched_layers, effective)):
        present = int(masks[i].bool().sum()) if masks is not None else len(eff)
        fed = torch.bincount(layer.src_idx.cpu()[eff] // layer.fan_in,
                             minlength=layer.weight_shape[0])
        rows.append(LayerEffect(names[i], layer.numel, present, int(eff.sum()), len(fed),
                                int((fed > 0).sum())))
    return EffectiveDensity(tuple(rows))


def effective_masks(net: SltNetwork, masks: Sequence[Tensor] | None,
                    input_shape: tuple[int, ...]) -> list[Tensor]:
    """Compact boolean mask of the effective edges of each searched layer (on the CPU), for
    the ticket `masks` (compact, one per searched layer) or, when None, the source itself;
    `input_shape` is the data's shape (no batch dimension).

    On a float64 CPU copy in eval mode every masked weight becomes its presence (1/0)
    divided by the present incoming edges of its unit, every bias and additive parameter 0,
    every normalisation the identity and every max pool an average pool (so every element
    of a window gets gradient, not one of the tied maxima). On a positive input every value
    is then >= 0, a unit is > 0 exactly when an input reaches it, and d(sum of outputs) /
    d(weight) != 0 exactly when the edge also leads on to an output. The per-unit scaling
    keeps activations within the input's range (each unit averages its inputs): raw path
    counts overflow float64 in deep nets. The input is a fixed draw in [0.5, 1.5], not all
    ones: identical tokens give uniform attention, whose gradient to queries and keys is 0
    (and through softmax a gradient may be < 0, hence != 0). A max pool called as a
    function may undercount. The caller's network is not touched."""
    if masks is not None and len(masks) != len(net.searched_layers):
        raise ValueError(f"{len(masks)} masks for {len(net.searched_layers)} searched layers")
    work = _copy(net)
    ticket = iter(masks if masks is not None else [None] * len(net.searched_layers))
    leaves, present = [], []
    for layer in work.all_layers:
        mask = next(ticket) if layer.searched else None
        if mask is not None and mask.numel() != layer.n_source:
            raise ValueError("a ticket mask does not match its layer's source edges")
        kept = (torch.ones(layer.n_source, dtype=torch.bool) if mask is None
                else mask.detach().reshape(-1).cpu().bool())
        unit = layer.src_idx // layer.fan_in
        fan = torch.bincount(unit[kept], minlength=layer.weight_shape[0]).clamp(min=1)
        layer.effective_src = (kept.double() / fan[unit]).requires_grad_(True)
        layer.searched = True  # dense layers read `effective_src` too (in this copy only)
        leaves.append(layer.effective_src)
        present.append(kept)
    _neutralise(work.body)
    gen = torch.Generator().manual_seed(0)
    x = 0.5 + torch.rand((1, *input_shape), generator=gen, dtype=torch.float64)
    out = work.apply_body(x)
    if not isinstance(out, Tensor) or not bool(torch.isfinite(out).all()):
        raise ValueError("tracing the network's paths gave a non-finite or non-tensor output")
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    effective = []
    for info, kept, grad in zip(net.infos, present, grads):
        if grad is not None and not bool(torch.isfinite(grad).all()):
            raise ValueError(f"non-finite path gradient in layer {info.name}")
        if info.searched:
            effective.append(kept & (grad != 0) if grad is not None else torch.zeros_like(kept))
    return effective


def _copy(net: SltNetwork) -> SltNetwork:
    """A float64 CPU copy of the network without its scores or frozen weights (never read
    here), sharing the scorer (never called); tensors autograd refuses to deep-copy (the
    effective weights of a training forward) are taken detached."""
    memo: dict[int, object] = {id(net.scorer): net.scorer}
    for layer in net.all_layers:
        memo.update({id(layer.weight_src): torch.zeros(0), id(layer.scores): None})
    for module in net.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach()
    work = copy.deepcopy(net, memo).to(device="cpu", dtype=torch.float64).eval()
    work.requires_grad_(False)
    work.fixed = True
    return work


def _neutralise(body: nn.Module) -> None:
    """Parameters that add (biases, position embeddings) 0, those that scale (weight, gamma,
    scale) 1, and class tokens, a learned input, 1; norms the identity, max pools averaging:
    hooks and values on the copy only."""
    for module in body.modules():
        if isinstance(module, MaskedLayer):
            continue
        if isinstance(module, NORMS) or type(module).__name__.endswith(
                ("Norm", "Norm1d", "Norm2d", "Norm3d")):
            module.register_forward_hook(lambda m, args, out: args[0].clone())
            continue
        for attr, param in module.named_parameters(recurse=False):
            ones = ("weight", "gamma", "scale", "token")
            param.data.fill_(float("bias" not in attr and any(k in attr for k in ones)))
        if isinstance(module, MAX_POOLS) and module.dilation not in (1, (1,), (1, 1), (1, 1, 1)):
            raise ValueError(f"max pooling with dilation {module.dilation} is not handled")
        if isinstance(module, MAX_POOLS + ADAPTIVE_MAX_POOLS):
            module.register_forward_hook(_average_pool)


def _average_pool(module: nn.Module, args: tuple, out: Tensor | tuple) -> Tensor | tuple:
    """A max pool's windows averaged: the same shape, and gradient to every element."""
    dims = next(i for i, kinds in enumerate(zip(MAX_POOLS, ADAPTIVE_MAX_POOLS))
                if isinstance(module, kinds))
    if isinstance(module, MAX_POOLS):
        avg = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims](
            args[0], module.kernel_size, module.stride, module.padding, module.ceil_mode)
    else:
        avg = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[dims](
            args[0], module.output_size)
    return (avg, *out[1:]) if isinstance(out, tuple) else avg

