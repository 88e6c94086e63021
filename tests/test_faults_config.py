"""Config mistakes that must be one clear error, not a silent choice: both spellings of the
ticket size in one table of settings, and a scoring rule declaring optimizer settings slt
does not have."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from slt import config, resolve
from slt.cli import main
from slt.errors import ConfigError
from slt.scorers import SCORERS
from slt.scorers.edge_popup import EdgePopup
from slt.scorers.lookup import create_scorer
from tests.conftest import TINY

BOTH = ("--set: search.keep and search.ticket_density both given; they are two spellings "
        "of the ticket size, give exactly one")


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.mark.parametrize("order", [("search.keep=0.5", "search.ticket_density=0.1"),
                                   ("search.ticket_density=0.1", "search.keep=0.5")])
def test_both_ticket_sizes_on_one_command_line(order) -> None:
    with pytest.raises(ConfigError) as info:
        resolve.load(None, list(order))
    assert str(info.value) == BOTH
    with pytest.raises(ConfigError, match="both given"):  # whatever the file holds
        resolve.load("mnist_lenet.toml", list(order))


def test_one_set_replaces_the_files_spelling(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[source]\ndensity = 0.5\n[search]\nticket_density = 0.1\n")
    cfg = resolve.load(path, ["search.keep=0.5"])
    assert (cfg.search.keep, cfg.search.ticket_density, cfg.ticket_density) == (0.5, None, 0.25)
    path.write_text("[source]\ndensity = 0.5\n[search]\nkeep = 0.5\n")
    cfg = resolve.load(path, ["search.ticket_density=0.1"])
    assert (cfg.search.keep, cfg.search.ticket_density, cfg.keep) == (None, 0.1, 0.2)
    # the same key twice is no conflict: the last one wins, as for any key
    assert resolve.load(path, ["search.keep=0.2", "search.keep=0.3"]).search.keep == 0.3


def test_check_alternatives_for_a_table_of_settings() -> None:
    config.check_alternatives(["search.keep", "source.density"], "s.toml [set]")
    config.check_alternatives(iter(["search.ticket_density"]), "s.toml [axes]")
    with pytest.raises(ConfigError) as info:
        config.check_alternatives({"search.ticket_density": [0.1], "search.keep": [0.5]},
                                  "s.toml [axes]")
    assert str(info.value) == ("s.toml [axes]: search.keep and search.ticket_density both "
                               "given; they are two spellings of the ticket size, give "
                               "exactly one")


def test_every_command_that_takes_set_refuses_both(tmp_path, capsys) -> None:
    both = sets("search.keep=0.5", "search.ticket_density=0.1")
    assert main(["search", "--config", "quick.toml", "--out", str(tmp_path / "runs"),
                 *sets(*TINY), *both]) == 2
    assert capsys.readouterr().err == f"slt: error: {BOTH}\n"
    assert not (tmp_path / "runs").exists()  # nothing written
    assert main(["config", "show", "--config", "quick.toml", *both]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"slt: error: {BOTH}\n" and captured.out == ""
    assert main(["search", "--config", "quick.toml", "--out", str(tmp_path / "runs"),
                 *sets(*TINY)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    assert main(["eval", str(run_dir / "ticket.slt"), *both]) == 2
    assert capsys.readouterr().err == f"slt: error: {BOTH}\n"


# --- rules declaring optimizer settings -----------------------------------------------------


def rule(name: str, declared: Any) -> type:
    class Declaring(EdgePopup):
        optimizer: ClassVar[Any] = declared

    Declaring.name = name
    return Declaring


@pytest.mark.parametrize(("declared", "message"), [
    ({"lrr": 1.0}, "scorer 'odd' declares optimizer setting 'lrr' (did you mean 'lr'?); a rule "
                   "may declare search.lr, search.momentum, search.weight_decay, "
                   "search.nesterov, search.warmup_epochs"),
    ({"epochs": 3}, "scorer 'odd' declares optimizer setting 'epochs'"),
    ({"lr": "fast"}, "scorer 'odd' declares search.lr: expected float, got 'fast'"),
    ({"lr": -1.0}, "scorer 'odd' declares an impossible setting: search.lr must be positive, "
                   "got -1.0"),
    ({"momentum": 1.5}, "search.momentum must be in [0, 1), got 1.5"),
    ({"lr": float("inf")}, "scorer 'odd' declares search.lr = inf: not finite"),
    ([("lr", 1.0)], "scorer 'odd': optimizer must be a dict of search.* settings"),
])
def test_a_bad_declaration_makes_only_that_rule_unusable(monkeypatch, capsys, declared,
                                                         message) -> None:
    monkeypatch.setitem(SCORERS._items, "odd", rule("odd", declared))
    with pytest.raises(ConfigError) as info:
        resolve.load(None, ["search.scorer=odd"])
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        create_scorer("odd")
    assert resolve.load(None, ["search.scorer=biprop"]).search.lr == 0.1  # others unharmed
    assert main(["scorers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (line,) = [x for x in lines if x.startswith("odd ")]
    assert "unusable: " in line and message in line
    assert any(x.startswith("bernoulli ") and "[optimizer: lr=10, weight_decay=0]" in x
               for x in lines)


def test_a_good_declaration_is_typed_and_applied(monkeypatch, capsys) -> None:
    monkeypatch.setitem(SCORERS._items, "slow-popup",
                        rule("slow-popup", {"lr": 1, "nesterov": True, "warmup_epochs": 2}))
    cfg = resolve.load(None, ["search.scorer=slow-popup"])
    assert (cfg.search.lr, cfg.search.nesterov, cfg.search.warmup_epochs) == (1.0, True, 2.0)
    assert isinstance(cfg.search.lr, float)
    assert main(["config", "show", "--set", "search.scorer=slow-popup",
                 "--set", "search.nesterov=false"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "lr = 1.0  # from scorer slow-popup (slt scorers)" in lines
    assert "warmup_epochs = 2.0  # from scorer slow-popup (slt scorers)" in lines
    assert "nesterov = false" in lines
    assert main(["scorers"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("slow-popup")]
    assert line.endswith("[optimizer: lr=1, nesterov=True, warmup_epochs=2]")
    # a declared value the run cannot take is the config's mistake, named as usual
    with pytest.raises(ConfigError, match=r"search.warmup_epochs \(2.0\) exceeds search.epochs"):
        resolve.load(None, ["search.scorer=slow-popup", "search.epochs=1"])


def test_a_sweep_table_or_command_line_with_both_spellings_is_one_line(tmp_path, capsys):
    base = [o for o in TINY if not o.startswith("search.ticket_density")]
    body = "".join(f"{k} = {v if v[:1] in '[0123456789tf' else repr(v)}\n"
                   for k, v in (o.split("=", 1) for o in base))
    out = tmp_path / "runs"
    for table, rest in (("[set]\nsearch.keep = 0.5\nsearch.ticket_density = 0.1\n" + body,
                         "[axes]\nrun.seed = [0, 1]\n"),
                        ("[set]\n" + body, "[axes]\nsearch.keep = [0.5]\n"
                         "search.ticket_density = [0.1]\n")):
        path = tmp_path / "grid.toml"
        path.write_text(table + rest)
        assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        where = "[set]" if "keep = 0.5\n" in table else "[axes]"
        assert err == [f"slt: error: {path} {where}: search.keep and search.ticket_density "
                       "both given; they are two spellings of the ticket size, give exactly one"]
    path.write_text("[set]\n" + body + "[axes]\nrun.seed = [0]\n")
    assert main(["sweep", str(path), "--out", str(out), "--no-progress",
                 *sets("search.keep=0.5", "search.ticket_density=0.1")]) == 2
    assert capsys.readouterr().err.strip() == f"slt: error: {BOTH}"
    assert not out.exists()  # nothing written
