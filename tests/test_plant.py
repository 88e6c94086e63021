"""Planted tickets: the teacher written into the student's frozen weights (exactly), the
source drawn with or without it, and the records of what a search recovered."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

import slt
from slt.config.schema import Config
from slt.data.datasets import Teacher, planted_teacher_task
from slt.errors import ConfigError
from slt.network import build_network
from slt.plant import plant_record, planted_in_source
from slt.spec import DataSpec

PLANT = {
    "data": {"name": "planted_teacher", "input_dim": 12, "teacher_hidden": 6,
             "teacher_depth": 2, "teacher_bias": False, "num_classes": 4,
             "train_size": 512, "test_size": 1024},
    "model": {"name": "mlp", "hidden": [20, 16], "init": "signed_constant"},
    "plant": {"enabled": True, "seed": 3},
    "search": {"keep": 0.5, "epochs": 1, "batch_size": 64},
    "run": {"progress": False, "device": "cpu"},
}


def config(**sets: Any) -> Config:
    return slt.load_config(PLANT, overrides=sets)


def network(cfg: Config):
    return build_network(cfg, DataSpec((cfg.data.input_dim,), cfg.data.num_classes))


def sources(net) -> list[torch.Tensor]:
    return [layer.src_idx for layer in net.searched_layers]


def restrict_to_plant(net) -> None:
    net.fix_masks(planted_in_source(sources(net), net.plant))
    net.eval()


def test_student_restricted_to_the_plant_computes_the_teacher_exactly(monkeypatch) -> None:
    """Integer teacher weights and integer inputs make every sum exact in float32, whatever
    order the matrix products add in: the student on the planted edges alone must give the
    teacher's logits bit for bit, through the whole build (weights, map, source)."""
    g = torch.Generator().manual_seed(0)
    weights = tuple(torch.randint(-3, 4, shape, generator=g).double()
                    for shape in ((6, 12), (6, 6), (4, 6)))
    teacher = Teacher(weights, torch.zeros(()), torch.ones(()))
    monkeypatch.setattr("slt.plant.planted_teacher_task", lambda data: (None, teacher))
    net = network(config())
    restrict_to_plant(net)
    x = torch.randint(-2, 3, (256, 12), generator=g).float()
    with torch.no_grad():
        student = net.apply_body(x)
    # each layer's plant is scaled by a power of two (exact), the logits by their product
    scales = net.plant.scales
    assert len(scales) == 3 and all(math.log2(c) == round(math.log2(c)) for c in scales)
    assert torch.equal(student, teacher.logits(x).float() * net.plant.logit_scale)
    assert student.abs().max() > 0.5  # not all zeros: the teacher really computes something
    # the edges outside the plant are random and change the output: the plant is not trivial
    net.fixed = False
    with torch.no_grad():
        assert not torch.equal(net(x), student)


def test_the_real_teachers_plant_labels_its_data() -> None:
    cfg = config()
    net = network(cfg)
    splits, teacher = planted_teacher_task(cfg.data)
    # the planted weights are the teacher's, in float32, at mapped units
    first = net.searched_layers[0]
    assert net.plant is not None and net.plant.n_edges == 6 * 12 + 6 * 6 + 4 * 6
    full = first.expand(first.weight_src)
    rows = full.abs().sum(1).nonzero().squeeze(1)  # every student unit has random weights
    assert rows.numel() == 20
    # the planted weights are as large as the random ones around them (within a factor 2)
    for layer, pos in zip(net.searched_layers, net.plant.positions):
        w = layer.expand(layer.weight_src).reshape(-1)
        planted, rest = w[pos].abs().mean(), w[~torch.isin(torch.arange(w.numel()), pos)]
        assert 0.5 < float(planted / rest.abs().mean()) < 2.0
    restrict_to_plant(net)
    with torch.no_grad():
        logits = net.apply_body(splits.test_x)
    expected = teacher.logits(splits.test_x) * net.plant.logit_scale
    assert torch.allclose(logits.double(), expected, atol=1e-5 * net.plant.logit_scale)
    agree = (logits.argmax(1) == splits.test_y).float().mean()
    assert agree > 0.995


