"""Planted tickets (Fischer & Burkholz, "Plant 'n' Seek", ICLR 2022): the planted-teacher
data's teacher written into the student's frozen random weights, so a ticket as good as
the teacher is known to exist, and a search can be scored against it.

Each hidden layer of the teacher goes to distinct student units drawn from `plant.seed`
(inputs and classes map to themselves); the teacher's weight from unit i to unit j is
written at the student's edge from map(i) to map(j). The student restricted to those
edges computes the teacher's logits (bias-free ReLU MLPs: config.checks.check_plant)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slt.config.schema import Config
from slt.data.datasets import Teacher, planted_teacher_task
from slt.errors import ConfigError
from slt.scorers import Scorer
from slt.seeding import generator


@dataclass(frozen=True, eq=False)
class Plant:
    """Per searched layer: the planted edges' flat positions in the weight (ascending) and
    the teacher's weights there (float32)."""

    positions: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    # per layer, the power of two the teacher's weights were multiplied by (plant_layer)
    scales: tuple[float, ...] = ()

    @property
    def logit_scale(self) -> float:
        """What the planted student's logits are the teacher's times (1 before planting)."""
        return math.prod(self.scales)

    @property
    def n_edges(self) -> int:
        return sum(int(p.numel()) for p in self.positions)


def unit_maps(teacher_dims: Sequence[int], student_dims: Sequence[int],
              seed: int) -> list[Tensor]:
    """Where each teacher unit sits in the student, per layer boundary: inputs and classes
    to themselves, every hidden layer an injective draw from `seed`."""
    if len(teacher_dims) != len(student_dims):
        raise ConfigError(f"plant: the teacher has {len(teacher_dims) - 2} hidden layer(s), "
                          f"the student {len(student_dims) - 2}")
    last = len(student_dims) - 1
    maps = []
    for j, (t, s) in enumerate(zip(teacher_dims, student_dims)):
        if j in (0, last):
            if t != s:
                raise ConfigError(f"plant: the teacher's {'inputs' if j == 0 else 'classes'} "
                                  f"({t}) differ from the student's ({s})")
            maps.append(torch.arange(s))
            continue
        if s < t:
            raise ConfigError(f"plant: hidden layer {j} of the student has {s} units, fewer "
                              f"than the teacher's {t}; widen the student (model.width or "
                              "model.hidden)")
        maps.append(torch.randperm(s, generator=generator("plant", seed, j))[:t])
    return maps


def make_plant(teacher: Teacher, shapes: Sequence[tuple[int, ...]], seed: int) -> Plant:
    """The planted edges of a student MLP whose layers have weight `shapes` (out, in)."""
    teacher_dims = [int(teacher.weights[0].shape[1])] + [int(w.shape[0]) for w in teacher.weights]
    student_dims = [int(shapes[0][1])] + [int(s[0]) for s in shapes]
    maps = unit_maps(teacher_dims, student_dims, seed)
    positions, values = [], []
    for layer, (shape, w) in enumerate(zip(shapes, teacher.weights)):
        rows, cols = maps[layer + 1], maps[layer]
        flat = (rows[:, None] * shape[1] + cols[None, :]).reshape(-1)
        order = flat.argsort()
        positions.append(flat[order])
        values.append(w.float().reshape(-1)[order])
    return Plant(tuple(positions), tuple(values))


def plant_of(cfg: Config, shapes: Sequence[tuple[int, ...]]) -> Plant:
    """The plant a run's config asks for, in a student of these layer shapes."""
    teacher = planted_teacher_task(cfg.data)[1]
    if len(shapes) != len(teacher.weights) or any(len(s) != 2 for s in shapes):
        raise ConfigError(f"plant: the student has {len(shapes)} searched layers, the teacher "
                          f"{len(teacher.weights)} (the plant needs an mlp of the teacher's depth)")
    return make_plant(teacher, shapes, cfg.plant.seed)


def plant_layer(weight: Tensor, plant: Plant, index: int) -> tuple[Tensor, float]:
    """Write layer `index` of the plant into the student's random `weight` (in place), its
    values multiplied by the power of two nearest to the ratio of the random weights' mean
    |w| to the teacher's. Edge-popup's score gradients grow with |w|: at the teacher's own
    scale the plant would be easier or harder to find than any other edge for its size
    alone. A positive factor per layer of a bias-free ReLU net multiplies the logits by
    their product (labels unchanged), and a power of two does it exactly.
    Returns (the values written, the factor)."""
    values = plant.values[index]
    ratio = float(weight.abs().mean()) / max(float(values.abs().mean()), 1e-30)
    factor = 2.0 ** round(math.log2(ratio)) if ratio > 0 else 1.0
    scaled = values * factor
    weight.view(-1)[plant.positions[index]] = scaled
    return scaled, factor


def check_plant_scorer(scorer: Scorer) -> None:
    """A plant needs a rule whose ticket computes with the frozen weights as drawn (weight
    x mask): one that rewrites weights (iterand's re-draws, signed-supermask's signs) or
    transforms them (biprop's binarised weights) would not compute the teacher."""
    if scorer.stores_weights or type(scorer).fixed_weights is not Scorer.fixed_weights:
        raise ConfigError(f"plant.enabled needs a scoring rule that keeps the frozen weights "
                          f"as they are (weight x mask); {scorer.name} changes them, so its "
                          "tickets could not compute the planted teacher")


def planted_in_source(src_idx: Sequence[Tensor], plant: Plant) -> list[Tensor]:
    """Per layer, which source edges (compact, in `src_idx` order) are planted."""
    return [torch.isin(idx, pos.to(idx.device)) for idx, pos in zip(src_idx, plant.positions)]


def _share(part: float, whole: float) -> float | None:
    """part / whole; None when there is no whole (a layer whose plant the source lost)."""
    return part / whole if whole else None


def plant_record(names: Sequence[str], src_idx: Sequence[Tensor], ticket: Sequence[Tensor],
                 plant: Plant) -> dict:
    """How much of the plant the source holds and the ticket found, per layer and in all:
    recall is of every planted edge, recall_in_source of those the source kept, precision
    is the planted share of the ticket. `chance_recall`: what a ticket of the same size per
    layer drawn at random from the source would find, on average (k_l of n_l source edges
    holds k_l * in_l / n_l of the in_l planted ones): the baseline recall is read against."""
    in_source = planted_in_source(src_idx, plant)
    layers, chance = [], 0.0
    for name, pos, idx, planted, kept in zip(names, plant.positions, src_idx, in_source,
                                             ticket):
        kept = kept.to(planted.device).bool()
        found, n_ticket = int((planted & kept).sum()), int(kept.sum())
        n_plant, n_in = int(pos.numel()), int(planted.sum())
        expected = n_ticket * n_in / max(int(idx.numel()), 1)
        chance += expected
        layers.append({"name": name, "planted": n_plant, "in_source": n_in, "found": found,
                       "ticket": n_ticket, "survival": _share(n_in, n_plant),
                       "recall": _share(found, n_plant),
                       "recall_in_source": _share(found, n_in),
                       "precision": _share(found, n_ticket),
                       "chance_recall": _share(expected, n_plant)})
    total = {k: sum(row[k] for row in layers)
             for k in ("planted", "in_source", "found", "ticket")}
    return {**total, "survival": _share(total["in_source"], total["planted"]),
            "recall": _share(total["found"], total["planted"]),
            "recall_in_source": _share(total["found"], total["in_source"]),
            "precision": _share(total["found"], total["ticket"]),
            "chance_recall": _share(chance, total["planted"]), "layers": layers}
