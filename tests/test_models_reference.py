"""Model references: configs naming torchvision / timm / python: models, their conversion into
searched layers, the parameter policy, search_include / exclude, and every bad input as one
line. The long searches of real library models are in test_models_library.py."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from torch import nn

import slt
from slt import config, resolve
from slt import ticket as ticket_io
from slt.cli import main
from slt.engine.run import run_search
from slt.errors import ConfigError, VersionWarning
from slt.layers import WeightSlot
from slt.models import restore
from slt.network import build_network
from slt.spec import DataSpec
from tests import model_factories
from tests.test_data_files import write_png

CIFAR = DataSpec((3, 32, 32), 10)
FACTORIES = "python:tests.model_factories"


def quiet(_: str) -> None:
    pass


def cfg_of(*overrides: str) -> config.Config:
    return resolve.load(None, ["data.name=cifar10", *overrides])


def net_of(*overrides: str, spec: DataSpec = CIFAR):
    return build_network(cfg_of(*overrides), spec)


def layer_names(net) -> list[str]:
    return [i.name for i in net.infos]


def image_tree(root: Path, per_class: int = 6, test_per_class: int = 2, classes: int = 4,
               size: int = 32) -> Path:
    """root/{train,test}/<class>/<i>.png of random colour noise, a class-dependent tint so
    that there is something to learn."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            for i in range(n):
                pixels = rng.integers(0, 160, (size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] += np.uint8(60 + 20 * c)
                write_png(root / split / f"c{c}" / f"{i}.png", pixels)
    return root


def tree_run(root: Path, *overrides: str) -> list[str]:
    return ["data.name=imagefolder", f"data.root={root}", "search.epochs=1",
            "search.batch_size=8", "search.eval_batch_size=8", "run.progress=false",
            *overrides]


# --- configs ----------------------------------------------------------------------------


def test_kwargs_come_from_a_table_or_set_and_enter_the_run_id() -> None:
    base = ["model.name=timm:vit_tiny_patch16_224"]
    a = cfg_of(*base, "model.kwargs.img_size=32", "model.kwargs.patch_size=4")
    b = resolve.resolve({"data": {"name": "cifar10"}, "model": {
        "name": "timm:vit_tiny_patch16_224", "kwargs": {"patch_size": 4, "img_size": 32}}})
    assert a.model.kwargs == (("img_size", 32), ("patch_size", 4)) == b.model.kwargs
    assert config.run_id(a) == config.run_id(b)
    c = cfg_of(*base, "model.kwargs.img_size=32", "model.kwargs.patch_size=8")
    assert config.run_id(c) != config.run_id(a)
    assert ":" not in config.run_id(a)
    assert config.run_id(a).startswith("cifar10-timm_vit_tiny_patch16_224-d1-t0.5-")
    # the resolved TOML reads back to the same config
    assert config.from_dict(tomllib.loads(config.to_toml(a))).model == a.model


def test_a_builtin_config_writes_an_empty_kwargs_table_and_keeps_its_id() -> None:
    cfg = cfg_of("model.name=conv4")
    text = config.to_toml(cfg)
    assert "kwargs = {}" in text
    assert config.from_dict(tomllib.loads(text)) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["model.name=torchvision:resnet18", "model.width=2"],
     "model.width applies to built-in models only"),
    (["model.name=torchvision:resnet18", "model.bn_affine=true"], 'model.norm = "learned"'),
    (["model.name=conv4", "model.norm=learned"], "model.norm applies to model references"),
    (["model.name=conv4", "model.kwargs.depth=3"], "model.kwargs applies to model references"),
    (["model.name=torchvision:resnet18", "model.bias=learned"],
     "model.bias must be one of zero, random"),
    (["model.name=torchvision:resnet19"], "unknown torchvision model 'resnet19' (did you mean"),
    (["model.name=timm:vit_tiny_patch16_244"], "(did you mean 'vit_tiny_patch16_224'?)"),
    (["model.name=torchvision:"], "expected torchvision:MODEL_NAME"),
    (["model.name=python:nowhere"], "python:package.module:factory"),
    ([f"model.name={FACTORIES}:missing"], "has no missing"),
    ([f"model.name={FACTORIES}:NOT_CALLABLE"], "NOT_CALLABLE is not callable"),
    (["model.name=python:no_such_package_xyz.models:build"],
     "cannot import no_such_package_xyz.models (ModuleNotFoundError"),
])
def test_bad_model_configs_are_one_line(overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        cfg_of(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_without_timm_a_timm_reference_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ConfigError, match=r"timm: references need the timm extra: pip install"):
        cfg_of("model.name=timm:vit_tiny_patch16_224")


@pytest.mark.parametrize("name, kwargs, message", [
    ("raises", [], "failed to build with (num_classes=10) (ValueError: this factory always"),
    ("tiny_transformer", ["model.kwargs.width=3"], "rejects its arguments"),
    ("only_parameters", [], "has no layer slt can search"),
    ("three_outputs", [], "gives (2, 3) in training for a batch of 2 inputs, not logits of "
                          "shape (2, 10)"),
    ("tiny_transformer", ["model.kwargs.pretrained=true"], "model.kwargs.pretrained: slt draws"),
])
def test_factories_that_go_wrong_are_one_line(name, kwargs, message) -> None:
    cfg = cfg_of(f"model.name={FACTORIES}:{name}", *kwargs)
    with pytest.raises(ConfigError) as err:
        slt.capacity.network_layout(cfg, CIFAR)  # the meta layout every run makes first
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_output_is_checked_in_training_too() -> None:
    cfg = cfg_of("model.name=torchvision:googlenet",  # auxiliary logits while training
                 "model.kwargs.init_weights=false")
    with pytest.raises(ConfigError, match=r"gives GoogLeNetOutputs in training for a batch"):
        slt.capacity.network_layout(cfg, CIFAR)


def test_torchvision_builders_load_no_backbone(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    cfg = cfg_of("model.name=torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")
    with pytest.raises(ConfigError) as err:  # a detector gives no logits; nothing fetched
        slt.capacity.network_layout(cfg, CIFAR)
    assert "failed to build" not in str(err.value) and not (tmp_path / "hub").exists()
    with pytest.raises(ConfigError, match="model.kwargs.pretrained_backbone: slt draws"):
        slt.capacity.network_layout(cfg_of(
            "model.name=torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
            "model.kwargs.pretrained_backbone=true"), CIFAR)


def test_a_model_that_cannot_take_the_input_is_one_line() -> None:
    cfg = cfg_of("model.name=torchvision:resnet18")
    with pytest.raises(ConfigError, match=r"fails on the data's input of shape \(5,\)"):
        slt.capacity.network_layout(cfg, DataSpec((5,), 10))


def test_num_classes_is_filled_only_where_the_factory_takes_it() -> None:
    net = net_of(f"model.name={FACTORIES}:no_num_classes")  # builds 10 outputs itself
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    net = net_of("model.name=torchvision:resnet18", spec=DataSpec((3, 32, 32), 7))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    net = net_of("model.name=timm:vit_tiny_patch16_224", "model.kwargs.img_size=28",
                 "model.kwargs.patch_size=7", "model.kwargs.depth=1",
                 spec=DataSpec((1, 28, 28), 10))  # timm's in_chans from the data
    assert layer_names(net)[0] == "patch_embed.proj.weight"
    assert net.infos[0].shape == (192, 1, 7, 7)


# --- conversion -------------------------------------------------------------------------


def reference_forward(net, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The user's module, never converted, given the network's parameters and effective
    weights by name: what the search's network must compute."""
    net.eval()
    with torch.no_grad():
        net.refresh()
        state = {i.name: layer.weight().clone() for i, layer in zip(net.infos, net.all_layers)}
        for name, value in net.body.state_dict().items():
            if not name.endswith(".scores"):
                state[name] = value
        module.load_state_dict(state)
        return module.eval()(x)


@pytest.mark.parametrize("factory, slots", [
    ("conv_zoo", ["grouped.weight", "depthwise.weight", "volume.weight", "line.weight",
                  "head.weight"]),
    ("tiny_transformer", ["patch.weight", "encoder.self_attn.in_proj_weight",
                          "encoder.self_attn.out_proj.weight", "encoder.linear1.weight",
                          "encoder.linear2.weight", "cross.in_proj_weight",
                          "cross.out_proj.weight", "memory.weight", "head.weight"]),
    ("separate_kv_transformer", ["patch.weight", "encoder.self_attn.in_proj_weight",
                                 "encoder.self_attn.out_proj.weight", "encoder.linear1.weight",
                                 "encoder.linear2.weight", "cross.q_proj_weight",
                                 "cross.k_proj_weight", "cross.v_proj_weight",
                                 "cross.out_proj.weight", "memory.weight", "head.weight"]),
])
def test_conversion_keeps_the_models_own_computation(factory, slots) -> None:
    net = net_of(f"model.name={FACTORIES}:{factory}", "source.density=0.5", "model.bias=random",
                 "model.norm=learned")
    assert layer_names(net) == slots  # module order; attention's input projections first
    assert all(isinstance(layer, WeightSlot) for layer in net.all_layers)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = net.eval()(x)
    expected = reference_forward(net, getattr(model_factories, factory)(), x)
    assert torch.equal(got, expected)
    for layer in net.all_layers:  # exactly k edges, inside the source
        kept = layer.weight() != 0
        assert int(kept.sum()) == round(0.5 * layer.n_source) == int(
            (kept & layer.source_mask()).sum())


def test_weights_are_slts_own_whatever_the_library_drew() -> None:
    torch.manual_seed(1)
    a = net_of(f"model.name={FACTORIES}:tiny_transformer", "model.bias=random")
    torch.manual_seed(2)  # the factory's own init draws other numbers now
    b = net_of(f"model.name={FACTORIES}:tiny_transformer", "model.bias=random")
    assert all(torch.equal(x.weight_src, y.weight_src) for x, y in zip(a.all_layers,
                                                                          b.all_layers))
    sa, sb = a.body.state_dict(), b.body.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith(".scores"))
    c = net_of(f"model.name={FACTORIES}:tiny_transformer", "model.bias=random", "run.seed=1")
    assert not torch.equal(sa["pos"], c.body.state_dict()["pos"])


def test_the_parameter_policy() -> None:
    net = net_of(f"model.name={FACTORIES}:conv_zoo")
    params = dict(net.body.named_parameters())
    for name in ("grouped.bias", "depthwise.bias", "head.bias", "bn.bias", "gn.bias"):
        assert not params[name].any() and not params[name].requires_grad
    assert bool((params["bn.weight"] == 1).all()) and not params["bn.weight"].requires_grad
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained == {f"body.{n}.scores" for n in layer_names(net)}

    net = net_of(f"model.name={FACTORIES}:conv_zoo", "model.bias=random", "model.norm=learned")
    params = dict(net.body.named_parameters())
    bias = params["head.bias"]
    bound = 1 / (8 * 126) ** 0.5  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of the head
    assert bias.abs().max() <= bound and bias.abs().max() > bound / 2
    assert not bias.requires_grad
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained - {f"body.{n}.scores" for n in layer_names(net)} == {
        "body.bn.weight", "body.bn.bias", "body.gn.weight", "body.gn.bias"}

    net = net_of(f"model.name={FACTORIES}:tiny_transformer")
    pos = dict(net.body.named_parameters())["pos"]
    assert 0.015 < float(pos.std()) < 0.025 and not pos.requires_grad  # N(0, 0.02^2)


def test_a_tied_weight_is_searched_once_and_stays_tied() -> None:
    net = net_of(f"model.name={FACTORIES}:tied", "source.density=0.5")
    assert layer_names(net) == ["encode.weight", "middle.weight", "head.weight"]
    with torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))
    assert net.body.middle.weight is net.body.mirror.weight  # one tensor, read twice
    body = restore(net.body)
    assert body.middle.weight is body.mirror.weight
    assert isinstance(body.middle.weight, nn.Parameter)


