"""What a run measures of a network: test loss and accuracy, and, once its ticket is
found, the records written beside it (effective density, the plant's recovery)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from slt.data.memory import Batches
from slt.data.stream import StreamBatches
from slt.effective import effective_density
from slt.errors import first_line
from slt.network import SltNetwork
from slt.plant import plant_record, planted_in_source


@torch.no_grad()
def evaluate(net: SltNetwork, batches: Batches | StreamBatches,
             batch_size: int) -> tuple[float, float]:
    """(loss, accuracy) on the test split, masks computed once."""
    net.eval()
    if not net.fixed:
        net.refresh()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in batches.test_batches(batch_size):
        out = net.apply_body(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += y.numel()
    return loss_sum / n, correct / n


def effective_records(net: SltNetwork, masks: Sequence[Tensor] | None,
                      input_shape: Sequence[int]) -> dict[str, Any]:
    """Effective density of the ticket and of its source, as summary.json keeps them."""
    ticket = effective_density(net, masks, tuple(input_shape)).to_dict()
    source = effective_density(net, None, tuple(input_shape)).to_dict()
    return {"effective_density": ticket["effective_density"],
            "effective": {"ticket": ticket, "source": source}}


def measured_effective(net: SltNetwork, masks: Sequence[Tensor] | None,
                       input_shape: Sequence[int]) -> dict[str, Any]:
    """`effective_records`, or {"effective_error": why} with a warning when the trace
    fails (a user's model it cannot take): what is measured beside a ticket never costs
    the ticket itself."""
    try:
        return effective_records(net, masks, input_shape)
    except Exception as exc:  # the user's forward: any error, one line
        why = f"{type(exc).__name__}: {first_line(exc)}"
        warnings.warn(f"effective density not measured: {why}", stacklevel=2)
        return {"effective_error": why}


def ticket_records(net: SltNetwork, masks: Sequence[Tensor],
                   batches: Batches | StreamBatches, eval_batch_size: int) -> dict[str, Any]:
    """The records of a found ticket: its effective density, and with a plant, how much of
    the plant the source kept and the ticket found, and the accuracy of the plant
    restricted to the source with no search at all. Leaves the network fixed on that
    plant when there is one (call it last). A trace that fails (a model it cannot take)
    is recorded as `effective_error`, so a finished search still writes its summary."""
    records = measured_effective(net, masks, batches.spec.shape)
    if net.plant is not None:
        names = [info.name for info in net.infos if info.searched]
        src = [layer.src_idx for layer in net.searched_layers]
        plant = plant_record(names, src, masks, net.plant)
        net.fix_masks(planted_in_source(src, net.plant))
        plant["accuracy_in_source"] = evaluate(net, batches, eval_batch_size)[1]
        records["plant"] = plant
    return records


def effective_lines(records: dict) -> list[str]:
    """`slt eval`'s lines for `slt.engine.measure.effective_records`: ticket and source in
    total, then the ticket per layer."""
    if "effective_error" in records:
        return [f"  effective density not measured: {records['effective_error']}"]
    ticket, source = records["effective"]["ticket"], records["effective"]["source"]
    lines = [f"  effective density {ticket['effective_density']:.4f} of nominal "
             f"{ticket['nominal_density']:.4f}: {ticket['effective_fraction']:.2%} of the "
             f"ticket's edges on an input-to-output path, {ticket['alive_fraction']:.2%} of "
             "its units alive",
             f"  source: effective density {source['effective_density']:.4f} of nominal "
             f"{source['nominal_density']:.4f} ({source['alive_fraction']:.2%} of units alive)"]
    for row in ticket["layers"]:
        lines.append(f"    {row['name']}: {row['effective']} of {row['present']} edges "
                     f"effective, {row['alive']} of {row['units']} units alive")
    return lines
