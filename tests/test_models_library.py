"""Tickets in library models: torchvision's ResNet-18 and MobileNetV3-Small (depthwise and
grouped convolutions, squeeze-excitation with biases, dropout) and timm's ViT-Tiny on 32x32
inputs with 4x4 patches, each in a short search on a small synthetic image folder: exact k
inside nested sources, the same weights at every density, `slt eval` reproducing the run,
`to_module()` of the library's own class computing the network's logits exactly, and a
search killed with SIGKILL resuming to the uninterrupted ticket."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

import slt
from slt import config, resolve
from slt import export as export_mod
from slt import ticket as ticket_io
from slt.engine.run import run_search
from slt.source import count_of
from tests.test_faults_rundir import slt_proc
from tests.test_models_reference import image_tree, quiet, tree_run

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

MODELS = {
    "torchvision:resnet18": ([], torchvision.models.ResNet),
    "torchvision:mobilenet_v3_small": ([], torchvision.models.MobileNetV3),
    "timm:vit_tiny_patch16_224": (["model.kwargs.img_size=32", "model.kwargs.patch_size=4"],
                                  timm.models.VisionTransformer),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_tree(tmp_path_factory.mktemp("images"))


def overrides(model: str, root: Path, *extra: str) -> list[str]:
    return tree_run(root, f"model.name={model}", *MODELS[model][0], "source.scheme=erk",
                    "search.keep=0.3", *extra)


@pytest.fixture(scope="module", params=list(MODELS))
def searched(request, images, tmp_path_factory):
    """(model, {density: ticket}) of one short search per source density."""
    model, out = request.param, tmp_path_factory.mktemp("runs")
    tickets = {}
    for density in (0.5, 0.2):
        cfg = resolve.load(None, overrides(model, images, f"source.density={density}"))
        result = run_search(cfg, out, log=quiet)
        tickets[density] = ticket_io.load(result.run_dir / "ticket.slt")
    return model, tickets


def test_every_layer_keeps_exactly_its_k_edges_inside_nested_sources(searched) -> None:
    model, tickets = searched
    for t in tickets.values():
        assert len(t.layers) > 20 and all(tl.searched for tl in t.layers)
        for tl in t.layers:
            assert tl.n_ticket == count_of(0.3, tl.n_source)
            assert not bool((tl.mask & ~tl.source_mask).any())
    for thin, thick in zip(tickets[0.2].layers, tickets[0.5].layers):
        assert thin.name == thick.name
        assert not bool((thin.source_mask & ~thick.source_mask).any())  # nested
    dens = tickets[0.2].header["densities"]
    assert dens["n_source"] == count_of(0.2, dens["n_prunable"])


def test_weights_are_the_same_at_every_density(searched) -> None:
    model, tickets = searched
    nets = {d: ticket_io.rebuild(t, torch.device("cpu")) for d, t in tickets.items()}
    for thin, thick in zip(nets[0.2].all_layers, nets[0.5].all_layers):
        on = thin.source_mask()  # the thinner source's edges: in both
        assert torch.equal(thin.expand(thin.weight_src)[on], thick.expand(thick.weight_src)[on])
    a, b = nets[0.2].body.state_dict(), nets[0.5].body.state_dict()
    frozen = [k for k in a if not k.endswith(".scores") and "running" not in k
              and "num_batches" not in k]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)


def test_eval_reproduces_the_run_and_to_module_is_the_librarys_class(searched) -> None:
    model, tickets = searched
    t = tickets[0.2]
    result = slt.evaluate(t)
    assert result.same_as_recorded
    module = t.to_module()
    assert isinstance(module, MODELS[model][1]) and not module.training
    assert not any(isinstance(m, slt.layers.MaskedLayer) for m in module.modules())
    net = ticket_io.rebuild(t, torch.device("cpu")).eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(module(x), net(x))
    for tl in t.layers:  # zeros off the mask, in the library's own parameter
        assert not bool(module.get_parameter(tl.name)[~tl.mask].any())


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_a_search_killed_with_sigkill_resumes_to_the_same_ticket(model, images, tmp_path):
    sets = overrides(model, images, "source.density=0.5", "search.epochs=3",
                     "run.checkpoint_every=1")
    defaults = tmp_path / "defaults.toml"
    defaults.write_text("# slt's defaults\n")
    cfg = resolve.load(defaults, sets)
    out = tmp_path / "killed"
    run_dir = out / config.run_id(cfg)
    proc = slt_proc("search", "--config", str(defaults),
                    *[a for o in sets for a in ("--set", o)], "--out", str(out))
    deadline = time.time() + 300
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_dir / "ticket.slt").exists()  # stopped before its end
    resumed = run_search(cfg, out, log=quiet)
    straight = run_search(cfg, tmp_path / "straight", log=quiet)
    a = ticket_io.load(straight.run_dir / "ticket.slt")
    b = ticket_io.load(resumed.run_dir / "ticket.slt")
    assert all(torch.equal(x.mask, y.mask) for x, y in zip(a.layers, b.layers))
    assert resumed.summary["final_test_acc"] == straight.summary["final_test_acc"]


def test_every_export_format_holds_the_librarys_module(searched, tmp_path) -> None:
    model, tickets = searched
    t = tickets[0.2]
    module = t.to_module()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = module(x)
    export_mod.export(t, tmp_path / "state.pt", "state_dict")
    fresh = t.to_module()  # the same class; its parameters replaced by the file's
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(export_mod.load_state_dict(tmp_path / "state.pt"))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)
    export_mod.export(t, tmp_path / "prune.pt", "prune", sparse=True)
    pruned = export_mod.load_state_dict(tmp_path / "prune.pt")
    name = t.layers[1].name
    assert torch.equal(pruned[f"{name}_mask"].bool(), t.layers[1].mask)
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    export_mod.export(t, tmp_path / "m.onnx", "onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (logits,) = session.run(None, {"input": x.numpy()})
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4)


def test_config_show_names_the_reference(capsys) -> None:
    from slt.cli import main

    assert main(["config", "show", "--set", "data.name=cifar10", "--set",
                 "model.name=timm:vit_tiny_patch16_224", "--set",
                 "model.kwargs.img_size=32"]) == 0
    out = capsys.readouterr().out
    assert f"# model: reference timm:vit_tiny_patch16_224 (timm {timm.__version__})" in out
    assert "kwargs = { img_size = 32 }" in out