def test_include_and_exclude_choose_the_searched_layers() -> None:
    ref = f"model.name={FACTORIES}:tiny_transformer"
    net = net_of(ref, "model.search_include=['encoder', 'head']", "source.density=0.5",
                 "source.scheme=erk")
    searched = [i.name for i in net.infos if i.searched]
    assert searched == ["encoder.self_attn.in_proj_weight", "encoder.self_attn.out_proj.weight",
                        "encoder.linear1.weight", "encoder.linear2.weight", "head.weight"]
    n = sum(i.numel for i in net.infos if i.searched)
    assert sum(i.n_source for i in net.infos if i.searched) == round(0.5 * n)
    assert all(i.n_source == i.numel for i in net.infos if not i.searched)  # dense, frozen
    net = net_of(ref, "model.search_exclude=['*.out_proj', 'patch*']",
                 "model.last_layer_dense=true")
    dense = [i.name for i in net.infos if not i.searched]
    assert dense == ["patch.weight", "encoder.self_attn.out_proj.weight",
                     "cross.out_proj.weight", "head.weight"]
    with pytest.raises(ConfigError, match=r"search_include pattern 'haed' matches no layer"):
        net_of(ref, "model.search_include=['haed']")
    with pytest.raises(ConfigError, match="leave no layer to search"):
        net_of(ref, "model.search_exclude=['*']")


