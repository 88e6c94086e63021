"""A ticket as a plain module, and `slt export`: logits, accuracy, every format's round trip."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from slt import export as export_mod
from slt import resolve, ticket
from slt.cli import main
from slt.data.datasets import load_data
from slt.data.memory import Batches
from slt.engine.run import run_search
from slt.errors import ConfigError, ExportError
from slt.export import EXPORTS, load_state_dict, to_module
from slt.layers import MaskedLayer
from slt.models import resnet
from slt.network import build_network
from slt.spec import DataSpec

SPEC = DataSpec((3, 16, 16), 10)
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))


def quiet(_: str) -> None:
    pass


def make_ticket(tmp_path, model: str, *extra: str, width: float = 0.125,
                density: float = 0.2):
    """A saved and reloaded ticket of `model` (no search: the initial top-k), with BatchNorm
    statistics moved away from 0/1 by a few training-mode passes."""
    cfg = resolve.load(None, ["data.name=planted_teacher", f"model.name={model}",
                              f"model.width={width}", f"search.ticket_density={density}",
                              "source.density=0.5", "model.bn_affine=true", *extra])
    net = build_network(cfg, SPEC)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, *SPEC.shape, generator=gen) * 2 + 0.5)
        for module in net.modules():  # give affine BatchNorm non-default scale and shift
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.uniform_(-0.5, 0.5, generator=gen)
    path = tmp_path / f"{model}.slt"
    ticket.save(path, cfg, SPEC, net, net.ticket_masks())
    return ticket.load(path)


def inputs(n: int = 5) -> torch.Tensor:
    return torch.randn(n, *SPEC.shape, generator=torch.Generator().manual_seed(1))


def slt_logits(t, x: torch.Tensor) -> torch.Tensor:
    net = ticket.rebuild(t, torch.device("cpu")).eval()
    with torch.no_grad():
        return net(x)


def logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(x)


def fresh_copy(module: nn.Module) -> nn.Module:
    """The same architecture with new random weights and reset BatchNorm statistics."""
    fresh = copy.deepcopy(module)
    torch.manual_seed(123)
    for m in fresh.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            m.reset_parameters()
    return fresh


@pytest.mark.parametrize(("model", "extra"), [
    ("mlp", ()), ("conv4", ()), ("conv8", ()), ("vgg16", ()), ("resnet20", ()),
    ("resnet50", ()), ("resnet20", ("model.bn_affine=false",)),
    ("conv4", ("model.first_layer_dense=true", "model.last_layer_dense=true")),
    ("mlp", ("search.scorer=biprop",)), ("conv4", ("search.scorer=signed-supermask",)),
])
def test_module_gives_the_networks_logits_exactly(tmp_path, model, extra) -> None:
    t = make_ticket(tmp_path, model, *extra)
    module = t.to_module()
    x = inputs()
    expected = slt_logits(t, x)
    # same weight tensor, same F.conv2d / F.linear / batch_norm calls: bit-identical on a CPU
    assert torch.equal(logits(module, x), expected)
    assert not module.training
    for name, mask in export_mod.layer_masks(t).items():
        weight = module.get_submodule(name).weight
        assert weight.requires_grad and not bool(weight[~mask].any())  # zeros off the mask


@pytest.mark.parametrize("model", ["conv4", "resnet50"])
def test_module_is_plain_torch(tmp_path, model) -> None:
    """Every layer is a torch.nn layer; the only other modules are ResNet containers (slt
    classes with no parameters or buffers of their own whose forward calls torch only)."""
    module = make_ticket(tmp_path, model).to_module()
    containers = (resnet.ResNet, resnet.BasicBlock, resnet.Bottleneck)
    for m in module.modules():
        assert not isinstance(m, MaskedLayer)
        if type(m).__module__.startswith("torch.nn."):
            continue
        assert isinstance(m, containers), type(m)
        assert not m._parameters and not m._buffers
    kinds = {type(m) for m in module.modules() if not list(m.children())}
    assert {nn.Conv2d, nn.Linear} <= kinds
    assert all(m.bias is None for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@pytest.mark.cuda
def test_module_on_cuda_matches_within_float32_rounding(tmp_path) -> None:
    t = make_ticket(tmp_path, "resnet20")
    x = inputs().cuda()
    net = ticket.rebuild(t, torch.device("cuda")).eval()
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(logits(t.to_module("cuda"), x), expected, rtol=1e-5, atol=1e-6)


def test_module_reproduces_the_runs_test_accuracy(tmp_path) -> None:
    cfg = resolve.load("quick.toml", ["search.epochs=1", "data.train_size=4096",
                                      "data.test_size=1024", "run.progress=false"])
    result = run_search(cfg, tmp_path, log=quiet)
    t = ticket.load(result.run_dir / "ticket.slt")
    module = t.to_module()
    batches = Batches(load_data(cfg.data), torch.device("cpu"))
    correct = n = 0
    with torch.no_grad():
        for x, y in batches.test_batches(256):  # slt's normalised test inputs, plain torch
            correct += int((module(x).argmax(1) == y).sum())
            n += y.numel()
    assert correct / n == result.summary["final_test_acc"]
    assert 0.2 < correct / n  # well above chance (0.1): a real ticket, not an empty one

    # The state_dict file loads into hand-written torch code: no slt needed to use it.
    path = tmp_path / "quick.pt"
    export_mod.export(t, path, "state_dict")
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 256, bias=False), nn.ReLU(),
                          nn.Linear(256, 256, bias=False), nn.ReLU(),
                          nn.Linear(256, 10, bias=False))
    plain.load_state_dict(torch.load(path, weights_only=True))
    x = next(batches.test_batches(64))[0]
    assert torch.equal(logits(plain, x), logits(module, x))


@pytest.mark.parametrize("model", ["conv4", "resnet20"])
def test_state_dict_round_trips(tmp_path, model) -> None:
    t = make_ticket(tmp_path, model)
    module, x = t.to_module(), inputs()
    path = tmp_path / "m.pt"
    size = export_mod.export(t, path, "state_dict")
    assert size == path.stat().st_size
    fresh = fresh_copy(module)
    assert not torch.equal(logits(fresh, x), logits(module, x))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(logits(fresh, x), slt_logits(t, x))


@pytest.mark.parametrize("model", ["conv4", "resnet20"])
def test_prune_form_applies_with_custom_from_mask(tmp_path, model) -> None:
    t = make_ticket(tmp_path, model)
    module, x = t.to_module(), inputs()
    path = tmp_path / "p.pt"
    export_mod.export(t, path, "prune")
    state = torch.load(path, weights_only=True)
    masks = export_mod.layer_masks(t)
    assert {k for k in state if k.endswith((".weight_orig", ".weight_mask"))} == {
        f"{n}.{s}" for n in masks for s in ("weight_orig", "weight_mask")}
    assert not any(k.endswith(".weight") and k[:-7] in masks for k in state)
    fresh = fresh_copy(module)
    for key, mask in state.items():
        if key.endswith(".weight_mask"):
            prune.custom_from_mask(fresh.get_submodule(key[:-12]), "weight", mask)
    fresh.load_state_dict(state)
    assert all(prune.is_pruned(fresh.get_submodule(n)) for n in masks)
    assert torch.equal(logits(fresh, x), slt_logits(t, x))
    for name, mask in masks.items():
        assert torch.equal(state[f"{name}.weight_mask"], mask.float())
        # torch's pruning recomputes weight = weight_orig * weight_mask in every forward
        assert torch.equal(fresh.get_submodule(name).weight, module.get_submodule(name).weight)
    prune.remove(fresh.get_submodule(next(iter(masks))), "weight")  # torch's utilities work


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")  # torch.load's note
@pytest.mark.parametrize("fmt", ["state_dict", "prune"])
@pytest.mark.parametrize(("model", "extra"), [
    ("mlp", ()), ("resnet20", ()), ("conv4", ("model.first_layer_dense=true",)),
])
def test_sparse_files_are_smaller_and_densify_to_the_same_tensors(tmp_path, fmt, model,
                                                                  extra) -> None:
    t = make_ticket(tmp_path, model, *extra, width=0.25, density=0.05)
    dense_path, sparse_path = tmp_path / "dense.pt", tmp_path / "sparse.pt"
    dense_size = export_mod.export(t, dense_path, fmt)
    sparse_size = export_mod.export(t, sparse_path, fmt, sparse=True)
    dense = torch.load(dense_path, weights_only=True)
    assert load_state_dict(dense_path).keys() == dense.keys()
    densified = load_state_dict(sparse_path)
    assert list(densified) == list(dense)
    for key, value in dense.items():
        assert densified[key].dtype == value.dtype and torch.equal(densified[key], value), key
    blob = torch.load(sparse_path, weights_only=True)  # the documented layout, by hand
    by_hand = {k: v.to_dense().float().reshape(blob["shapes"][k]) if k in blob["shapes"]
               else v for k, v in blob["state_dict"].items()}
    assert all(torch.equal(by_hand[k], v) for k, v in dense.items())
    for key in blob["shapes"]:
        csr = blob["state_dict"][key]
        assert csr.layout == torch.sparse_csr and csr.dim() == 2
        assert csr.crow_indices().dtype == torch.int32
    if model == "mlp":  # big layers at density 0.05: CSR is a small fraction of dense
        assert sparse_size * 4 < dense_size
    else:
        assert sparse_size < dense_size
    if "model.first_layer_dense=true" in extra:  # a dense layer stays dense: CSR would cost more
        first = next(iter(export_mod.layer_masks(t)))
        assert not any(k.startswith(f"{first}.") for k in blob["shapes"])


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra (onnx, onnxscript) is not installed")
@pytest.mark.parametrize("model", ["conv4", "resnet20"])
def test_onnx_graph_is_valid_and_gives_the_logits(tmp_path, model) -> None:
    import onnx

    t = make_ticket(tmp_path, model)
    path = tmp_path / "m.onnx"
    export_mod.export(t, path, "onnx")
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["input"]
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed: the graph is checked, not run")
    import onnxruntime

    x = inputs(7)  # another batch size than the export's example: the batch is dynamic
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"input": x.numpy()})
    # onnxruntime's kernels sum in another order than torch's: float32 rounding only
    torch.testing.assert_close(torch.from_numpy(out), slt_logits(t, x), rtol=1e-5, atol=1e-5)


def test_onnx_without_the_extra_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    t = make_ticket(tmp_path, "mlp")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ExportError, match="needs the onnx extra: pip install onnx onnxscript"):
        EXPORTS.get("onnx")(t, False)
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "mlp.slt"), "--format", "onnx", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"slt: error: {export_mod.ONNX_MISSING}"]
    assert "pip install onnx onnxscript (or pip install '.[onnx]'" in err[0]
    assert not out.exists()
    with pytest.raises(ConfigError, match="--sparse applies to the state_dict and prune"):
        EXPORTS.get("onnx")(t, True)


def test_fine_tuning_trains_and_drops_the_sparsity_unless_pruned(tmp_path) -> None:
    t = make_ticket(tmp_path, "mlp")
    masks = export_mod.layer_masks(t)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, *SPEC.shape, generator=gen), torch.randint(0, 10, (64,), generator=gen)

    def step(module: nn.Module) -> tuple[float, float]:
        module.train()
        opt = torch.optim.SGD(module.parameters(), lr=0.01)
        loss = F.cross_entropy(module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            return float(loss.detach()), float(F.cross_entropy(module(x), y))

    plain = t.to_module()
    before, after = step(plain)
    assert after < before
    first, mask = next(iter(masks.items()))
    # plain fine-tuning updates every weight: the zeros off the mask were only initial values
    assert bool(plain.get_submodule(first).weight[~mask].any())

    pruned = t.to_module()
    for name, m in masks.items():
        prune.custom_from_mask(pruned.get_submodule(name), "weight", m)
    before, after = step(pruned)
    assert after < before
    for name, m in masks.items():  # the prune form keeps the ticket's sparsity
        assert not bool(pruned.get_submodule(name).weight[~m].any())


def test_to_module_on_a_device(tmp_path) -> None:
    module = to_module(make_ticket(tmp_path, "mlp"), device="meta")
    assert all(p.device.type == "meta" for p in module.parameters())


# --- the command ----------------------------------------------------------------------------

def test_cli_writes_the_file_and_prints_its_size(tmp_path, capsys) -> None:
    t = make_ticket(tmp_path, "mlp", width=0.25, density=0.05)
    src = str(tmp_path / "mlp.slt")
    sizes = {}
    for sparse in ([], ["--sparse"]):
        out = tmp_path / f"m{len(sparse)}.pt"
        assert main(["export", src, "--format", "state_dict", "--out", str(out), *sparse]) == 0
        line = capsys.readouterr().out.strip()
        sizes[bool(sparse)] = out.stat().st_size
        assert line == (f"wrote {out} (state_dict{', sparse CSR' if sparse else ''}): "
                        f"{out.stat().st_size} bytes")
    assert sizes[True] * 4 < sizes[False]
    module = t.to_module()
    module.load_state_dict(load_state_dict(tmp_path / "m1.pt"))
    assert torch.equal(logits(module, inputs()), slt_logits(t, inputs()))


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "stat_dict"], "slt: error: unknown export format 'stat_dict' (did you mean "
                                "'state_dict'?); known: onnx, prune, state_dict"),
    (["--format", "onnx", "--sparse"], "slt: error: --sparse applies to the state_dict and "
                                       "prune formats"),
])
def test_cli_bad_format_is_one_line_exit_2(tmp_path, capsys, args, message) -> None:
    make_ticket(tmp_path, "mlp")
    out = tmp_path / "m.pt"
    assert main(["export", str(tmp_path / "mlp.slt"), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not out.exists()


def test_cli_missing_ticket_is_one_line_exit_2(tmp_path, capsys) -> None:
    out = tmp_path / "m.pt"
    assert main(["export", str(tmp_path / "nope.slt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slt: error: cannot read ticket")
    assert not out.exists()


def test_cli_replaces_an_output_atomically(tmp_path, capsys, monkeypatch) -> None:
    t = make_ticket(tmp_path, "mlp")
    src, out = str(tmp_path / "mlp.slt"), tmp_path / "m.pt"
    out.write_bytes(b"old content")
    assert main(["export", src, "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True).keys() == t.to_module().state_dict().keys()
    first = out.read_bytes()
    # a failure while writing (a full disk) leaves the old file whole and no temporary file
    import slt.fileio

    def full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(slt.fileio.os, "fsync", full)
    assert main(["export", src, "--format", "prune", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"slt: error: cannot write {out}: No space left on device"
    assert out.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "mlp.slt"]
