"""Examples in one order everywhere: the seeded epoch permutation, this rank's slice of each
global batch, and the random crop and flip, shared by the in-memory and streamed paths."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from slt.seeding import generator

PAD = 4  # zero padding of the random crop (the CIFAR recipe)


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int = PAD) -> Tensor:
    """Crop every image of `x` (N, C, H, W) from its zero-padded copy, then mirror some.

    Image i is cut at offset (dy[i], dx[i]) in [0, 2 * pad] of the padded image (pad, pad
    is the identity) and mirrored left-right where flip[i]. One gather for the whole batch,
    no per-image Python loop.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # N, H+2p, W+2p, C
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)
    index_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded[index_n, rows[:, :, None], cols[:, None, :]]  # N, H, W, C
    return out.permute(0, 3, 1, 2).contiguous()


class BatchSource:
    """What every batch source (held in memory, or streamed by slt.data.stream) shares: its sizes
    and its normalisation, so both give bit-identical inputs."""

    train_y: Tensor
    test_y: Tensor
    _mean: Tensor
    _std: Tensor
    _images: bool = True

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    @property
    def n_test(self) -> int:
        return len(self.test_y)

    def len_train_batches(self, batch_size: int) -> int:
        return math.ceil(self.n_train / check_batch_size(batch_size))

    def normalise(self, x: Tensor) -> Tensor:
        """float32 (x / 255 - mean) / std for images, (x - mean) / std for vectors."""
        x = x.float()
        if self._images:
            x = x / 255.0
        return (x - self._mean) / self._std


@dataclass(frozen=True)
class EpochOrder:
    """The samples of one epoch in order, and their crop offsets and flips (dy, dx, flip)
    when augmenting: drawn on the CPU from (seed, epoch) alone, so every loader, device,
    world size and resume sees the same."""

    perm: Tensor
    crops: tuple[Tensor, ...] = ()


def epoch_order(n: int, augment: bool, seed: int, epoch: int) -> EpochOrder:
    g = generator("epoch", seed, epoch)
    perm = torch.randperm(n, generator=g)
    if not augment:
        return EpochOrder(perm)
    span = 2 * PAD + 1
    dy = torch.randint(span, (n,), generator=g)
    dx = torch.randint(span, (n,), generator=g)
    flip = torch.randint(2, (n,), generator=g).bool()
    return EpochOrder(perm, (dy, dx, flip))


def rank_slice(start: int, stop: int, rank: int, world: int) -> tuple[int, int]:
    """Positions [lo, hi) of global batch [start, stop) that process `rank` of `world`
    takes: consecutive parts differing in size by at most one, the larger first."""
    size = stop - start
    base, extra = divmod(size, world)
    lo = start + rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def check_batch_size(batch_size: int) -> int:
    """The batch size, refused when not positive (both batch sources take it)."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    return batch_size
