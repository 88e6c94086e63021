"""A dataset held on the device as tensors (airbench's way): batches in the seeded epoch
order, augmentation as tensor ops."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from slt.data.order import BatchSource, check_batch_size, crop_flip, epoch_order, rank_slice
from slt.data.splits import Splits
from slt.spec import DataSpec


class Batches(BatchSource):
    """Batches of one dataset on one device: shuffled (and augmented) train, ordered test."""

    def __init__(self, splits: Splits, device: torch.device) -> None:
        self.splits = splits
        self.device = torch.device(device)
        self.augment = splits.augment
        # Moved once: every epoch after that is gathers on the device.
        self.train_x = splits.train_x.to(self.device)
        self.train_y = splits.train_y.to(self.device)
        self.test_x = splits.test_x.to(self.device)
        self.test_y = splits.test_y.to(self.device)
        self._images = splits.train_x.dtype == torch.uint8
        view = (1, -1, 1, 1) if self.train_x.dim() == 4 else (1, -1)
        self._mean = torch.tensor(splits.mean, dtype=torch.float32, device=self.device).view(view)
        self._std = torch.tensor(splits.std, dtype=torch.float32, device=self.device).view(view)

    @property
    def spec(self) -> DataSpec:
        """The examples' shape and class count (as `StreamBatches.spec`)."""
        return self.splits.spec


    def train_epoch(self, epoch: int, batch_size: int, seed: int, start_step: int = 0,
                    rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the training set in the order (and augmentation) of (seed, epoch),
        from global batch `start_step` on (a resume inside the epoch).

        The draws are made on the CPU and moved, so a CPU and a GPU run see the same order
        and the same crops and flips. The last batch may be smaller; nothing is dropped.
        With `world` processes, each yields its part (`rank_slice`) of every global batch.
        """
        check_batch_size(batch_size)
        n = self.n_train
        order = epoch_order(n, self.augment, seed, epoch)
        perm = order.perm.to(self.device)  # moved once: each batch is a gather on the device
        crops = [t.to(self.device) for t in order.crops]
        for start in range(start_step * batch_size, n, batch_size):
            lo, hi = rank_slice(start, min(start + batch_size, n), rank, world)
            idx = perm[lo:hi]
            x = self.train_x[idx]
            if self.augment:
                x = crop_flip(x, *(t[lo:hi] for t in crops))
            yield self.normalise(x), self.train_y[idx]

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The test set in order, normalised, never augmented."""
        check_batch_size(batch_size)
        for start in range(0, self.n_test, batch_size):
            stop = start + batch_size
            yield self.normalise(self.test_x[start:stop]), self.test_y[start:stop]