def test_slt_layers_prints_every_parameter_with_its_role(capsys) -> None:
    code = main(["layers", "--set", "data.name=cifar10", "--set",
                 f"model.name={FACTORIES}:tiny_transformer", "--set", "source.density=0.5",
                 "--set", "model.search_exclude=['head']", "--json"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out[-1])}
    assert rows["pos"]["role"] == "frozen" and rows["pos"]["n_source"] is None
    assert rows["head.weight"]["role"] == "frozen" and rows["head.weight"]["n_source"] == 160
    assert rows["head.bias"]["role"] == "constant"
    assert rows["norm.weight"]["role"] == "constant"
    qkv = rows["encoder.self_attn.in_proj_weight"]
    assert qkv["role"] == "searched" and qkv["shape"] == [48, 16]
    assert qkv["n_source"] == 384 and qkv["n_ticket"] == 192
    order = list(rows)
    assert order.index("patch.weight") < order.index("patch.bias")  # weight, then bias
    assert any(line.startswith("  searched ") for line in out)


def test_slt_layers_asks_for_the_shape_of_data_it_cannot_know(capsys) -> None:
    assert main(["layers", "--set", "data.name=imagefolder"]) == 2
    assert "give --input (e.g. 3x224x224) and --classes" in capsys.readouterr().err
    assert main(["layers", "--set", "data.name=imagefolder", "--set",
                 "model.name=torchvision:resnet18", "--input", "3x64x64", "--classes",
                 "5"]) == 0
    assert "fc.weight" in capsys.readouterr().out


