"""Scoring rules: the property that defines each one, their options in the config, and a
third-party rule installed as a real package through the entry-point group."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from slt import config, resolve, ticket
from slt.cli import main
from slt.engine.run import run_search
from slt.errors import ConfigError
from slt.network import build_network
from slt.scorers import SCORERS, Budget, EpochContext
from slt.scorers.edge_popup import annealed_k
from slt.scorers.gem_miner import hard_prune
from slt.scorers.iterand import rerandomise
from slt.scorers.lookup import create_scorer
from slt.spec import DataSpec
from tests.conftest import REPO, TINY

SPEC = DataSpec((1, 8, 8), 4)


# TINY without its ticket size: one --set list may not give both keep and ticket_density
TINY_NO_SIZE = [o for o in TINY if not o.startswith("search.ticket_density=")]


def net_for(scorer: str, *extra: str, density: float = 0.5, keep: float = 0.25):
    cfg = resolve.load(None, [*TINY_NO_SIZE, "model.hidden=[48, 32]", f"source.density={density}",
                             f"search.keep={keep}", f"search.scorer={scorer}", *extra])
    return build_network(cfg, SPEC), cfg


def counts(masks) -> list[int]:
    return [int((m != 0).sum()) for m in masks]


def test_every_shipped_rule_is_registered_and_listed(capsys) -> None:
    shipped = {"edge-popup", "global-edge-popup", "biprop", "gem-miner", "iterand",
               "bernoulli", "signed-supermask"}
    assert shipped <= set(SCORERS.names())
    assert main(["scorers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split()[0] for line in lines} >= shipped
    assert any(line.startswith("iterand") and "[options: every=1, rate=0.1]" in line
               for line in lines)


@pytest.mark.parametrize("scorer", ["edge-popup", "biprop", "gem-miner", "iterand",
                                    "bernoulli", "signed-supermask"])
def test_ticket_has_exact_counts(scorer: str) -> None:
    net, _ = net_for(scorer)
    layers = net.searched_layers
    assert counts(net.ticket_masks()) == list(net.budget.layer_k)
    eval_masks = net.scorer.masks(layers, net.budget, training=False)
    assert counts(eval_masks) == list(net.budget.layer_k)


def test_edge_popup_global_scope_keeps_the_total() -> None:
    net, _ = net_for("edge-popup", "search.scope=global")
    assert sum(counts(net.ticket_masks())) == net.budget.total_k


def test_biprop_gain_is_the_mean_kept_magnitude() -> None:
    net, _ = net_for("biprop", "model.init=kaiming_normal")
    layers = net.searched_layers
    effective = net.scorer.effective_weights(layers, net.budget)
    for layer, eff, kept in zip(layers, effective, net.ticket_masks()):
        w = layer.weight_src
        alpha = w.abs()[kept].mean()
        assert torch.allclose(eff[kept].abs(), alpha.expand(int(kept.sum())))
        assert torch.equal(torch.sign(eff[kept]), torch.sign(w[kept]))
        assert torch.all(eff[~kept] == 0)
        assert torch.allclose(net.scorer.fixed_weights(layer, kept), eff.detach())


def test_signed_supermask_keeps_hides_and_inverts(tmp_path) -> None:
    net, _ = net_for("signed-supermask")
    layers = net.searched_layers
    masks = net.scorer.masks(layers, net.budget, training=True)
    for layer, m in zip(layers, masks):
        assert set(m.unique().tolist()) <= {-1.0, 0.0, 1.0}
        kept = m != 0
        assert torch.equal(m[kept] < 0, layer.scores[kept] < 0)
        assert (m[kept] < 0).any() and (m[kept] > 0).any()
    assert counts(masks) == list(net.budget.layer_k)


def test_bernoulli_samples_in_training_and_is_fixed_in_evaluation() -> None:
    net, _ = net_for("bernoulli", keep=0.25)
    layers = net.searched_layers
    scorer = net.scorer
    scorer.on_epoch_start(EpochContext(1, 3, 0, layers, net.budget))
    a = scorer.masks(layers, net.budget, training=True)
    b = scorer.masks(layers, net.budget, training=True)
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in a)
    assert any(not torch.equal(x, y) for x, y in zip(a, b))  # a fresh sample each pass
    # the samples' density follows sigmoid(s), which starts at the target keep of 0.25
    n = sum(m.numel() for m in a)
    sampled = sum(float(m.detach().sum()) for m in a + b) / (2 * n)
    expected = sum(float(torch.sigmoid(layer.scores.detach()).sum()) for layer in layers) / n
    assert expected == pytest.approx(0.25, abs=0.02)
    assert sampled == pytest.approx(expected, abs=4 * math.sqrt(0.25 * 0.75 / (2 * n)))
    # reseeding the epoch draws the same sample again
    scorer.on_epoch_start(EpochContext(1, 3, 0, layers, net.budget))
    assert all(torch.equal(x, y) for x, y in zip(a, scorer.masks(layers, net.budget, True)))
    e1 = scorer.masks(layers, net.budget, training=False)
    e2 = scorer.masks(layers, net.budget, training=False)
    assert all(torch.equal(x, y) for x, y in zip(e1, e2))
    assert counts(e1) == list(net.budget.layer_k)
    # the gradient reaches the scores through sigmoid
    layer = layers[0]
    m = scorer.masks([layer], Budget("layer", (net.budget.layer_k[0],), 0), True)[0]
    m.sum().backward()
    p = torch.sigmoid(layer.scores.detach())
    assert torch.allclose(layer.scores.grad, p * (1 - p))


def test_gem_miner_range_threshold_regulariser_and_hard_prune() -> None:
    net, _ = net_for("gem-miner", "search.scorer.lam=0.01")
    layers = net.searched_layers
    scorer = net.scorer
    assert all(0 <= float(layer.scores.detach().min()) and float(layer.scores.detach().max()) <= 1
               for layer in layers)
    for layer, m in zip(layers, scorer.masks(layers, net.budget, training=True)):
        assert torch.equal(m.bool(), layer.scores >= 0.5)
    reg = scorer.regulariser(layers)
    assert float(reg.detach()) == pytest.approx(
        0.01 * sum(float(layer.scores.detach().sum()) for layer in layers))
    with torch.no_grad():
        layers[0].scores.add_(0.9)
    scorer.after_step(layers)
    assert float(layers[0].scores.detach().max()) == 1.0
    with torch.no_grad():  # distinct scores, so the top-k is unambiguous
        for layer in layers:
            layer.scores.copy_(torch.rand(layer.n_source))
    hard_prune(layers, net.budget)
    assert [int((layer.scores != 0).sum()) for layer in layers] == list(net.budget.layer_k)
    assert counts(net.ticket_masks()) == list(net.budget.layer_k)


def test_iterand_redraws_the_expected_fraction_of_pruned_weights() -> None:
    net, _ = net_for("iterand", "model.init=kaiming_normal", density=1.0, keep=0.3)
    layer = net.searched_layers[0]  # 48 x 64 = 3072 edges
    kept = net.ticket_masks()[0]
    before = layer.weight_src.clone()
    redrawn = rerandomise(layer, kept, 0.5, torch.Generator().manual_seed(1))
    changed = layer.weight_src != before
    assert int(changed.sum()) == redrawn
    assert not changed[kept].any()  # kept edges never change
    pruned = int((~kept).sum())
    sd = math.sqrt(pruned * 0.25)
    assert abs(redrawn - 0.5 * pruned) < 4 * sd  # Binomial(pruned, 0.5)
    # drawn from the layer's own init: kaiming normal of the same std
    std = before.std()
    assert float(layer.weight_src[changed].std()) == pytest.approx(float(std), rel=0.15)


def test_iterand_hook_follows_its_period() -> None:
    net, _ = net_for("iterand", "search.scorer.every=2", "search.scorer.rate=1.0")
    layers = net.searched_layers
    before = [layer.weight_src.clone() for layer in layers]
    net.scorer.on_epoch_start(EpochContext(2, 5, 0, layers, net.budget))  # (2-1) % 2 != 0
    assert all(torch.equal(a, layer.weight_src) for a, layer in zip(before, layers))
    kept = net.ticket_masks()
    net.scorer.on_epoch_start(EpochContext(3, 5, 0, layers, net.budget))  # rate 1: all pruned
    for a, layer, k in zip(before, layers, kept):
        assert torch.equal(a[k], layer.weight_src[k])
        assert float((a[~k] != layer.weight_src[~k]).float().mean()) > 0.4  # +-c signs


def test_global_anneal_schedule() -> None:
    n, target, epochs = 10_000, 1_000, 5
    ks = [annealed_k(e, epochs, n, target) for e in range(1, 8)]
    assert ks[0] == n and ks[5:] == [target, target]
    assert ks == sorted(ks, reverse=True)
    assert ks[2] == target + round((1 - 2 / 5) ** 3 * (n - target))  # epoch 3: (3/5)^3
    net, cfg = net_for("global-edge-popup", "search.scorer.anneal_epochs=3")
    layers = net.searched_layers
    net.scorer.on_epoch_start(EpochContext(1, 10, 0, layers, net.budget))
    assert sum(counts(net.scorer.masks(layers, net.budget, True))) == sum(
        layer.n_source for layer in layers)
    assert sum(counts(net.ticket_masks())) == net.budget.total_k


@pytest.mark.parametrize("scorer", ["iterand", "signed-supermask", "gem-miner", "bernoulli"])
def test_tickets_rebuild_to_the_run_accuracy(tmp_path, scorer: str) -> None:
    from slt.data.datasets import load_data
    from slt.data.memory import Batches
    from slt.engine.measure import evaluate

    cfg = resolve.load(None, [*TINY, f"search.scorer={scorer}", "search.epochs=3"])
    result = run_search(cfg, tmp_path, log=lambda _: None)
    t = ticket.load(result.run_dir / "ticket.slt")
    assert t.header["embedded_weights"] == (scorer in ("iterand", "signed-supermask"))
    net = ticket.rebuild(t, torch.device("cpu"))
    acc = evaluate(net, Batches(load_data(cfg.data), torch.device("cpu")), 1000)[1]
    assert acc == result.summary["final_test_acc"]


def test_iterand_resume_gives_the_same_ticket(tmp_path) -> None:
    cfg = resolve.load(None, [*TINY, "search.scorer=iterand", "search.epochs=3",
                             "search.scorer.rate=0.5"])
    assert run_search(cfg, tmp_path / "a", stop_after_epochs=2,
                      log=lambda _: None).status == "stopped"
    resumed = run_search(cfg, tmp_path / "a", log=lambda _: None)
    fresh = run_search(cfg, tmp_path / "b", log=lambda _: None)
    a = ticket.load(resumed.run_dir / "ticket.slt")
    b = ticket.load(fresh.run_dir / "ticket.slt")
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.mask, y.mask) and torch.equal(x.weight, y.weight)


def test_scorer_options_in_the_config(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[search]\nkeep = 0.5\n[search.scorer]\nname = "iterand"\nrate = 0.25\n')
    cfg = resolve.load(path)
    # validated options are stored whole, defaults included: one computation, one run id
    assert cfg.search.scorer == "iterand"
    assert dict(cfg.search.scorer_options) == {"every": 1, "rate": 0.25}
    same = resolve.load(path, ["search.scorer.every=1"])
    assert config.run_id(same) == config.run_id(cfg)
    gem = [resolve.load(None, ["search.scorer=gem-miner", f"search.scorer.lam={v}"])
           for v in ("0", "0.0")]
    assert config.run_id(gem[0]) == config.run_id(gem[1])
    with pytest.raises(ConfigError, match="search.scorer.lam must be a finite number"):
        resolve.load(None, ["search.scorer=gem-miner", "search.scorer.lam=nan"])
    assert create_scorer("iterand", {"rate": 0.25}).options.rate == 0.25
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml(cfg))
    assert resolve.load(again) == cfg  # the inline table round-trips
    assert resolve.load(path, ["search.scorer.every=3"]).search.scorer_options == (
        ("every", 3), ("rate", 0.25))
    assert config.run_id(cfg) != config.run_id(resolve.load(path, ["search.scorer.rate=0.3"]))
    with pytest.raises(ConfigError, match=re.escape(
            "unknown option search.scorer.rat for scorer 'iterand' (did you mean 'rate'?)")):
        resolve.load(path, ["search.scorer.rat=0.1"])
    with pytest.raises(ConfigError, match="search.scorer.rate: expected float"):
        resolve.load(path, ['search.scorer.rate="high"'])
    with pytest.raises(ConfigError, match=r"rate must be in \[0, 1\]"):
        resolve.load(path, ["search.scorer.rate=2.0"])
    with pytest.raises(ConfigError, match="unknown option search.scorer.rate for scorer "
                                          "'biprop'"):
        resolve.load(path, ["search.scorer=biprop"])  # the options stay with the table


def test_scorer_options_in_sweeps(tmp_path) -> None:
    from slt.sweeps.grid import load_sweep

    path = tmp_path / "s.toml"
    path.write_text('[set]\nsearch.scorer.name = "gem-miner"\nsearch.scorer.lam = 0.001\n'
                    "[axes]\nsearch.scorer.prune_every = [1, 3]\nrun.seed = [0]\n")
    points = load_sweep(path).points()
    assert [(p.config.search.scorer, dict(p.config.search.scorer_options)) for p in points] == [
        ("gem-miner", {"lam": 0.001, "prune_every": 1}),
        ("gem-miner", {"lam": 0.001, "prune_every": 3})]
    # a rule name swept over keeps the options set for every point
    path.write_text('[set]\nsearch.scorer.every = 2\n[axes]\nsearch.scorer.name = '
                    '["iterand", "edge-popup"]\n')
    iterand, popup = load_sweep(path).points()
    assert dict(iterand.config.search.scorer_options)["every"] == 2
    assert popup.config is None  # skipped and listed: edge-popup has no such option
    assert "unknown option search.scorer.every for scorer 'edge-popup'" in popup.skipped


def test_signed_supermask_gradient_is_straight_through() -> None:
    net, _ = net_for("signed-supermask")
    layer = net.searched_layers[0]
    m = net.scorer.masks([layer], Budget("layer", (net.budget.layer_k[0],), 0), True)[0]
    (m * torch.arange(m.numel(), dtype=m.dtype)).sum().backward()
    assert torch.equal(layer.scores.grad, torch.arange(m.numel(), dtype=m.dtype))


def example_plugin(root: Path) -> Path:
    """The plug-in exactly as docs/scorers.md shows it, as a package folder."""
    doc = (REPO / "docs" / "scorers.md").read_text()
    toml = re.search(r"`pyproject.toml`:\n\n```toml\n(.*?)```", doc, re.S).group(1)
    code = re.search(r"`weighted_popup.py`:\n\n```python\n(.*?)```", doc, re.S).group(1)
    pkg = root / "slt-weighted-popup"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(
        toml + '\n[build-system]\nrequires = ["setuptools"]\n'
        'build-backend = "setuptools.build_meta"\n\n[tool.setuptools]\n'
        'py-modules = ["weighted_popup"]\n')
    (pkg / "weighted_popup.py").write_text(code)
    return pkg


@pytest.mark.slow
def test_a_third_party_rule_installs_and_runs(tmp_path) -> None:
    pkg = example_plugin(tmp_path)
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-w", str(dist), str(pkg)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("slt_weighted_popup-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith("entry_points.txt") for n in names)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                              "--no-index", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {"PYTHONPATH": f"{site}:{REPO}", "PATH": "/usr/bin:/bin"}

    def slt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "slt.cli", *args], capture_output=True,
                              text=True, timeout=300, env=env, cwd=tmp_path)

    listed = slt("scorers")
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith("weighted-popup"))
    assert "top-k edges by |score| * |weight|^power" in line
    assert "[options: power=1.0]" in line and "(from slt-weighted-popup)" in line
    sets = [a for o in TINY for a in ("--set", o)]
    run = slt("search", "--out", "runs", *sets, "--set", "search.scorer=weighted-popup",
              "--set", "search.scorer.power=0.5", "--config", str(REPO / "configs/quick.toml"))
    assert run.returncode == 0, run.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    # the header, read raw: this process does not have the plug-in installed
    raw = (run_dir / "ticket.slt").read_bytes()
    start = len(ticket.MAGIC) + 8
    header = json.loads(raw[start:start + int.from_bytes(raw[len(ticket.MAGIC):start],
                                                          "little")])
    assert header["config"]["search"]["scorer"] == {"name": "weighted-popup", "power": 0.5}
    assert header["densities"]["n_ticket"] == sum(row["n_ticket"] for row in header["layers"])
    evaluated = slt("eval", str(run_dir / "ticket.slt"))
    assert evaluated.returncode == 0 and "(run recorded" in evaluated.stdout
    assert "same)" in evaluated.stdout
    bad = slt("search", "--out", "runs", *sets, "--set", "search.scorer=weighted-popup",
              "--set", "search.scorer.power=-1", "--config", str(REPO / "configs/quick.toml"))
    assert bad.returncode == 2
    assert bad.stderr.strip() == "slt: error: search.scorer.power must be >= 0"


# Every rule slt ships (plug-ins, listed with an origin, are their authors' business).
SHIPPED = sorted(n for n in SCORERS.names() if n not in SCORERS.origins)


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("scorer", SHIPPED)
def test_every_shipped_rule_learns_with_its_defaults(tmp_path, shared_data, scorer: str) -> None:
    """The one-epoch MNIST search of docs/scorers.md with nothing but the rule's name: every
    rule, with its own defaults and declared optimizer settings, must clearly beat chance
    (10 classes: 10%; asserted > 50%, edge-popup reaches 95%, bernoulli 72%). Full MNIST,
    not a slice: one epoch takes a few seconds per rule on 2 CPU cores."""
    cfg = resolve.load("mnist_lenet.toml", [
        f"data.root={shared_data}", "search.epochs=1", "source.density=0.5",
        "search.ticket_density=0.25", f"search.scorer={scorer}", "run.progress=false"])
    assert cfg.search.lr == (10.0 if scorer == "bernoulli" else 0.1)
    result = run_search(cfg, tmp_path, log=lambda _: None)
    assert result.summary["final_test_acc"] > 0.5, (scorer, result.summary["final_test_acc"])


def test_the_seven_rules_are_shipped() -> None:
    assert set(SHIPPED) >= {"edge-popup", "global-edge-popup", "biprop", "gem-miner",
                            "iterand", "bernoulli", "signed-supermask"}
