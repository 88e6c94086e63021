"""Effective density: the SynFlow-like trace against brute-force path search over explicit
unit graphs (an MLP, a conv net with max pooling, a residual block with an identity
shortcut, a source), stranded units counted by hand, a torchvision ResNet-18, and the
caller's network left as it was."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
from torch import Tensor, nn

from slt import resolve
from slt.effective import EffectiveDensity, effective_density, effective_masks
from slt.layers import MaskedConv2d, MaskedLinear
from slt.network import SltNetwork, build_network
from slt.spec import DataSpec

Key = tuple[int, int]  # (layer index in net.all_layers, flat index in the weight)


def net_of(*overrides: str, spec: DataSpec, data: str = "planted_teacher") -> SltNetwork:
    return build_network(resolve.load(None, [f"data.name={data}", *overrides]), spec)


def random_masks(net: SltNetwork, keep: float, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(layer.n_source, generator=gen) < keep for layer in net.searched_layers]


def full_masks(net: SltNetwork, masks: list[Tensor] | None) -> list[Tensor]:
    """Boolean present-edge mask of every layer in its weight's shape (dense layers full)."""
    ticket = iter(masks if masks is not None else [None] * len(net.searched_layers))
    out = []
    for layer in net.all_layers:
        mask = next(ticket) if layer.searched else None
        out.append(layer.source_mask() if mask is None else layer.expand(mask.float()).bool())
    return out


# --- the brute force: explicit unit graphs ----------------------------------------------