# --- runs, tickets and trust ---------------------------------------------------------------


def test_a_python_reference_runs_and_its_ticket_needs_trust(tmp_path, capsys) -> None:
    root = image_tree(tmp_path / "data")
    cfg = resolve.load(None, tree_run(root, f"model.name={FACTORIES}:tiny_transformer",
                                      "source.density=0.5"))
    result = run_search(cfg, tmp_path / "runs", log=quiet)
    path = result.run_dir / "ticket.slt"
    t = ticket_io.load(path)  # reading it imports nothing: its header's own layout
    assert t.header["libraries"] == {"torch": torch.__version__}
    with pytest.raises(ConfigError, match="is code named by the file"):
        slt.evaluate(t)
    assert main(["eval", str(path)]) == 2
    assert "--trust-model" in capsys.readouterr().err
    same = slt.evaluate(t, trust_model=True)
    assert same.same_as_recorded
    again = run_search(cfg, tmp_path / "runs", embed_weights=True, log=quiet)  # the user's own
    assert again.status == "skipped" and ticket_io.load(path).header["embedded_weights"]
    module = t.to_module(trust_model=True)
    assert type(module) is model_factories.TinyTransformer
    assert main(["export", str(path), "--out", str(tmp_path / "m.pt"), "--trust-model"]) == 0
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(state) == set(module.state_dict())