def test_plant_in_source_forces_every_planted_edge_in_and_keeps_counts() -> None:
    free = network(config(**{"source.density": 0.5}))
    held = network(config(**{"source.density": 0.5, "plant.in_source": True}))
    plain = network(config(**{"source.density": 0.5, "plant.enabled": False, "plant.seed": 0}))
    for f, h, p, pos in zip(free.searched_layers, held.searched_layers,
                            plain.searched_layers, held.plant.positions):
        assert h.n_source == f.n_source == p.n_source  # the scheme's exact counts
        assert bool(torch.isin(pos, h.src_idx).all())
        assert torch.equal(f.src_idx, p.src_idx)  # in_source = false: drawn as always
    survived = sum(int(m.sum()) for m in planted_in_source(sources(free), free.plant))
    assert 0.3 * free.plant.n_edges < survived < 0.7 * free.plant.n_edges
    # nested: the source at 0.4 is inside the one at 0.5, and holds the plant too
    thin = network(config(**{"source.density": 0.4, "plant.in_source": True}))
    for a, b, pos in zip(thin.searched_layers, held.searched_layers, thin.plant.positions):
        assert bool(torch.isin(a.src_idx, b.src_idx).all())
        assert bool(torch.isin(pos, a.src_idx).all())
    # the weights are the same with and without the plant outside the planted edges
    for f, p, pos in zip(free.searched_layers, plain.searched_layers, free.plant.positions):
        outside = ~torch.isin(f.src_idx, pos)
        assert torch.equal(f.weight_src[outside], p.weight_src[outside])


def test_size_ticket_keeps_the_plants_edge_count_per_layer() -> None:
    net = network(config(**{"plant.size_ticket": True, "plant.in_source": True,
                            "source.density": 0.5}))
    assert net.budget.layer_k == tuple(int(p.numel()) for p in net.plant.positions)
    assert net.budget.total_k == net.plant.n_edges == 132
    masks = net.ticket_masks()
    assert [int(m.sum()) for m in masks] == [72, 36, 24]
    # with the plant left to the draw the ticket still has the plant's size, not keep's
    free = network(config(**{"plant.size_ticket": True, "source.density": 0.5}))
    assert free.budget.layer_k == tuple(int(p.numel()) for p in free.plant.positions)