class Graph:
    """Units as integers, edges (source, target, weight entry or None for a plain wire)."""

    def __init__(self) -> None:
        self.count = 0
        self.edges: list[tuple[int, int, Key | None]] = []

    def units(self, *shape: int) -> Tensor:
        n = int(torch.Size(shape).numel())
        self.count += n
        return torch.arange(self.count - n, self.count).view(shape)

    def linear(self, x: Tensor, present: Tensor, layer: int) -> Tensor:
        y = self.units(present.shape[0])
        for o, i in present.nonzero().tolist():
            self.edges.append((int(x[i]), int(y[o]), (layer, o * present.shape[1] + i)))
        return y

    def conv(self, x: Tensor, present: Tensor, layer: int, stride: int = 1,
             padding: int = 0) -> Tensor:
        """Every spatial use of every present kernel entry (o, i, kh, kw) is one edge."""
        out_c, _, k, _ = present.shape
        h, w = ((s + 2 * padding - k) // stride + 1 for s in x.shape[1:])
        y = self.units(out_c, h, w)
        for o, i, kh, kw in present.nonzero().tolist():
            key = (layer, ((o * present.shape[1] + i) * k + kh) * k + kw)
            for r in range(h):
                for c in range(w):
                    ir, ic = r * stride + kh - padding, c * stride + kw - padding
                    if 0 <= ir < x.shape[1] and 0 <= ic < x.shape[2]:
                        self.edges.append((int(x[i, ir, ic]), int(y[o, r, c]), key))
        return y

    def max_pool(self, x: Tensor, k: int) -> Tensor:
        y = self.units(x.shape[0], x.shape[1] // k, x.shape[2] // k)
        for ch, r, c in torch.cartesian_prod(*(torch.arange(n) for n in y.shape)).tolist():
            for dr in range(k):
                for dc in range(k):
                    self.edges.append((int(x[ch, r * k + dr, c * k + dc]), int(y[ch, r, c]),
                                       None))
        return y

    def add(self, x: Tensor, into: Tensor) -> Tensor:
        """A residual sum: wires from x into the units of `into` (same shape)."""
        for a, b in zip(x.reshape(-1).tolist(), into.reshape(-1).tolist()):
            self.edges.append((a, b, None))
        return into

    def effective(self, inputs: Tensor, outputs: Tensor) -> set[Key]:
        """Weight entries of edges whose source an input reaches and whose target reaches
        an output (BFS both ways)."""
        fwd: dict[int, list[int]] = {}
        bwd: dict[int, list[int]] = {}
        for s, t, _ in self.edges:
            fwd.setdefault(s, []).append(t)
            bwd.setdefault(t, []).append(s)
        reach, coreach = _bfs(inputs.reshape(-1).tolist(), fwd), _bfs(
            outputs.reshape(-1).tolist(), bwd)
        return {key for s, t, key in self.edges
                if key is not None and s in reach and t in coreach}


def _bfs(start: list[int], adj: dict[int, list[int]]) -> set[int]:
    seen, queue = set(start), deque(start)
    while queue:
        for nxt in adj.get(queue.popleft(), ()):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def trace_keys(net: SltNetwork, masks: list[Tensor] | None, shape: tuple[int, ...]
               ) -> set[Key]:
    """The trace's effective edges as (layer index in all_layers, flat weight index)."""
    eff = iter(effective_masks(net, masks, shape))
    return {(i, int(layer.src_idx[j])) for i, layer in enumerate(net.all_layers)
            if layer.searched for j in next(eff).nonzero().squeeze(1).tolist()}


def check_counts(result: EffectiveDensity, net: SltNetwork, masks: list[Tensor] | None,
                 expected: set[Key]) -> None:
    """Per searched layer: present, effective and alive as the brute force counts them."""
    present = full_masks(net, masks)
    searched = [i for i, layer in enumerate(net.all_layers) if layer.searched]
    for row, i in zip(result.layers, searched):
        layer = net.all_layers[i]
        flat = sorted(j for li, j in expected if li == i)
        assert row.present == int(present[i].sum())
        assert row.effective == len(flat)
        assert row.alive == len({j // layer.fan_in for j in flat})
        assert row.units == layer.weight_shape[0]
    assert result.total("effective") == sum(1 for li, _ in expected if li in searched)


def mlp_graph(net: SltNetwork, masks: list[Tensor] | None, n_in: int) -> set[Key]:
    graph = Graph()
    x = inputs = graph.units(n_in)
    for i, present in enumerate(full_masks(net, masks)):
        x = graph.linear(x, present, i)
    return graph.effective(inputs, x)


# --- MLPs -------------------------------------------------------------------------------


def test_a_dense_ticket_is_fully_effective() -> None:
    net = net_of("model.name=mlp", spec=DataSpec((1, 28, 28), 10))  # LeNet-300-100
    masks = [torch.ones(layer.n_source, dtype=torch.bool) for layer in net.searched_layers]
    result = effective_density(net, masks, (1, 28, 28))
    assert result.effective_fraction == result.alive_fraction == 1.0
    assert result.effective_density == result.nominal_density == 1.0
    assert result.total("effective") == 266200
    assert [r["name"] for r in result.to_dict()["layers"]] == ["1", "3", "5"]


def test_hand_built_stranded_units_by_count() -> None:
    """Hidden unit a0 has outgoing but no incoming edges, a3 incoming but no outgoing;
    b2 is fed only by a0, so it is dead although it feeds output 0."""
    net = net_of("model.name=mlp", "model.hidden=[4, 4]", spec=DataSpec((3,), 2))
    w0 = [[0, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 0]]
    w1 = [[1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]]
    w2 = [[1, 0, 1, 0], [0, 1, 0, 1]]
    masks = [torch.tensor(w, dtype=torch.bool).reshape(-1) for w in (w0, w1, w2)]
    result = effective_density(net, masks, (3,))
    rows = [(r.present, r.effective, r.units, r.alive) for r in result.layers]
    assert rows == [(5, 4, 4, 2), (6, 4, 4, 3), (4, 3, 2, 2)]
    assert result.effective_fraction == pytest.approx(11 / 15)
    assert result.effective_density == pytest.approx(11 / 36)
    assert result.nominal_density == pytest.approx(15 / 36)
    assert result.alive_fraction == pytest.approx(7 / 10)
    expected = mlp_graph(net, masks, 3)
    assert trace_keys(net, masks, (3,)) == expected
    check_counts(result, net, masks, expected)


def test_random_sparse_mlp_tickets_match_the_brute_force() -> None:
    net = net_of("model.name=mlp", "model.hidden=[12, 10, 8]", "source.density=0.6",
                 spec=DataSpec((6,), 4))
    stranded = 0
    for seed in range(6):
        masks = random_masks(net, 0.35, seed)
        expected = mlp_graph(net, masks, 6)
        assert trace_keys(net, masks, (6,)) == expected
        result = effective_density(net, masks, (6,))
        check_counts(result, net, masks, expected)
        stranded += result.effective_fraction < 1.0
    assert stranded >= 4  # sparse enough that most tickets strand units


def test_a_sparse_source_strands_units_and_matches_the_brute_force() -> None:
    net = net_of("model.name=mlp", "model.hidden=[20, 20]", "source.density=0.05",
                 spec=DataSpec((10,), 4))
    result = effective_density(net, None, (10,))
    expected = mlp_graph(net, None, 10)
    assert trace_keys(net, None, (10,)) == expected
    check_counts(result, net, None, expected)
    assert result.total("present") == 34
    assert result.effective_fraction < 1.0
    assert result.nominal_density == pytest.approx(0.05, abs=1e-3)
    assert result.effective_density < result.nominal_density


def test_dense_layers_count_as_present_but_are_not_reported() -> None:
    net = net_of("model.name=mlp", "model.hidden=[8]", "model.first_layer_dense=true",
                 spec=DataSpec((5,), 3))
    masks = random_masks(net, 0.3, 1)
    result = effective_density(net, masks, (5,))
    expected = mlp_graph(net, masks, 5)
    assert [r.name for r in result.layers] == ["3"]
    check_counts(result, net, masks, expected)


# --- a conv net with max pooling --------------------------------------------------------


def conv_graph(net: SltNetwork, masks: list[Tensor], shape: tuple[int, ...]) -> set[Key]:
    """Walk a built-in conv body: convs, ReLUs, max pools, flatten, linears."""
    graph, present, i = Graph(), full_masks(net, masks), 0
    x = inputs = graph.units(*shape)
    for module in net.body:
        if isinstance(module, MaskedConv2d):
            x, i = graph.conv(x, present[i], i, module.stride, module.padding), i + 1
        elif isinstance(module, MaskedLinear):
            x, i = graph.linear(x, present[i], i), i + 1
        elif isinstance(module, nn.MaxPool2d):
            x = graph.max_pool(x, module.kernel_size)
        elif isinstance(module, nn.Flatten):
            x = x.reshape(-1)
        else:
            assert isinstance(module, nn.ReLU)
    return graph.effective(inputs, x)


@pytest.mark.parametrize(("shape", "keep", "seed"), [
    ((2, 5, 5), 0.25, 0), ((2, 5, 5), 0.15, 1), ((2, 5, 5), 0.15, 2), ((1, 2, 2), 1.0, 0)])
def test_conv_net_kernel_entries_match_the_pixel_graph(shape, keep, seed) -> None:
    """conv2 at width 3/64: on 5x5 the 2x2 pool drops row and column 4; on 2x2, dense, all
    four pixels of the pooled window tie, and each carries other kernel entries."""
    net = net_of("model.name=conv2", "model.width=0.047", spec=DataSpec(shape, 3))
    assert net.all_layers[1].weight_shape == (3, 3, 3, 3)
    masks = random_masks(net, keep, seed)
    expected = conv_graph(net, masks, shape)
    assert trace_keys(net, masks, shape) == expected
    result = effective_density(net, masks, shape)
    check_counts(result, net, masks, expected)
    assert (0 < result.effective_fraction < 1.0) if keep < 1 else (
        result.effective_fraction == 1.0)


# --- a residual block with an identity shortcut (a python: reference) ---------------------


class TinyResNet(nn.Module):
    """Stem, one BasicBlock with an identity shortcut (biases, BatchNorm), 2x2 max pool,
    linear head: every weight becomes a WeightSlot, biases and norms are the user's."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(self.pool(torch.relu(out + x)).flatten(1))


def tiny_resnet(num_classes: int = 2) -> nn.Module:
    return TinyResNet(num_classes)


class Exploding(nn.Module):
    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x) / torch.zeros(())


def exploding(num_classes: int = 2) -> nn.Module:
    return Exploding(num_classes)


RESNET_SHAPE = (2, 5, 5)


def resnet_net(*overrides: str) -> SltNetwork:
    return net_of("model.name=python:tests.test_effective_density:tiny_resnet", *overrides,
                  data="cifar10", spec=DataSpec(RESNET_SHAPE, 2))


def resnet_graph(net: SltNetwork, masks: list[Tensor]) -> set[Key]:
    graph, present = Graph(), full_masks(net, masks)
    inputs = graph.units(*RESNET_SHAPE)
    x = graph.conv(inputs, present[0], 0, padding=1)
    out = graph.conv(graph.conv(x, present[1], 1, padding=1), present[2], 2, padding=1)
    x = graph.max_pool(graph.add(x, out), 2).reshape(-1)
    return graph.effective(inputs, graph.linear(x, present[3], 3))


def test_residual_block_matches_the_graph_with_its_shortcut() -> None:
    """Biases and norms as training might leave them (positive biases would feed stranded
    units, a negative norm scale or shifted mean would silence live ones): all neutral."""
    net = resnet_net("model.bias=random", "model.norm=learned")
    assert [i.name for i in net.infos] == ["stem.weight", "conv1.weight", "conv2.weight",
                                           "head.weight"]
    with torch.no_grad():
        for name, param in net.body.named_parameters():
            param.fill_(-1.0 if name.startswith("bn") and name.endswith("weight") else 1.0)
        net.body.bn1.running_mean.fill_(5.0)
    partial = 0
    for seed in range(6):
        masks = random_masks(net, 0.15, seed)
        expected = resnet_graph(net, masks)
        assert trace_keys(net, masks, RESNET_SHAPE) == expected
        result = effective_density(net, masks, RESNET_SHAPE)
        check_counts(result, net, masks, expected)
        partial += 0 < result.effective_fraction < 1
    assert partial >= 2


def test_the_shortcut_carries_paths_past_an_empty_branch() -> None:
    """conv2 keeps no edge: the block's branch is cut, the stem still reaches the head."""
    net = resnet_net()
    masks = [torch.ones(layer.n_source, dtype=torch.bool) for layer in net.searched_layers]
    masks[2][:] = False
    result = effective_density(net, masks, RESNET_SHAPE)
    rows = {r.name: (r.present, r.effective) for r in result.layers}
    assert rows["stem.weight"] == (54, 54)
    assert rows["conv1.weight"] == (81, 0)  # leads only into the empty conv2
    assert rows["conv2.weight"] == (0, 0)
    assert rows["head.weight"] == (24, 24)
    assert result.to_dict()["layers"][2]["effective_fraction"] == 1.0  # nothing present


# --- library models, errors, the caller's network ----------------------------------------


def test_torchvision_resnet18_dense_ticket_and_kernel_entries_that_read_only_padding() -> None:
    """At 64x64 a dense ticket is fully effective. At 32x32 layer4 runs on 2x2 and then
    1x1 maps: its stride-2 3x3 conv uses 4 of 9 kernel entries, the later ones only the
    centre; the others multiply padding and lie on no path."""
    pytest.importorskip("torchvision")
    net = net_of("model.name=torchvision:resnet18", data="cifar10",
                 spec=DataSpec((3, 32, 32), 10))
    dense = [torch.ones(layer.n_source, dtype=torch.bool) for layer in net.searched_layers]
    result = effective_density(net, dense, (3, 64, 64))
    assert result.effective_fraction == result.alive_fraction == 1.0
    assert result.effective_density == result.nominal_density == 1.0
    small = effective_density(net, dense, (3, 32, 32))
    used = {"layer4.0.conv1.weight": 4 / 9, "layer4.0.conv2.weight": 1 / 9,
            "layer4.1.conv1.weight": 1 / 9, "layer4.1.conv2.weight": 1 / 9}
    for row in small.layers:
        assert row.effective == round(row.numel * used.get(row.name, 1.0)), row.name
        assert row.alive == row.units
    summary = small.to_dict()
    assert summary["effective_fraction"] == pytest.approx(0.378, abs=1e-3)
    assert summary["effective_density"] == summary["effective_fraction"]  # dense ticket
    assert all(math.isfinite(v) and 0.0 < v <= 1.0 for k, v in summary.items()
               if k.endswith(("density", "fraction")))


def test_attention_queries_and_keys_are_effective_in_a_dense_vit() -> None:
    """The class token is a learned input (1 in the trace, not zeroed like a bias): the
    last block's queries and keys reach the head through its attention to the patches."""
    pytest.importorskip("timm")
    net = net_of("model.name=timm:vit_tiny_patch16_224", "model.kwargs.img_size=16",
                 "model.kwargs.patch_size=4", "model.kwargs.depth=1", data="cifar10",
                 spec=DataSpec((3, 16, 16), 10))
    dense = [torch.ones(layer.n_source, dtype=torch.bool) for layer in net.searched_layers]
    result = effective_density(net, dense, (3, 16, 16))
    assert "blocks.0.attn.qkv.weight" in [row.name for row in result.layers]
    assert result.effective_fraction == result.alive_fraction == 1.0


def test_bad_masks_and_non_finite_values_are_value_errors() -> None:
    net = net_of("model.name=mlp", "model.hidden=[4]", spec=DataSpec((3,), 2))
    with pytest.raises(ValueError, match="1 masks for 2 searched layers"):
        effective_density(net, [torch.ones(12, dtype=torch.bool)], (3,))
    with pytest.raises(ValueError, match="does not match"):
        effective_density(net, [torch.ones(5, dtype=torch.bool)] * 2, (3,))
    boom = net_of("model.name=python:tests.test_effective_density:exploding", data="cifar10",
                  spec=DataSpec((4,), 2))
    with pytest.raises(ValueError, match="non-finite"):
        effective_density(boom, None, (4,))


def snapshot(net: SltNetwork) -> dict:
    state = {f"p.{k}": v.detach().clone() for k, v in net.named_parameters()}
    state.update({f"b.{k}": v.clone() for k, v in net.named_buffers()})
    for i, layer in enumerate(net.all_layers):
        state[f"w{i}"] = layer.weight_src.clone()
        if layer.effective_src is not None:
            state[f"e{i}"] = layer.effective_src.detach().clone()
    return state


@pytest.mark.parametrize("model", ["mlp", "tiny_resnet"])
def test_the_callers_network_is_untouched(model: str) -> None:
    if model == "mlp":
        shape = (6,)
        net = net_of("model.name=mlp", "model.hidden=[8]", "source.density=0.5",
                     spec=DataSpec(shape, 3))
    else:
        shape, net = RESNET_SHAPE, resnet_net("model.bias=random")
    x = torch.rand(2, *shape)
    net(x).sum().backward()  # training forward: effective weights that carry autograd
    out_before = net.eval().apply_body(x).detach()
    net.train()
    before, grads = snapshot(net), [layer.scores.grad.clone() for layer in net.searched_layers]
    effective_density(net, net.ticket_masks(), shape)
    effective_density(net, None, shape)
    after = snapshot(net)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(g, layer.scores.grad) for g, layer in zip(grads, net.searched_layers))
    assert all(m.training for m in net.modules()) and not net.fixed
    assert all(not m._forward_hooks for m in net.modules())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert torch.equal(net.eval().apply_body(x).detach(), out_before)
