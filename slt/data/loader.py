"""`open_batches`: a run's data, held in memory or streamed from files, behind one
interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slt.config.schema import DataConfig
from slt.data.datasets import load_data
from slt.data.memory import Batches

if TYPE_CHECKING:
    from slt.data.stream import StreamBatches


def open_batches(cfg: DataConfig, device: torch.device | str, rank: int = 0, world: int = 1
                 ) -> Batches | StreamBatches:
    """The batches of dataset `cfg.name`: held on the device (`Batches`) by default, read
    from its image files by `data.workers` processes (`slt.data.stream.StreamBatches`) when
    `data.stream`; either gives the same samples in the same order. A DataError before
    anything is written when the dataset is missing, bad, or cannot be read that way."""
    if not cfg.stream:
        return Batches(load_data(cfg), device)
    from slt.data.stream import StreamBatches

    return StreamBatches(cfg, device, rank, world)