def test_recall_and_precision_of_a_ticket() -> None:
    net = network(config())
    src = sources(net)
    planted = planted_in_source(src, net.plant)
    names = [i.name for i in net.infos]
    exact = plant_record(names, src, planted, net.plant)
    assert exact["recall"] == exact["precision"] == exact["survival"] == 1.0
    assert exact["found"] == exact["planted"] == net.plant.n_edges
    # half of the first layer's plant, plus as many random edges
    first = planted[0].clone()
    on = first.nonzero().squeeze(1)
    first[on[: on.numel() // 2]] = False
    off = (~planted[0]).nonzero().squeeze(1)[: on.numel() - on.numel() // 2 + on.numel() // 2]
    first[off[: on.numel() // 2]] = True
    rec = plant_record(names, src, [first, *planted[1:]], net.plant)
    row = rec["layers"][0]
    assert row["found"] == on.numel() - on.numel() // 2
    assert row["recall"] == pytest.approx(row["found"] / 72)
    assert row["precision"] == pytest.approx(row["found"] / row["ticket"])
    assert rec["layers"][1]["recall"] == 1.0
    # chance: a ticket of k of the n source edges holds k * in / n planted ones on average
    assert row["chance_recall"] == pytest.approx(row["ticket"] * 72 / src[0].numel() / 72)
    # a sparse source: survival below 1, recall of all planted vs of those in the source
    thin = network(config(**{"source.density": 0.5}))
    tsrc = sources(thin)
    kept = planted_in_source(tsrc, thin.plant)
    part = plant_record(names, tsrc, kept, thin.plant)
    n_in = sum(int(k.sum()) for k in kept)
    assert part["survival"] == pytest.approx(n_in / 132) and part["survival"] < 1
    assert part["recall"] == pytest.approx(n_in / 132) and part["recall_in_source"] == 1.0
    assert part["precision"] == 1.0


@pytest.mark.parametrize("sets, words", [
    ({"data.name": "mnist"}, "needs data.name = 'planted_teacher'"),
    ({"model.name": "conv4"}, "needs model.name = 'mlp'"),
    ({"data.teacher_bias": True}, "data.teacher_bias = false"),
    ({"data.teacher_depth": 1}, "the teacher has 1 hidden layer(s)"),
    ({"model.last_layer_dense": True}, "needs every layer searched"),
    ({"plant.enabled": False, "plant.in_source": True}, "need plant.enabled = true"),
    ({"plant.enabled": False, "plant.seed": 4}, "need plant.enabled = true"),
])
def test_a_plant_the_run_cannot_hold_is_one_config_line(sets, words) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        config(**sets)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("rule", ["biprop", "iterand", "signed-supermask"])
def test_a_rule_that_changes_the_weights_cannot_hold_a_plant(rule) -> None:
    with pytest.raises(ConfigError, match=f"{rule} changes them"):
        network(config(**{"search.scorer": rule}))


def test_a_sized_ticket_ignores_the_ticket_density_in_run_id_name_and_checks() -> None:
    from slt.config.ids import legacy_run_id, run_id

    a = config(**{"plant.size_ticket": True})
    b = config(**{"plant.size_ticket": True, "search.keep": 0.0001})
    assert run_id(a) == run_id(b) and "-tplant-" in run_id(a)
    assert network(b).budget.layer_k == (72, 36, 24)  # keep 0.0001 would keep no edge
    # a planted run never takes an unplanted run's old (legacy) name, nor the reverse
    plain = config(**{"plant.enabled": False, "plant.seed": 0})
    assert legacy_run_id(config()) != legacy_run_id(plain)
    assert legacy_run_id(config(**{"plant.seed": 5})) != legacy_run_id(config())


def test_a_student_narrower_than_the_teacher_or_a_full_source_is_one_line() -> None:
    with pytest.raises(ConfigError, match="fewer than the teacher's 6"):
        network(config(**{"model.hidden": [20, 4]}))
    with pytest.raises(ConfigError, match="planted edges but its source holds only"):
        network(config(**{"source.density": 0.05, "plant.in_source": True}))


def test_a_search_records_the_plant_and_evaluates_it(tmp_path) -> None:
    result = slt.search(PLANT, overrides={"source.density": 0.5, "run.threads": 1},
                        out=tmp_path)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    plant = summary["plant"]
    assert plant["planted"] == 132 and 0 < plant["in_source"] < 132
    assert plant["survival"] == pytest.approx(plant["in_source"] / 132)
    assert [row["name"] for row in plant["layers"]] == ["1", "3", "5"]
    ticket = slt.load_ticket(result.run_dir / "ticket.slt")
    net = network(ticket.config)
    # recounted with sets over the full masks of the ticket file
    found = in_source = 0
    for tl, pos in zip(ticket.layers, net.plant.positions):
        plant_set = set(pos.tolist())
        in_source += len(plant_set & set(tl.source_mask.reshape(-1).nonzero()[:, 0].tolist()))
        found += len(plant_set & set(tl.mask.reshape(-1).nonzero()[:, 0].tolist()))
    assert (plant["found"], plant["in_source"]) == (found, in_source)
    assert plant["recall"] == pytest.approx(found / 132)
    # the plant restricted to the source, by hand: a plain ReLU MLP of the student's
    # weights, zero off the planted edges the source kept
    splits, _ = planted_teacher_task(ticket.config.data)
    h = splits.test_x
    for i, (tl, layer) in enumerate(zip(ticket.layers, net.searched_layers)):
        keep = torch.zeros(layer.numel, dtype=torch.bool)
        keep[net.plant.positions[i]] = True
        w = layer.expand(layer.weight_src) * (keep.view(layer.weight_shape) & tl.source_mask)
        h = h @ w.T if i == 2 else torch.relu(h @ w.T)
    acc = float((h.argmax(1) == splits.test_y).float().mean())
    assert plant["accuracy_in_source"] == pytest.approx(acc)
    assert acc < 0.99  # part of the plant's edges are gone


PLANT_SWEEP = """
base = "plant.toml"

[set]
data.train_size = 1024
data.test_size = 512
search.epochs = 1

[axes]
source.density = [1.0, 0.5]
plant.in_source = [false, true]
run.seed = [0, 1]
"""


def test_the_report_has_a_planted_section_from_the_summaries(tmp_path) -> None:
    """One dense run per seed serves both plant.in_source values; the planted table and
    the effective-density table are the summaries' figures, averaged over seeds; the plot
    and the CSV columns are written."""
    import csv

    from slt.analysis import fmt_pct
    from slt.reporting.write import write_report
    from slt.sweeps.grid import load_sweep
    from slt.sweeps.local import run_sweep

    path = tmp_path / "s.toml"
    path.write_text(PLANT_SWEEP)
    out = tmp_path / "runs"
    run_sweep(load_sweep(path), out, progress=False, log=lambda _: None)
    summaries = {}
    for run in sorted(out.glob("planted_teacher-*")):
        cfg = slt.load_config(run / "config.toml")
        summaries[(cfg.source.density, cfg.plant.in_source, cfg.run.seed)] = json.loads(
            (run / "summary.json").read_text())
    assert len(summaries) == 6  # 2 dense runs + 2 in_source values x 2 seeds at d = 0.5
    text = write_report(out, log=lambda _: None).read_text()
    assert "## Planted ticket" in text and "![planted ticket](planted.png)" in text
    held = [summaries[(0.5, True, s)]["plant"] for s in (0, 1)]
    assert all(p["survival"] == 1.0 and p["ticket"] == p["planted"] for p in held)
    free = [summaries[(0.5, False, s)]["plant"] for s in (0, 1)]
    row = (f"| plant in source=False | 0.5 | {fmt_pct([p['survival'] for p in free])} | "
           f"{fmt_pct([p['recall'] for p in free])} |")
    assert row in text
    dense = [v for (d, _, _), v in summaries.items() if d == 1.0]
    assert all(d["plant"]["survival"] == 1.0 for d in dense)
    assert all(d["plant"]["accuracy_in_source"] > 0.99 for d in dense)
    assert "## Effective vs nominal ticket density" in text
    assert (out / "report" / "planted.png").stat().st_size > 10_000
    with open(out / "report" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    by_id = {r["run_id"]: r for r in rows}
    for run in out.glob("planted_teacher-*"):
        s = json.loads((run / "summary.json").read_text())
        assert float(by_id[run.name]["plant_recall"]) == pytest.approx(s["plant"]["recall"])
        assert float(by_id[run.name]["effective_density"]) == pytest.approx(
            s["effective_density"])


def test_a_trace_that_fails_costs_the_run_nothing(tmp_path, monkeypatch, capsys) -> None:
    """The effective-density trace runs after the ticket is saved: if it fails (a model it
    cannot take), the run still writes its summary, with the reason, and `slt eval` says
    it in one line."""
    from slt.cli import main

    def refuse(*args, **kwargs):
        raise ValueError("max pooling with dilation 2 is not handled")

    monkeypatch.setattr("slt.engine.measure.effective_records", refuse)
    with pytest.warns(UserWarning, match="effective density not measured"):
        result = slt.search(PLANT, overrides={"run.threads": 1}, out=tmp_path)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["effective_error"] == "ValueError: max pooling with dilation 2 is not handled"
    assert "effective_density" not in summary and summary["plant"]["planted"] == 132
    with pytest.warns(UserWarning):
        assert main(["eval", str(result.run_dir / "ticket.slt")]) == 0
    out = capsys.readouterr().out
    assert "effective density not measured: ValueError: max pooling" in out
    assert "(run recorded" in out and "same" in out
