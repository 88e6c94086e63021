"""Config loading, overrides, validation messages, hashing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slt import config, resolve
from slt.errors import ConfigError


def test_default_ticket_size_is_edge_popups_half() -> None:
    cfg = resolve.load()
    assert cfg.search.keep == 0.5 and cfg.search.ticket_density is None
    assert resolve.load(None, ["search.ticket_density=0.2"]).search.keep is None


def test_overrides_are_typed_by_field() -> None:
    cfg = resolve.load(None, ["search.keep=0.5", "source.density=1", "model.hidden=[10, 20]",
                             "model.first_layer_dense=true", "data.name=planted_teacher",
                             "search.epochs=3", "model.init=signed_constant"])
    assert cfg.source.density == 1.0 and isinstance(cfg.source.density, float)
    assert cfg.model.hidden == (10, 20)
    assert cfg.model.first_layer_dense is True
    assert cfg.search.epochs == 3
    assert cfg.model.init == "signed_constant"


def test_keep_and_ticket_density_derive_each_other() -> None:
    a = resolve.load(None, ["source.density=0.2", "search.ticket_density=0.1"])
    b = resolve.load(None, ["source.density=0.2", "search.keep=0.5"])
    assert a.keep == pytest.approx(0.5) and b.ticket_density == pytest.approx(0.1)
    assert config.config_hash(a) == config.config_hash(b)


def test_set_on_command_line_replaces_the_other_spelling(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[search]\nkeep = 0.5\n")
    cfg = resolve.load(path, ["search.ticket_density=0.3"])
    assert cfg.search.keep is None and cfg.search.ticket_density == 0.3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.kep=0.5"], "unknown key search.kep (did you mean 'keep'?)"),
        (["serch.keep=0.5"],
         "unknown section 'serch' in --set serch.keep (did you mean 'search'?)"),
        (["search.keep=0.5", "search.epochs=ten"], "search.epochs: expected int, got 'ten'"),
        (["search.keep=0.5", "source.density=1.5"], "source.density must be in (0, 1], got 1.5"),
        (["search.keep=0.5", "source.density=0"], "source.density must be in (0, 1], got 0.0"),
        (["source.density=0.2", "search.ticket_density=0.3"],
         "search.ticket_density (0.3) cannot exceed source.density (0.2)"),
        (["search.keep=0.5", "model.name=resnet19"], "unknown model 'resnet19' (did you mean"),
        (["search.keep=0.5", "source.scheme=ekr"], "unknown layerwise scheme 'ekr' (did you mean"),
        (["search.keep=0.5", "search.scope=glob"], "search.scope must be one of layer, global"),
        (["search.keep=0.5", "model.init=kaiming"], "unknown weight init 'kaiming'"),
        (["search.keep=0.5", "data.name=mnsit"], "unknown dataset 'mnsit' (did you mean 'mnist'?)"),
        (["search.keep=0.5", "search.keep=0.5", "source.scheme=custom"],
         "source.scheme = 'custom' needs source.layer_densities"),
        (["search.keep=0.5", "model.width=0"], "model.width must be positive"),
        (["search.keep=0.5", "search.scorer=edgepopup"], "unknown scorer 'edgepopup'"),
        (["search.keep"], "--set expects section.key=value"),
        (["search.lr=nan"], "search.lr must be a finite number, got nan"),
        (["model.width=inf"], "model.width must be a finite number, got inf"),
        (["source.scheme=custom", "source.layer_densities=[0.5]", "search.ticket_density=0.1"],
         "give search.keep"),
    ],
)
def test_each_mistake_is_one_clear_line(overrides, message) -> None:
    with pytest.raises(ConfigError) as info:
        resolve.load(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_unknown_key_in_file(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[source]\ndensty = 0.5\n")
    expected = r"unknown key source.densty \(did you mean 'density'\?\)"
    with pytest.raises(ConfigError, match=expected):
        resolve.load(path)


def test_both_ticket_sizes_in_a_file(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[search]\nkeep = 0.5\nticket_density = 0.1\n")
    with pytest.raises(ConfigError, match="give exactly one of search.keep and search.ticket_"):
        resolve.load(path)


def test_bad_toml(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[source\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve.load(path)


def test_packaged_configs_load_by_name() -> None:
    for name in ("quick.toml", "mnist_lenet.toml", "cifar10_conv4.toml"):
        cfg = resolve.load(name)
        assert 0 < cfg.ticket_density <= cfg.source.density


def test_toml_round_trip_and_hash(tmp_path) -> None:
    cfg = resolve.load("mnist_lenet.toml", ["source.scheme=erk", "source.density=0.5"])
    path = tmp_path / "resolved.toml"
    path.write_text(config.to_toml(cfg))
    again = resolve.load(path)
    assert again == cfg
    assert config.run_id(again) == config.run_id(cfg)
    other = resolve.load("mnist_lenet.toml", ["source.scheme=erk", "source.density=0.4"])
    assert config.config_hash(other) != config.config_hash(cfg)
    moved = resolve.load("mnist_lenet.toml", ["source.scheme=erk", "source.density=0.5",
                                             "data.root=/elsewhere", "run.device=cpu"])
    assert config.config_hash(moved) == config.config_hash(cfg)  # where it runs is not hashed


def test_data_root_defaults_to_env(monkeypatch) -> None:
    monkeypatch.setenv("SLT_DATA", "/some/where")
    assert resolve.load(None, ["search.keep=0.5"]).data.root == "/some/where"
    monkeypatch.delenv("SLT_DATA")
    assert resolve.load(None, ["search.keep=0.5"]).data.root == "./data"


# --- settings a scoring rule declares (Scorer.optimizer) -----------------------------------


def test_rule_settings_fill_what_the_user_leaves_unset(tmp_path) -> None:
    from slt.scorers.bernoulli import Bernoulli

    assert Bernoulli.optimizer == {"lr": 10.0, "weight_decay": 0.0}
    plain = resolve.load(None, ["search.scorer=edge-popup"])
    assert (plain.search.lr, plain.search.weight_decay) == (0.1, 5e-4)  # slt's defaults
    rule = resolve.load(None, ["search.scorer=bernoulli"])
    assert (rule.search.lr, rule.search.weight_decay) == (10.0, 0.0)
    assert rule.search.momentum == 0.9  # not declared: slt's default
    # the user's --set wins over the rule
    assert resolve.load(None, ["search.scorer=bernoulli", "search.lr=2"]).search.lr == 2.0
    # so does the user's file, key by key
    path = tmp_path / "c.toml"
    path.write_text('[search]\nscorer = "bernoulli"\nweight_decay = 1e-4\n')
    from_file = resolve.load(path)
    assert (from_file.search.lr, from_file.search.weight_decay) == (10.0, 1e-4)
    # a rule named in a [search.scorer] table declares the same
    path.write_text('[search.scorer]\nname = "bernoulli"\n')
    assert resolve.load(path).search.lr == 10.0


def test_rule_settings_are_stored_and_hashed(tmp_path) -> None:
    rule = resolve.load(None, ["search.scorer=bernoulli"])
    spelled = resolve.load(None, ["search.scorer=bernoulli", "search.lr=10",
                                 "search.weight_decay=0"])
    assert rule == spelled and config.run_id(rule) == config.run_id(spelled)
    other = resolve.load(None, ["search.scorer=bernoulli", "search.lr=0.1"])
    assert config.run_id(other) != config.run_id(rule)
    text = config.to_toml(rule)
    assert "lr = 10.0\n" in text and "weight_decay = 0.0\n" in text
    path = tmp_path / "resolved.toml"
    path.write_text(text)
    again = resolve.load(path)
    assert again == rule and config.run_id(again) == config.run_id(rule)
    assert resolve.rule_settings(config.load_raw(path)) == {}  # stored: now the user's


def test_rule_settings_are_reported_by_source(tmp_path) -> None:
    raw = config.load_raw("quick.toml", ["search.scorer=bernoulli", "search.lr=3"])
    assert resolve.rule_settings(raw) == {"weight_decay": 0.0}
    assert resolve.rule_settings(config.load_raw("quick.toml")) == {}
    assert resolve.rule_settings(config.load_raw(None, ["search.scorer=nonesuch"])) == {}


def test_config_show_marks_values_from_the_rule(capsys) -> None:
    from slt.cli import main

    assert main(["config", "show", "--config", "quick.toml", "--set", "search.scorer=bernoulli",
                 "--set", "search.weight_decay=1e-4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "lr = 10.0  # from scorer bernoulli (slt scorers)" in lines
    assert "weight_decay = 0.0001" in lines  # the user's, no note
    assert main(["config", "show", "--config", "quick.toml"]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.1\n" in out and "from scorer" not in out


@pytest.mark.parametrize("name", ["quick.toml", "mnist_lenet.toml", "cifar10_conv4.toml"])
def test_shipped_configs_leave_declarable_settings_to_rules(name) -> None:
    raw = config.read_toml(name)
    assert not set(raw["search"]) & {"lr", "momentum"}
    # left out because they repeated slt's defaults: edge-popup computes (and names) the same
    cfg = resolve.load(name)
    spelled = resolve.load(name, ["search.lr=0.1", "search.momentum=0.9"])
    assert cfg == spelled and config.run_id(cfg) == config.run_id(spelled)
    assert resolve.load(name, ["search.scorer=bernoulli"]).search.lr == 10.0


def test_scorers_lists_declared_settings(capsys) -> None:
    from slt.cli import main

    assert main(["scorers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (line,) = [x for x in lines if x.startswith("bernoulli ")]
    assert line.endswith("[optimizer: lr=10, weight_decay=0]")
    assert not any("[optimizer:" in x for x in lines if not x.startswith("bernoulli "))


def test_sweep_points_get_the_rule_settings_unless_set(tmp_path) -> None:
    from slt.sweeps.grid import load_sweep

    path = tmp_path / "s.toml"
    path.write_text('base = "quick.toml"\n[axes]\nsearch.scorer = ["edge-popup", "bernoulli"]\n')
    popup, bern = load_sweep(path).points()
    assert (popup.config.search.lr, bern.config.search.lr) == (0.1, 10.0)
    path.write_text('base = "quick.toml"\n[set]\nsearch.lr = 0.5\n'
                    '[axes]\nsearch.scorer = ["edge-popup", "bernoulli"]\n')
    popup, bern = load_sweep(path).points()
    assert (popup.config.search.lr, bern.config.search.lr) == (0.5, 0.5)
    assert bern.config.search.weight_decay == 0.0


def test_config_module_imports_no_other_part_of_slt() -> None:
    """A run's config reads back with nothing of slt loaded but the config and its errors:
    no registry, so no plug-in, is needed to read it."""
    code = ("import sys, slt.config\n"
            "print(sorted(m for m in sys.modules if m == 'slt' or m.startswith('slt.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == ("['slt', 'slt.config', 'slt.config.checks', 'slt.config.ids', "
                           "'slt.config.schema', 'slt.config.toml', 'slt.errors']")


def test_a_stored_config_reads_without_its_rule_and_resolving_names_it(tmp_path) -> None:
    raw = resolve.load(None, ["search.scorer=bernoulli"]).to_dict()
    raw["search"]["scorer"] = {"name": "not-installed-here", "width": 3}
    cfg = config.from_dict(raw, "config.toml")
    assert cfg.search.scorer == "not-installed-here"
    assert cfg.search.scorer_options == (("width", 3),)
    assert cfg.search.lr == 10.0  # the stored value, not a default
    with pytest.raises(ConfigError, match="unknown scorer 'not-installed-here'"):
        resolve.resolve(raw, "config.toml")
