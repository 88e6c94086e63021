"""A ticket as a plain PyTorch module, and the files `slt export` writes from it.

`to_module` rebuilds the ticket's network and swaps every masked layer for a standard
`nn.Conv2d` / `nn.Linear` whose weight is the layer's effective weight (what the masked
layer's forward multiplies by: frozen weight * mask, or the scoring rule's own form), so
the module computes exactly what slt's network computes, with no slt layer left in it.

Export formats form a registry (`EXPORTS`): a function `(ticket, sparse) -> bytes`, written
atomically by `export`. With `sparse`, weights that the ticket mostly prunes are stored as
CSR tensors (layout: the comment on `SPARSE_KEY`, and docs/export.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from slt.arguments import bool_arg, device_arg, path_arg, shown, ticket_arg
from slt.config.checks import is_reference
from slt.errors import ConfigError, ExportError, TicketError, first_line, storage_error
from slt.fileio import atomic_write_bytes, output_file, torch_file_problem
from slt.layers import MaskedConv2d, MaskedLayer, MaskedLinear
from slt.models import restore
from slt.registry import Registry

if TYPE_CHECKING:
    from slt.ticket import Ticket

ExportFormat = Callable[["Ticket", bool], bytes]
EXPORTS: Registry[ExportFormat] = Registry("export format")

# A sparse file is {SPARSE_KEY: 1, "state_dict": {...}, "shapes": {key: [dims]}}: the keys of
# "shapes" hold 2-D CSR tensors (int32 indices; a conv weight (out, in, kh, kw) reshaped to
# (out, in * kh * kw)), to densify as `v.to_dense().float().reshape(shapes[key])`; every
# other entry is the dense tensor itself. A prune mask's CSR shares its weight's indices
# (torch.save stores them once) and holds bool values; densified it is float, as torch's.
SPARSE_KEY = "slt_sparse"
# Not `pip install 'slt[onnx]'`: the name slt on PyPI is another project (docs/install.md).
ONNX_MISSING = ("--format onnx needs the onnx extra: pip install onnx onnxscript "
                "(or pip install '.[onnx]' in slt's checkout)")


def to_module(ticket: Ticket, device: str | torch.device = "cpu",
              trust_model: bool = False) -> nn.Module:
    """The ticket as a module of standard torch layers, in eval mode, on `device`; for a
    model reference, an instance of the user's own class (a torchvision ResNet, a timm
    VisionTransformer) with the ticket's weights in its parameters.

    Weights are zero where the mask is off; BatchNorm keeps the ticket's statistics. Inputs
    are what slt's network takes: normalised by the data (slt.data), not by the module.
    `device`: cpu, cuda, cuda:N or auto (cuda when present), checked before the rebuild.
    `trust_model`: rebuild a `python:` reference (it imports the code the ticket names).
    """
    from slt.engine.platform import resolve_device
    from slt.ticket import rebuild

    ticket = ticket_arg(ticket)
    name = device_arg(device, any_torch=True) or "cpu"
    target = resolve_device(name) if name in ("auto", "cuda") else torch.device(name)
    net = rebuild(ticket, torch.device("cpu"), trust_model or ticket.trust_model)
    body = net.body
    if is_reference(ticket.config.model.name):  # the user's own class, weights in place
        with torch.no_grad():
            return restore(body).to(target).eval()
    with torch.no_grad():
        for parent in list(body.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, MaskedLayer):
                    setattr(parent, name, _plain_layer(child))
    return body.to(target).eval()


def _plain_layer(layer: MaskedLayer) -> nn.Module:
    """The torch layer that computes what `layer` computes (its bias-free forward)."""
    weight = layer.weight().detach().clone()
    if isinstance(layer, MaskedConv2d):
        out_ch, in_ch, kh, kw = layer.weight_shape
        plain: nn.Module = nn.Conv2d(in_ch, out_ch, (kh, kw), stride=layer.stride,
                                     padding=layer.padding, bias=False)
    elif isinstance(layer, MaskedLinear):
        plain = nn.Linear(layer.weight_shape[1], layer.weight_shape[0], bias=False)
    else:
        raise TicketError(f"cannot export a {type(layer).__name__} layer: only MaskedConv2d "
                          "and MaskedLinear have a standard torch counterpart")
    plain.weight = nn.Parameter(weight.view(layer.weight_shape))
    return plain


def layer_masks(ticket: Ticket) -> dict[str, Tensor]:
    """The boolean ticket mask of every prunable layer, by its name in `to_module`'s module
    (all ones for a layer kept dense)."""
    return {tl.name: tl.mask for tl in ticket.layers}


def weight_masks(ticket: Ticket) -> dict[str, Tensor]:
    """The masks of `layer_masks` by their weight's key in `to_module`'s state dict: the
    layer `fc` of a built-in model has `fc.weight`; a model reference's layers are named
    by their parameters already (`head.weight`, `attn.in_proj_weight`)."""
    reference = is_reference(ticket.config.model.name)
    return {name if reference else f"{name}.weight": mask
            for name, mask in layer_masks(ticket).items()}


def export(ticket: Ticket, path: str | os.PathLike[str], fmt: str, sparse: bool = False,
           *, inputs: Iterable[str | os.PathLike[str]] = (), trust_model: bool = False) -> int:
    """Write the ticket in format `fmt` to `path` atomically (an old file stays whole until
    the new one is complete); returns the file's size in bytes. `path` must be a new file
    or a regular file that is none of `inputs` nor the ticket's own file; a symlink is
    written through: slt.fileio.output_file says why, in one StorageError line."""
    ticket_arg(ticket)
    if not isinstance(fmt, str):
        raise ConfigError(f"fmt must be an export format name ({', '.join(EXPORTS.names())}), "
                          f"got {shown(fmt)}")
    sparse = bool(bool_arg(sparse, "sparse"))
    if bool_arg(trust_model, "trust_model"):
        ticket = dataclasses.replace(ticket, trust_model=True)
    own = (ticket.path,) if ticket.path is not None else ()  # the file it was read from
    target = output_file(path_arg(path, "path"), (*inputs, *own))  # before the export
    data = EXPORTS.get(fmt)(ticket, sparse)
    atomic_write_bytes(target, data)
    return len(data)


def _save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@EXPORTS.register("state_dict")
def state_dict_bytes(ticket: Ticket, sparse: bool) -> bytes:
    """`to_module(ticket).state_dict()`; with `sparse`, mostly-pruned weights as CSR."""
    sparse = _format_args(ticket, sparse)
    state = to_module(ticket).state_dict()
    if not sparse:
        return _save(state)
    out: dict[str, Tensor] = dict(state)
    shapes: dict[str, list[int]] = {}
    for key, mask in weight_masks(ticket).items():
        if _csr_pays(mask, value_bytes=4, dense_bytes=4):
            out[key], _ = _csr(state[key], mask)
            shapes[key] = list(mask.shape)
    return _save({SPARSE_KEY: 1, "state_dict": out, "shapes": shapes})


@EXPORTS.register("prune")
def prune_bytes(ticket: Ticket, sparse: bool) -> bytes:
    """torch.nn.utils.prune's form: `weight_orig` (the effective weight) and `weight_mask`
    per prunable layer, as `prune.custom_from_mask` leaves a module's state dict."""
    sparse = _format_args(ticket, sparse)
    module = to_module(ticket)
    masks = weight_masks(ticket)
    for key, mask in masks.items():
        owner, _, attr = key.rpartition(".")
        prune.custom_from_mask(module.get_submodule(owner), attr, mask)
    state = module.state_dict()
    if not sparse:
        return _save(state)
    out: dict[str, Tensor] = dict(state)
    shapes: dict[str, list[int]] = {}
    for key, mask in masks.items():
        if _csr_pays(mask, value_bytes=4 + 1, dense_bytes=4 + 4):
            orig, kept = _csr(state[f"{key}_orig"], mask)
            out[f"{key}_orig"], out[f"{key}_mask"] = orig, kept
            shapes[f"{key}_orig"] = shapes[f"{key}_mask"] = list(mask.shape)
    return _save({SPARSE_KEY: 1, "state_dict": out, "shapes": shapes})


