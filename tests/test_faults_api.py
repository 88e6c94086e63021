"""The API fails the way the CLI does (issue 17, class 3), and data that does not fit a
ticket's model is one line (class 4): every public function checks its arguments and raises
an SltError subclass with one line naming the argument; numpy and torch scalars are numbers;
None for a key is a key not given; slt.sweep without a main guard says so."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import slt
from slt import export as ex
from slt.config.ids import run_id
from slt.errors import ConfigError, DataError, ExportError, StorageError
from tests.conftest import REPO, TINY
from tests.test_sweeps_local import TINY_SET

SLT = [sys.executable, "-m", "slt.cli"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def ticket_path(tmp_path_factory) -> Path:
    """A tiny planted-teacher ticket (8 inputs, 3 classes), found once for the module."""
    out = tmp_path_factory.mktemp("runs")
    result = slt.search("quick.toml", overrides=[*TINY, "search.epochs=1"], out=out, log=None)
    return result.run_dir / "ticket.slt"


@pytest.fixture(scope="module")
def ticket(ticket_path):
    return slt.load_ticket(ticket_path)


def one_line(exc: pytest.ExceptionInfo, *names: str) -> str:
    """The message, checked to be one line naming every one of `names`."""
    text = str(exc.value)
    assert len(text.splitlines()) == 1 and text.strip() == text, text
    for name in names:
        assert name in text, (name, text)
    return text


# --- wrong types and values: one ConfigError line naming the argument ----------------------

BAD_CALLS = [
    ("load_config(123)", lambda t, p: slt.load_config(123), ["config", "int 123"]),
    ("load_config(Ticket)", lambda t, p: slt.load_config(t), ["config", "ticket.config"]),
    ("load_config(bytes)", lambda t, p: slt.load_config(b"quick.toml"), ["config", "bytes"]),
    ("overrides=5", lambda t, p: slt.load_config("quick.toml", 5), ["overrides", "int 5"]),
    ("overrides=[1]", lambda t, p: slt.load_config("quick.toml", [1]), ["overrides", "int 1"]),
    ("overrides={1: ..}", lambda t, p: slt.load_config("quick.toml", {1: 0.2}),
     ["overrides", "key"]),
    ("overrides object", lambda t, p: slt.load_config("quick.toml", {"run.seed": object()}),
     ["overrides['run.seed']", "not a config value"]),
    ("dict config {1: {}}", lambda t, p: slt.load_config({1: {}}), ["section name", "int 1"]),
    ("search(123)", lambda t, p: slt.search(123, log=None), ["config", "int 123"]),
    ("search(out=123)", lambda t, p: slt.search("quick.toml", out=123), ["out", "int 123"]),
    ("search(embed_weights='yes')",
     lambda t, p: slt.search("quick.toml", embed_weights="yes"), ["embed_weights", "'yes'"]),
    ("search(progress='no')", lambda t, p: slt.search("quick.toml", progress="no"),
     ["progress", "'no'"]),
    ("search(log=5)", lambda t, p: slt.search("quick.toml", log=5), ["log", "int 5"]),
    ("load_ticket(123)", lambda t, p: slt.load_ticket(123), ["path", "int 123"]),
    ("load_ticket(None)", lambda t, p: slt.load_ticket(None), ["path", "None"]),
    ("load_ticket(Ticket)", lambda t, p: slt.load_ticket(t), ["path", "Ticket"]),
    ("evaluate(None)", lambda t, p: slt.evaluate(None), ["ticket", "None"]),
    ("evaluate(123)", lambda t, p: slt.evaluate(123), ["ticket", "int 123"]),
    ("evaluate(data=123)", lambda t, p: slt.evaluate(t, 123), ["data", "int 123"]),
    ("evaluate(device='gpu')", lambda t, p: slt.evaluate(t, device="gpu"),
     ["device", "'gpu'", "did you mean 'cpu'"]),
    ("evaluate(device=3)", lambda t, p: slt.evaluate(t, device=3), ["device", "int 3"]),
    ("evaluate(overrides=7)", lambda t, p: slt.evaluate(t, overrides=7), ["overrides"]),
    ("to_module(device='gpu')", lambda t, p: t.to_module(device="gpu"), ["device", "'gpu'"]),
    ("to_module(device=3.5)", lambda t, p: t.to_module(device=3.5), ["device", "3.5"]),
    ("export.to_module(path)", lambda t, p: ex.to_module(str(p)),
     ["ticket", "slt.load_ticket"]),
    ("state_dict_bytes(path)", lambda t, p: ex.state_dict_bytes(p, False),
     ["ticket", "slt.load_ticket"]),
    ("state_dict_bytes(sparse='no')", lambda t, p: ex.state_dict_bytes(t, "no"),
     ["sparse", "'no'"]),
    ("prune_bytes(None)", lambda t, p: ex.prune_bytes(None, False), ["ticket", "None"]),
    ("onnx_bytes(path)", lambda t, p: ex.onnx_bytes(str(p), False), ["ticket"]),
    ("export(path, ...)", lambda t, p: ex.export(str(p), p.parent / "x.pt", "state_dict"),
     ["ticket", "slt.load_ticket"]),
    ("load_state_dict(123)", lambda t, p: ex.load_state_dict(123), ["path", "int 123"]),
    ("load_state_dict(Ticket)", lambda t, p: ex.load_state_dict(t), ["path", "Ticket"]),
    ("sweep(workers='2')", lambda t, p: slt.sweep("demo_sweep.toml", workers="2"),
     ["workers", "str '2'"]),
    ("sweep(workers=1.5)", lambda t, p: slt.sweep("demo_sweep.toml", workers=1.5),
     ["workers", "1.5"]),
    ("sweep(workers=True)", lambda t, p: slt.sweep("demo_sweep.toml", workers=True),
     ["workers", "bool True"]),
    ("sweep(workers=0)", lambda t, p: slt.sweep("demo_sweep.toml", workers=0),
     ["workers must be at least 1, got 0"]),
    ("sweep(Ticket)", lambda t, p: slt.sweep(t), ["sweep_file", "Ticket"]),
    ("sweep(out=123)", lambda t, p: slt.sweep("demo_sweep.toml", out=123), ["out", "int 123"]),
    ("sweep(report='no')", lambda t, p: slt.sweep("demo_sweep.toml", report="no"),
     ["report", "'no'"]),
    ("report(123)", lambda t, p: slt.report(123), ["runs", "int 123"]),
    ("report(None)", lambda t, p: slt.report(None), ["runs", "None"]),
    ("report(Ticket)", lambda t, p: slt.report(t), ["runs", "Ticket"]),
    ("report(out=123)", lambda t, p: slt.report(p.parent, out=123), ["out", "int 123"]),
    ("report(evaluate_survival='no')",
     lambda t, p: slt.report(p.parent, evaluate_survival="no"), ["evaluate_survival"]),
]


@pytest.mark.parametrize("call,names", [(c, n) for _, c, n in BAD_CALLS],
                         ids=[i for i, _, _ in BAD_CALLS])
def test_a_wrong_argument_is_one_config_error_line_naming_it(ticket, ticket_path, tmp_path,
                                                             call, names) -> None:
    before = sorted(ticket_path.parent.iterdir())
    cwd = os.getcwd()
    os.chdir(tmp_path)  # anything a call wrongly wrote would land here
    try:
        with pytest.raises(ConfigError) as exc:
            call(ticket, ticket_path)
    finally:
        os.chdir(cwd)
    one_line(exc, *names)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    assert sorted(ticket_path.parent.iterdir()) == before


@NO_CUDA
def test_cuda_without_cuda_is_one_line_in_the_api_and_the_cli(ticket, ticket_path) -> None:
    for call in (lambda: ticket.to_module(device="cuda"),
                 lambda: slt.evaluate(ticket, device="cuda"),
                 lambda: ex.to_module(ticket, torch.device("cuda"))):
        with pytest.raises(ConfigError) as exc:
            call()
        one_line(exc, "device 'cuda'", "no CUDA device")
    proc = subprocess.run([*SLT, "eval", str(ticket_path), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("slt: error: ") and "no CUDA device" in proc.stderr


def test_good_arguments_still_work(ticket, ticket_path, tmp_path) -> None:
    assert isinstance(ticket.to_module(device="cpu"), torch.nn.Module)
    assert isinstance(ticket.to_module(device=torch.device("cpu")), torch.nn.Module)
    assert next(ticket.to_module(device="auto").parameters()).device.type in ("cpu", "cuda")
    by_path = slt.evaluate(ticket_path, device="cpu")
    by_ticket = slt.evaluate(ticket, device=torch.device("cpu"))
    assert by_path.test_acc == by_ticket.test_acc == ticket.metrics["test_acc"]
    out = tmp_path / "state.pt"
    size = ex.export(ticket, out, "state_dict", sparse=np.bool_(True))
    assert size == out.stat().st_size
    assert set(ex.load_state_dict(out)) == set(ticket.to_module().state_dict())


def test_load_state_dict_of_a_file_that_is_not_one(ticket_path, tmp_path) -> None:
    with pytest.raises(ExportError) as exc:
        ex.load_state_dict(ticket_path)
    one_line(exc, str(ticket_path), "not a state dict written by slt export")
    with pytest.raises(StorageError) as exc:
        ex.load_state_dict(tmp_path / "missing.pt")
    one_line(exc, "missing.pt", "No such file")
    sparse = tmp_path / "sparse.pt"
    torch.save({"slt_sparse": 1, "state_dict": {}}, sparse)
    with pytest.raises(ExportError) as exc:
        ex.load_state_dict(sparse)
    one_line(exc, "'shapes'")


# --- numpy and torch scalars are numbers; None is a key not given --------------------------

DENSITY_02 = [np.float64(0.2), np.float32(0.2), np.float16(0.2), torch.tensor(0.2),
              torch.tensor(0.2, dtype=torch.float64), np.linspace(0.1, 0.5, 5)[1],
              np.array(0.2, dtype=np.float32)]


@pytest.mark.parametrize("density", DENSITY_02, ids=lambda v: repr(v))
def test_numpy_and_torch_values_get_the_run_id_of_the_plain_float(density) -> None:
    plain = slt.load_config("quick.toml", {"source.density": 0.2, "search.ticket_density": 0.1})
    by_map = slt.load_config("quick.toml", {"source.density": density,
                                            "search.ticket_density": 0.1})
    by_dict = slt.load_config({"source": {"density": density},
                               "search": {"ticket_density": np.float32(0.1)}})
    by_dict_plain = slt.load_config({"source": {"density": 0.2},
                                     "search": {"ticket_density": 0.1}})
    assert by_map.source.density == by_dict.source.density == 0.2
    assert type(by_map.source.density) is float and type(by_dict.source.density) is float
    assert run_id(by_map) == run_id(plain)
    assert run_id(by_dict) == run_id(by_dict_plain)


def test_numpy_and_torch_ints_bools_and_arrays_are_their_python_values() -> None:
    cfg = slt.load_config("quick.toml", {"search.epochs": np.int64(3),
                                         "run.seed": torch.tensor(4),
                                         "run.progress": np.bool_(False),
                                         "model.hidden": np.array([16, 8])})
    assert (cfg.search.epochs, cfg.run.seed, cfg.run.progress, cfg.model.hidden) == \
        (3, 4, False, (16, 8))
    assert type(cfg.search.epochs) is int and type(cfg.model.hidden[0]) is int
    same = slt.load_config({"search": {"epochs": np.int32(3)},
                            "model": {"hidden": torch.tensor([16, 8])}})
    assert (same.search.epochs, same.model.hidden) == (3, (16, 8))
    given = slt.api.sweep_settings("demo_sweep.toml", {"search.epochs": np.int64(1)})[1]
    assert given == {"search.epochs": 1}
    rule = {"search.scorer": "gem-miner"}  # a scoring rule's option is a number too
    by_np = slt.load_config("quick.toml", {**rule, "search.scorer.lam": np.float32(2e-5)})
    by_float = slt.load_config("quick.toml", {**rule, "search.scorer.lam": 2e-5})
    assert dict(by_np.search.scorer_options)["lam"] == 2e-5
    assert run_id(by_np) == run_id(by_float)


def test_numbers_that_are_not_a_value_of_the_key_are_still_one_line() -> None:
    with pytest.raises(ConfigError) as exc:  # a 1-element tensor is a list, not a float
        slt.load_config("quick.toml", {"source.density": torch.tensor([0.2])})
    one_line(exc, "source.density", "expected float")
    with pytest.raises(ConfigError) as exc:
        slt.load_config("quick.toml", {"source.density": np.float64("nan")})
    one_line(exc, "source.density", "finite")
    with pytest.raises(ConfigError) as exc:
        slt.load_config({"search": {"epochs": np.float64(3.0)}})
    one_line(exc, "search.epochs", "expected int")


def test_none_for_a_key_is_a_key_not_given() -> None:
    base = slt.load_config("quick.toml")
    assert slt.load_config("quick.toml", {"source.density": None}) == base  # the file's 0.5
    assert slt.load_config("quick.toml", {"search.keep": None, "run.seed": None}) == base
    defaults = slt.load_config(None)
    assert slt.load_config({"source": {"density": None}, "run": None}) == defaults
    assert slt.load_config({"source": {"density": None}}).source.density == 1.0


# --- data that does not fit the ticket's model: one line, API and CLI -----------------------

@pytest.mark.parametrize("override,ours,theirs", [
    ({"data.input_dim": 16}, "shape 16 in 3 classes", "takes 8 in 3 classes"),
    ({"data.num_classes": 5}, "shape 8 in 5 classes", "takes 8 in 3 classes"),
])
def test_data_that_does_not_fit_the_ticket_is_one_data_error_line(ticket, override, ours,
                                                                  theirs) -> None:
    with pytest.raises(DataError) as exc:
        slt.evaluate(ticket, overrides=override)
    one_line(exc, "does not fit the ticket's model", ours, theirs, next(iter(override)))


def test_cli_eval_of_data_that_does_not_fit_is_exit_2_and_one_line(ticket_path) -> None:
    digest = ticket_path.read_bytes()
    proc = subprocess.run([*SLT, "eval", str(ticket_path), "--set", "data.input_dim=16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "slt: error: the data does not fit the ticket's model: dataset planted_teacher has "
        "examples of shape 16 in 3 classes, the ticket's model takes 8 in 3 classes "
        "(overrides: data.input_dim=16)")
    assert ticket_path.read_bytes() == digest


def write_fake_cifar10(root: Path, per_file: int = 120) -> None:
    """CIFAR-10's python batch files, of `per_file` random images each (enough for the
    limits of the MNIST run: 600 train and 120 test examples)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"batch_label": name, "labels": [i % 10 for i in range(per_file)],
                 "data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 "filenames": [f"{i}.png" for i in range(per_file)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))


