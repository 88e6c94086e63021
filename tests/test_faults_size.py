"""A network too large for the machine is one ConfigError line, before anything is built.

`check_fits` counts the prunable weights on the meta device (exact, no storage) and refuses
what cannot fit; `allocation_error` maps an allocation that fails anyway to the same kind
of line. Counts are checked against real built networks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from slt import capacity, config, resolve
from slt.capacity import (
    BYTES_PER_SOURCE_EDGE,
    BYTES_PER_WEIGHT,
    allocation_error,
    allocation_errors,
    check_fits,
    human_bytes,
    search_bytes,
)
from slt.cli import main
from slt.config.schema import Config
from slt.errors import ConfigError
from slt.network import build_network, count_weights
from slt.spec import DataSpec
from slt.sweeps.grid import load_sweep
from tests.conftest import REPO

CPU = torch.device("cpu")
MNIST = DataSpec((1, 28, 28), 10)
CIFAR = DataSpec((3, 32, 32), 10)
SPECS = {"mnist": MNIST, "cifar10": CIFAR}


def cfg_of(*overrides: str, drop: tuple[str, ...] = ()) -> Config:
    """quick.toml (an MLP 16 -> 256 -> 256 -> 10) with overrides, `drop` keys removed."""
    raw = config.read_toml("quick.toml")
    for dotted in drop:
        section, key = dotted.split(".")
        raw[section].pop(key)
    return resolve.resolve(config.apply_overrides(raw, list(overrides)), "quick.toml")


def spec_of(cfg: Config) -> DataSpec:
    """The data spec of a config without loading its data."""
    if cfg.data.name == "planted_teacher":
        return DataSpec((cfg.data.input_dim,), cfg.data.num_classes)
    return SPECS[cfg.data.name]


# --- the refusal -------------------------------------------------------------------------


def test_absurd_mlp_width_is_refused() -> None:
    cfg = cfg_of("model.width=100000", "source.density=1.0", "search.ticket_density=0.1")
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, MNIST, CPU)
    msg = str(err.value)
    # quick.toml's MLP: 784 -> 256 -> 256 -> 10, each hidden size times 100,000
    n = 784 * 25_600_000 + 25_600_000 ** 2 + 25_600_000 * 10
    assert count_weights(cfg, MNIST).n_prunable == n
    assert msg.startswith(f"model mlp at model.width=100000, model.hidden=[256, 256] has "
                          f"{n:.2g} prunable weights, needing about ".replace("e+", "e"))
    assert human_bytes((BYTES_PER_WEIGHT + BYTES_PER_SOURCE_EDGE) * n) in msg
    assert "PiB for the search; this machine has " in msg
    assert msg.endswith(": lower model.width")
    assert len(msg.splitlines()) == 1


def test_absurd_resnet50_width_is_refused() -> None:
    cfg = cfg_of("model.name=resnet50", "model.width=100000")
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, CIFAR, CPU)
    msg = str(err.value)
    count = count_weights(cfg, CIFAR)
    assert count.n_prunable > 2e17 and count.n_source == round(0.5 * count.n_prunable)
    assert msg.startswith("model resnet50 at model.width=100000 has 2.3e17 prunable weights "
                          "(1.2e17 in the source at source.density 0.5), needing about ")
    assert f"{human_bytes(search_bytes(count))} for the search" in msg
    assert msg.endswith("lower model.width")


def test_width_past_torchs_size_limit_is_refused() -> None:
    # BatchNorm of 6.4e31 channels cannot even be laid out on the meta device
    cfg = cfg_of("model.name=resnet18", "model.width=1e30")
    with pytest.raises(ConfigError, match="model resnet18 at model.width=1e\\+30 has a layer "
                       "too large for torch's 64-bit sizes; lower model.width"):
        check_fits(cfg, CIFAR, CPU)


def test_refusal_is_at_the_memory_it_compares_with(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_of("source.density=0.5")
    need = search_bytes(count_weights(cfg, spec_of(cfg)))
    n = 16 * 256 + 256 * 256 + 256 * 10  # quick.toml's MLP, half of it in the source
    assert need == BYTES_PER_WEIGHT * n + BYTES_PER_SOURCE_EDGE * n // 2 == 2_382_336
    monkeypatch.setattr(capacity, "physical_memory", lambda: need)
    check_fits(cfg, spec_of(cfg), CPU)  # exactly fits: runs
    monkeypatch.setattr(capacity, "physical_memory", lambda: need - 1)
    with pytest.raises(ConfigError, match="this machine has 2.3 MiB: lower model.hidden or "
                       "source.density"):
        check_fits(cfg, spec_of(cfg), CPU)
    monkeypatch.setattr(capacity, "physical_memory", lambda: None)  # unknown: never refused
    check_fits(cfg_of("model.width=100000"), spec_of(cfg), CPU)


def test_physical_memory_is_this_machines() -> None:
    ram = capacity.physical_memory()
    assert ram is not None and 0 < ram <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.cuda
def test_absurd_width_is_refused_on_cuda() -> None:
    with pytest.raises(ConfigError, match="this GPU \\(cuda\\) has .* free\\): lower model.width"):
        check_fits(cfg_of("model.width=100000"), MNIST, torch.device("cuda"))


def shipped_configs() -> list[tuple[str, Config]]:
    """Every shipped config, and every point of every shipped sweep."""
    out = []
    for path in sorted((REPO / "configs").glob("*.toml")):
        if "[axes]" in path.read_text():
            for point in load_sweep(path).points():
                assert point.config is not None, (path.name, point.skipped)
                out.append((f"{path.name} {point.label()}", point.config))
        else:
            out.append((path.name, resolve.load(path)))
    return out


def test_shipped_configs_fit() -> None:
    configs = shipped_configs()
    assert len(configs) > 10 and {c.model.name for _, c in configs} >= {"mlp", "conv4"}
    for name, cfg in configs:
        check_fits(cfg, spec_of(cfg), CPU)  # raises for any that would not
        assert search_bytes(count_weights(cfg, spec_of(cfg))) < 2 ** 30, name


# --- the counts are the built network's ----------------------------------------------------


@pytest.mark.parametrize("overrides, spec", [
    (("model.width=0.5",), MNIST),
    (("model.width=2", "model.hidden=[30, 20, 10]", "source.scheme=erk", "source.density=0.3",
      "search.ticket_density=0.1"), MNIST),
    (("model.name=conv4", "model.width=0.25", "source.scheme=erk", "source.density=0.2",
      "search.ticket_density=0.1"), CIFAR),
    (("model.name=conv2", "model.width=0.5", "source.scheme=balanced", "source.density=0.1",
      "search.ticket_density=0.05", "model.first_layer_dense=true",
      "model.last_layer_dense=true"), MNIST),
    (("model.name=resnet20", "source.scheme=pyramidal", "source.density=0.5"), CIFAR),
    (("model.name=vgg16", "model.width=0.125", "source.scheme=er", "source.density=0.3",
      "search.ticket_density=0.1"), CIFAR),
    (("model.name=resnet18", "model.width=0.125", "source.density=0.05",
      "search.ticket_density=0.01"), CIFAR),
    (("source.scheme=custom", "source.layer_densities=[0.3, 0.6, 1.0]", "search.keep=0.5"),
     DataSpec((16,), 10)),
])
def test_counts_equal_the_built_network(overrides: tuple[str, ...], spec: DataSpec) -> None:
    custom = "source.scheme=custom" in overrides
    cfg = cfg_of(*overrides, drop=("search.ticket_density",) if custom else ())
    count = count_weights(cfg, spec)
    net = build_network(cfg, spec)
    assert count.layers == tuple((i.name, i.numel, i.n_source) for i in net.infos)
    assert len(count.layers) >= 3
    assert count.n_prunable == sum(layer.numel for layer in net.all_layers)
    assert count.n_source == sum(layer.n_source for layer in net.all_layers)


# --- allocation failures -------------------------------------------------------------------


def test_a_real_cpu_allocation_failure_is_one_line() -> None:
    cfg = cfg_of("model.width=100000")
    try:
        torch.empty(2 ** 50)  # 4 PiB of float32
    except RuntimeError as exc:
        error = allocation_error(cfg, exc, MNIST)
    else:  # pragma: no cover - a kernel that overcommits without limit
        pytest.skip("this machine lent 4 PiB of address space")
    assert isinstance(error, ConfigError)
    msg = str(error)
    assert msg.startswith("out of memory on the CPU (an allocation of 4.0 PiB) with model mlp "
                          "at model.width=100000, model.hidden=[256, 256]; its 6.6e14 "
                          "prunable weights need about ")
    assert msg.endswith(" for the search: lower model.width")
    assert len(msg.splitlines()) == 1


def test_a_tensor_past_torchs_size_limit_is_an_allocation_failure() -> None:
    with pytest.raises(RuntimeError) as exc:
        torch.empty(2 ** 62)
    error = allocation_error(cfg_of("model.name=resnet50", "model.width=64"), exc.value)
    assert str(error) == ("out of memory on the CPU (a tensor past torch's 64-bit size limit) "
                          "with model resnet50 at model.width=64: lower model.width")


def test_cuda_out_of_memory_is_one_line() -> None:
    exc = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
        "79.19 GiB of which 3.10 GiB is free.")
    error = allocation_error(cfg_of("model.name=vgg16", "model.width=16"), exc)
    assert str(error) == ("out of memory on the GPU (an allocation of 20.00 GiB) with model "
                          "vgg16 at model.width=16: lower model.width or search.batch_size")


def test_other_errors_are_not_allocation_failures() -> None:
    cfg = cfg_of()
    assert allocation_error(cfg, RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert allocation_error(cfg, ValueError("can't allocate memory")) is None
    assert str(allocation_error(cfg, MemoryError())).startswith("out of memory on the CPU with")


def test_allocation_failure_of_a_small_network_points_at_the_batch() -> None:
    """A network that fits cannot be what ran out: the batch's activations are likelier."""
    exc = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                       "68719476736 bytes. Error code 12 (Cannot allocate memory)")
    error = allocation_error(cfg_of(), exc, DataSpec((16,), 10))
    assert str(error) == ("out of memory on the CPU (an allocation of 64 GiB) with model mlp at "
                          "model.width=1, model.hidden=[256, 256]; its 72,192 prunable weights "
                          "need about 2.3 MiB for the search: lower search.batch_size")


def test_allocation_errors_block() -> None:
    cfg = cfg_of("model.width=100000")
    with pytest.raises(ConfigError, match="^out of memory on the CPU \\(an allocation of 1.0 EiB"):
        with allocation_errors(cfg):
            torch.empty(2 ** 60, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="unrelated"):
        with allocation_errors(cfg):
            raise RuntimeError("unrelated")


# --- the whole command ---------------------------------------------------------------------


def test_cli_refuses_an_absurd_width(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 784 inputs: without the check, the first layer's 160 GB permutation fails at once
    out = tmp_path / "out"
    code = main(["search", "--config", "quick.toml", "--out", str(out), "--no-progress",
                 "--set", "model.width=100000", "--set", "data.input_dim=784",
                 "--set", "run.device=cpu"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("slt: error: model mlp at model.width=100000, model.hidden=[256, "
                             "256] has 6.6e14 prunable weights (3.3e14 in the source at "
                             "source.density 0.5), needing about ")
    assert err[0].endswith("lower model.width")
    assert not out.exists()