def test_another_library_version_is_a_warning(tmp_path) -> None:
    root = image_tree(tmp_path / "data")
    cfg = resolve.load(None, tree_run(root, "model.name=timm:vit_tiny_patch16_224",
                                      "model.kwargs.img_size=32", "model.kwargs.patch_size=8",
                                      "model.kwargs.depth=1", "model.kwargs.embed_dim=24",
                                      "model.kwargs.num_heads=2"))
    result = run_search(cfg, tmp_path / "runs", log=quiet)
    t = ticket_io.load(result.run_dir / "ticket.slt")
    import timm

    assert t.header["libraries"] == {"torch": torch.__version__, "timm": timm.__version__}
    t.header["libraries"]["timm"] = "0.0.1"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ticket_io.rebuild(t, torch.device("cpu"))
    lines = [str(w.message) for w in seen if issubclass(w.category, VersionWarning)]
    assert len(lines) == 1 and f"timm {timm.__version__} (the ticket's: 0.0.1)" in lines[0]


def test_the_api_takes_an_importable_factory(tmp_path) -> None:
    root = image_tree(tmp_path / "data")
    result = slt.search(None, overrides=tree_run(root, "source.density=0.5"),
                        out=tmp_path / "runs", model=model_factories.tiny_transformer, log=None)
    assert result.ticket.config.model.name == f"{FACTORIES}:tiny_transformer"

    def local_factory(num_classes: int = 10) -> nn.Module:
        return model_factories.tiny_transformer(num_classes)

    for bad in (local_factory, lambda num_classes=10: nn.Linear(3, num_classes)):
        with pytest.raises(ConfigError, match="a factory must be importable by name"):
            slt.search(None, out=tmp_path / "runs", model=bad, log=None)


@pytest.mark.parametrize("model", [["tiny_transformer", "model.kwargs.dropout=0.3"],
                                   ["stochastic"]])
def test_dropout_is_seeded_per_step_so_a_resume_is_exact(tmp_path, model) -> None:
    root = image_tree(tmp_path / "data", per_class=8)
    cfg = resolve.load(None, tree_run(root, f"model.name={FACTORIES}:{model[0]}", *model[1:],
                                      "search.epochs=2", "run.checkpoint_every=1"))
    straight = run_search(cfg, tmp_path / "a", log=quiet)
    stopped = run_search(cfg, tmp_path / "b", stop_after_steps=2, log=quiet)
    assert stopped.status == "stopped"
    resumed = run_search(cfg, tmp_path / "b", log=quiet)
    a = ticket_io.load(straight.run_dir / "ticket.slt")
    b = ticket_io.load(resumed.run_dir / "ticket.slt")
    assert all(torch.equal(x.mask, y.mask) for x, y in zip(a.layers, b.layers))
    assert resumed.summary["final_test_acc"] == straight.summary["final_test_acc"]
    state = torch.random.get_rng_state()
    run_search(cfg, tmp_path / "c", log=quiet)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's generator untouched
