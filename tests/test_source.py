"""Layerwise schemes, nested source masks and weight init."""

from __future__ import annotations

import math

import pytest
import torch

from slt import source
from slt.errors import ConfigError

LENET = [(300, 784), (100, 300), (10, 100)]
CONV = [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3), (10, 128)]


def sizes(shapes):
    return [math.prod(s) for s in shapes]


@pytest.mark.parametrize("scheme", ["uniform", "er", "erk", "balanced", "pyramidal"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.05, 0.01])
@pytest.mark.parametrize("shapes", [LENET, CONV])
def test_exact_totals(scheme, density, shapes) -> None:
    counts = source.source_counts(scheme, shapes, density)
    assert sum(counts) == source.count_of(density, sum(sizes(shapes)))
    assert all(0 <= c <= n for c, n in zip(counts, sizes(shapes)))


def test_uniform_formula() -> None:
    assert source.source_counts("uniform", LENET, 0.2) == [47040, 6000, 200]


def test_er_formula_with_clipping() -> None:
    dens = source.layer_densities("er", LENET, 0.2)
    # the 100->10 layer is clipped at 1; the others keep the ratio of their ER factors
    assert dens[2] == 1.0
    f0, f1 = (784 + 300) / (784 * 300), (300 + 100) / (300 * 100)
    assert dens[0] / dens[1] == pytest.approx(f0 / f1, rel=1e-4)  # up to integer rounding
    assert sum(d * n for d, n in zip(dens, sizes(LENET))) == 0.2 * 266200


def test_erk_uses_kernel_dims() -> None:
    dens = source.layer_densities("erk", CONV, 0.1)
    f = [sum(s) / math.prod(s) for s in CONV]
    unclipped = [i for i, d in enumerate(dens) if d < 1.0]
    assert len(unclipped) >= 2
    i, j = unclipped[:2]
    assert dens[i] / dens[j] == pytest.approx(f[i] / f[j], rel=1e-3)


def test_balanced_gives_equal_counts_until_clipped() -> None:
    counts = source.source_counts("balanced", LENET, 0.2)
    assert counts[2] == 1000  # small layer clipped at its size
    assert abs(counts[0] - counts[1]) <= 1


def test_pyramidal_is_geometric() -> None:
    dens = source.layer_densities("pyramidal", LENET, 0.2)
    r = dens[0]
    assert dens[1] == pytest.approx(r**2, rel=1e-3) and dens[2] == pytest.approx(r**3, abs=1e-3)
    assert sum(d * n for d, n in zip(dens, sizes(LENET))) == pytest.approx(0.2 * 266200)


def test_custom_list() -> None:
    assert source.source_counts("custom", LENET, 1.0, [0.5, 0.25, 1.0]) == [117600, 7500, 1000]
    with pytest.raises(ConfigError, match="3 searched layers"):
        source.source_counts("custom", LENET, 1.0, [0.5])


TINY_LAYERS = [(7, 3), (1, 7), (300, 784), (2, 2, 3, 3), (10, 100)]


@pytest.mark.parametrize("scheme", ["uniform", "er", "erk", "balanced", "pyramidal"])
@pytest.mark.parametrize("shapes", [LENET, CONV, TINY_LAYERS])
def test_counts_never_fall_as_density_rises(scheme, shapes) -> None:
    """Nested sources need every layer's count to be monotone in the density."""
    previous = [0] * len(shapes)
    for step in range(1, 201):
        counts = source.source_counts(scheme, shapes, step / 200)
        assert all(a <= b for a, b in zip(previous, counts)), (step, previous, counts)
        previous = counts
    assert previous == sizes(shapes)  # density 1 is the dense network


def test_rounding_is_half_up() -> None:
    assert source.count_of(0.5, 1) == 1 and source.count_of(0.25, 10) == 3
    assert source.source_counts("uniform", [(5, 1)], 0.5) == [3]


def test_masks_nest_across_densities_and_have_exact_counts() -> None:
    shape = (50, 40)
    masks = [source.nested_mask(shape, c, source_seed=3, layer_index=1) for c in (1600, 400, 100)]
    assert [int(m.sum()) for m in masks] == [1600, 400, 100]
    assert bool((masks[1] <= masks[0]).all()) and bool((masks[2] <= masks[1]).all())
    other_seed = source.nested_mask(shape, 400, source_seed=4, layer_index=1)
    assert not torch.equal(other_seed, masks[1])
    assert torch.equal(source.nested_mask(shape, 400, 3, 1), masks[1])  # deterministic


def test_init_statistics() -> None:
    shape = (400, 500)
    w = source.init_weight("kaiming_normal", shape, run_seed=0, layer_index=0)
    assert w.std().item() == pytest.approx(math.sqrt(2 / 500), rel=0.02)
    assert abs(w.mean().item()) < 0.002
    s = source.init_weight("signed_constant", shape, run_seed=0, layer_index=0)
    assert torch.allclose(s.abs(), torch.full(shape, math.sqrt(2 / 500)))
    assert abs((s > 0).float().mean().item() - 0.5) < 0.01
    scaled = source.init_weight("signed_constant", shape, 0, 0, scale_density=0.25)
    assert torch.allclose(scaled, s * 2)  # std / sqrt(0.25), same signs
    assert not torch.equal(source.init_weight("kaiming_normal", shape, 1, 0), w)
    assert not torch.equal(source.init_weight("kaiming_normal", shape, 0, 1), w)
