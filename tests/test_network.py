"""Masks inside the source, exact counts, straight-through gradients, scales, dense layers."""

from __future__ import annotations

import math

import pytest
import torch

from slt import resolve
from slt.network import build_network
from slt.spec import DataSpec

SPEC = DataSpec((1, 28, 28), 10)


def net_for(*overrides: str, spec: DataSpec = SPEC):
    cfg = resolve.load(None, ["data.name=planted_teacher", "model.name=mlp", *overrides])
    return cfg, build_network(cfg, spec)


@pytest.mark.parametrize("scheme", ["uniform", "erk", "pyramidal"])
def test_layer_scope_keeps_exact_k_inside_source(scheme: str) -> None:
    cfg, net = net_for("source.density=0.3", "search.ticket_density=0.1",
                       f"source.scheme={scheme}")
    masks = net.ticket_masks()
    for layer, mask in zip(net.searched_layers, masks):
        assert int(mask.sum()) == math.floor(cfg.keep * layer.n_source + 0.5)
        full = layer.expand(mask.float()).bool()
        assert bool((full <= layer.source_mask()).all())  # ticket subset of source
    dens = net.densities(masks)
    assert dens["n_source"] == round(0.3 * 266200)
    assert dens["ticket_density"] == pytest.approx(0.1, abs=1e-4)


def test_global_scope_keeps_exact_total() -> None:
    _, net = net_for("source.density=0.5", "search.ticket_density=0.1", "search.scope=global")
    masks = net.ticket_masks()
    assert sum(int(m.sum()) for m in masks) == round(0.1 * 266200)
    # global top-k: every kept |score| >= every dropped |score| across layers
    scores = torch.cat([layer.scores.detach().abs() for layer in net.searched_layers])
    flat = torch.cat(masks)
    assert scores[flat].min() >= scores[~flat].max()


def test_forward_uses_only_ticket_edges() -> None:
    _, net = net_for("source.density=0.5", "search.keep=0.5", "model.hidden=[]")
    x = torch.randn(4, 1, 28, 28)
    out = net(x)
    layer = net.searched_layers[0]
    mask = net.ticket_masks()[0]
    weight = layer.expand(layer.weight_src * mask)
    assert torch.allclose(out, x.flatten(1) @ weight.T, atol=1e-6)


def test_straight_through_gradient_values() -> None:
    _, net = net_for("source.density=0.5", "search.keep=0.3", "model.hidden=[]")
    x = torch.randn(5, 1, 28, 28)
    net(x).sum().backward()
    layer = net.searched_layers[0]
    grad_weight = torch.ones(5, 10).T @ x.flatten(1)  # d sum(xW^T) / dW
    grad_eff = grad_weight.reshape(-1)[layer.src_idx]
    expected = grad_eff * layer.weight_src * torch.sign(layer.scores.detach())
    assert torch.allclose(layer.scores.grad, expected, atol=1e-5)
    # pruned edges get gradient too: that is what lets them pop back in
    mask = net.ticket_masks()[0]
    assert (layer.scores.grad[~mask] != 0).float().mean() > 0.9


def test_weights_shared_across_densities_and_sources_nested() -> None:
    _, dense = net_for("source.density=1.0", "search.ticket_density=0.1")
    _, half = net_for("source.density=0.5", "search.ticket_density=0.1")
    _, fifth = net_for("source.density=0.2", "search.ticket_density=0.1")
    for a, b, c in zip(dense.all_layers, half.all_layers, fifth.all_layers):
        assert bool((c.source_mask() <= b.source_mask()).all())
        assert torch.equal(a.weight_src[b.src_idx], b.weight_src)  # same weights, fewer edges


def test_source_seed_moves_masks_not_weights() -> None:
    _, a = net_for("source.density=0.5", "search.keep=0.5", "source.seed=0")
    _, b = net_for("source.density=0.5", "search.keep=0.5", "source.seed=1")
    la, lb = a.all_layers[0], b.all_layers[0]
    assert not torch.equal(la.source_mask(), lb.source_mask())
    assert torch.equal(la.expand(la.weight_src)[lb.source_mask() & la.source_mask()],
                       lb.expand(lb.weight_src)[lb.source_mask() & la.source_mask()])
    _, c = net_for("source.density=0.5", "search.keep=0.5", "run.seed=1")
    assert torch.equal(c.all_layers[0].source_mask(), la.source_mask())
    assert not torch.equal(c.all_layers[0].weight_src, la.weight_src)


def test_init_scale_source_and_ticket() -> None:
    _, plain = net_for("source.density=0.25", "search.keep=0.5", "model.init=signed_constant")
    _, src = net_for("source.density=0.25", "search.keep=0.5", "model.init=signed_constant",
                     "model.init_scale=source")
    _, tik = net_for("source.density=0.25", "search.keep=0.5", "model.init=signed_constant",
                     "model.init_scale=ticket")
    p, s, t = plain.all_layers[0], src.all_layers[0], tik.all_layers[0]
    assert torch.allclose(s.weight_src, p.weight_src * 2)  # 1/sqrt(0.25)
    assert torch.allclose(t.weight_src, p.weight_src * math.sqrt(8))  # 1/sqrt(0.125)


def test_first_and_last_layer_dense() -> None:
    _, net = net_for("source.density=0.2", "search.ticket_density=0.1",
                     "model.first_layer_dense=true", "model.last_layer_dense=true")
    layers = net.all_layers
    assert not layers[0].searched and not layers[-1].searched
    assert layers[0].n_source == layers[0].numel and layers[0].scores is None
    assert [layer.searched for layer in layers] == [False, True, False]
    dens = net.densities()
    assert dens["n_prunable"] == 300 * 100  # only the searched layer counts
    assert dens["n_ticket"] == round(0.1 * 30000)


def test_custom_layer_densities() -> None:
    _, net = net_for("source.scheme=custom", "source.layer_densities=[0.5, 0.25, 1.0]",
                     "search.keep=0.5")
    assert [layer.n_source for layer in net.all_layers] == [117600, 7500, 1000]


def test_initial_scores_belong_to_edges_not_to_sources() -> None:
    _, dense = net_for("source.density=1.0", "search.keep=0.5")
    _, half = net_for("source.density=0.5", "search.keep=0.5")
    _, other = net_for("source.density=0.5", "search.keep=0.5", "source.seed=3")
    for a, b, c in zip(dense.all_layers, half.all_layers, other.all_layers):
        assert torch.equal(a.scores.detach()[b.src_idx], b.scores.detach())
        assert torch.equal(a.scores.detach()[c.src_idx], c.scores.detach())


def test_a_layer_without_source_edges_is_a_config_error() -> None:
    from slt.errors import ConfigError

    # pyramidal at 5% leaves the 10-output layer of LeNet with r^3 * 1000 < 0.5 edges
    with pytest.raises(ConfigError, match="leaves layer .* with no source edges"):
        net_for("source.density=0.05", "source.scheme=pyramidal", "search.keep=0.5")
    with pytest.raises(ConfigError, match="keeps no edge of layer"):
        net_for("source.density=1.0", "search.keep=0.0004")


def test_ticket_as_dense_as_its_source_rounds_consistently() -> None:
    # N = 8*15 + 15*3 = 165: round-half-up everywhere, so t = d never exceeds the source
    cfg, net = net_for("source.density=0.1", "search.ticket_density=0.1", "model.hidden=[15]",
                       spec=DataSpec((8,), 3))
    assert sum(int(m.sum()) for m in net.ticket_masks()) == 17 == net.densities()["n_source"]