@EXPORTS.register("onnx")
def onnx_bytes(ticket: Ticket, sparse: bool) -> bytes:
    """An ONNX graph of the module (torch's exporter; needs onnx and onnxscript), with a
    dynamic batch dimension: input `input`, output `logits`."""
    if _format_args(ticket, sparse):
        raise ConfigError("--sparse applies to the state_dict and prune formats; the ONNX "
                          "graph stores its weights dense")
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        raise ExportError(ONNX_MISSING)
    module = to_module(ticket)
    example = torch.zeros(2, *ticket.header["spec"]["shape"])
    buf = io.BytesIO()
    names: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"],
                             "verbose": False}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the exporter's progress notes: not ours to print
            if torch.__version__ >= (2, 9):  # the dynamo exporter, torch's default since 2.9
                torch.onnx.export(module, (example,), buf, dynamo=True,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
            else:  # before 2.9 it fails on BatchNorm or wants a path: TorchScript's exporter
                torch.onnx.export(module, (example,), buf, opset_version=17,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                                  **names)
    except Exception as exc:  # the exporter's failures are many and long: one line
        raise ExportError(f"ONNX export failed: {first_line(exc)}") from None
    return buf.getvalue()


def _format_args(ticket: Any, sparse: Any) -> bool:
    """The arguments every export format takes, checked: a Ticket, and sparse a bool."""
    ticket_arg(ticket)
    return bool(bool_arg(sparse, "sparse"))


def _csr_pays(mask: Tensor, value_bytes: int, dense_bytes: int) -> bool:
    """Whether CSR (int32 row pointers and column indices) is smaller than dense."""
    rows, nnz = mask.shape[0], int(mask.sum())
    return 4 * (rows + 1) + nnz * (4 + value_bytes) < mask.numel() * dense_bytes


def _csr(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """2-D CSR tensors of `weight` and of `mask` on the mask's edges, sharing their indices
    (so a weight that is exactly 0 on a kept edge keeps its entry)."""
    keep = mask.reshape(mask.shape[0], -1)
    w2d = weight.detach().reshape(keep.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        structure = keep.to_sparse_csr()
        index = torch.int32 if keep.numel() < 2 ** 31 else torch.int64
        crow = structure.crow_indices().to(index)
        col = structure.col_indices().to(index)
        values = w2d[keep].contiguous()  # row-major, the order of CSR entries
        ones = torch.ones(values.numel(), dtype=torch.bool)
        return (torch.sparse_csr_tensor(crow, col, values, keep.shape, check_invariants=True),
                torch.sparse_csr_tensor(crow, col, ones, keep.shape, check_invariants=True))


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """An exported state_dict or prune file as a dense state dict, sparse or not (what
    `module.load_state_dict` takes); read with `weights_only=True`. A file that is not one
    is one ExportError line; a file that cannot be read, one StorageError line."""
    path = path_arg(path, "path")
    not_ours = f"{path} is not a state dict written by slt export"
    if problem := torch_file_problem(path):
        raise ExportError(f"{not_ours}: {problem}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the loader's note that it checks sparse tensors
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise storage_error(exc, "read", path) from None
    except Exception as exc:  # not a torch file, or one holding more than tensors
        raise ExportError(f"{not_ours} ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(blob, dict):
        raise ExportError(not_ours)
    if SPARSE_KEY not in blob:
        return blob
    shapes, state = blob.get("shapes"), blob.get("state_dict")
    if not isinstance(shapes, dict) or not isinstance(state, dict):
        raise ExportError(f"{not_ours}: its sparse layout lacks 'shapes' or 'state_dict'")
    try:
        return {k: v.to_dense().float().reshape(shapes[k]) if k in shapes else v
                for k, v in state.items()}
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        raise ExportError(f"{not_ours}: a sparse entry does not densify to its recorded "
                          f"shape ({first_line(exc)})") from None