@pytest.mark.slow
def test_an_mnist_ticket_evaluated_on_cifar10_is_one_line(shared_data, tmp_path) -> None:
    result = slt.search("mnist_lenet.toml", out=tmp_path / "runs", log=None, overrides={
        "data.root": shared_data, "data.train_limit": 256, "data.test_limit": 100,
        "search.epochs": 1, "model.hidden": [16]})
    path = result.run_dir / "ticket.slt"
    cifar = tmp_path / "cifar"
    write_fake_cifar10(cifar)
    with pytest.raises(DataError) as exc:
        slt.evaluate(path, cifar, overrides={"data.name": "cifar10"})
    one_line(exc, "dataset cifar10 has examples of shape 3x32x32 in 10 classes",
             "the ticket's model takes 1x28x28 in 10 classes", "overrides: data.name=")
    proc = subprocess.run([*SLT, "eval", str(path), "--set", "data.name=cifar10", "--set",
                           f"data.root={cifar}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("slt: error: the data does not fit the ticket's model: "
                                  "dataset cifar10 has examples of shape 3x32x32")


# --- slt.sweep from a script without the main guard --------------------------------------

SWEEP = TINY_SET.replace("search.epochs = 2", "search.epochs = 1") + """
[axes]
run.seed = [0, 1]
"""


@pytest.mark.slow
def test_sweep_with_workers_from_a_script_without_main_guard_says_so(tmp_path) -> None:
    (tmp_path / "sweep.toml").write_text(SWEEP)
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""\
        import slt
        from slt.errors import SltError
        print("script top level")
        try:
            slt.sweep({str(tmp_path / "sweep.toml")!r}, out={str(tmp_path / "runs")!r},
                      workers=2, report=False, log=None)
        except SltError as exc:
            print("ERROR:", exc)
        """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "bootstrapping" not in proc.stderr
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR:")]
    assert errors == [
        f"ERROR: slt.sweep with workers > 1 was called at the top level of {script}: every "
        "worker process imports the script again and would start the sweep again; put the "
        "script's code under 'if __name__ == \"__main__\":' (docs/api.md)"]
    # no point ran or was marked failed: only the sweep's record is in the folder
    runs = tmp_path / "runs"
    assert [p.name for p in runs.iterdir()] == ["sweep-sweep.json"]


def test_a_ticket_whose_train_limit_exceeds_its_split_still_evaluates(ticket, tmp_path
                                                                      ) -> None:
    """A run from before limits were checked may record a train_limit past its split: a
    search refuses it now, but evaluating needs only the test split, which the limit does
    not change."""
    import dataclasses

    cfg = ticket.config
    old = dataclasses.replace(ticket, config=dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, train_limit=cfg.data.train_size + 44)))
    result = slt.evaluate(old)
    assert result.test_acc == slt.evaluate(ticket).test_acc == ticket.metrics["test_acc"]
    with pytest.raises(DataError) as info:  # a search of that config is refused
        slt.search(old.config, out=tmp_path / "runs")
    assert f"data.train_limit = {cfg.data.train_size + 44} exceeds" in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_overrides_as_any_iterable_of_strings() -> None:
    densities = (f"source.density={d}" for d in [0.3])  # a generator, as a notebook writes
    assert slt.load_config("quick.toml", densities).source.density == 0.3
    assert slt.load_config("quick.toml", ("source.density=0.4",)).source.density == 0.4
