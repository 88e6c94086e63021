"""Train and test splits as tensors, checked when made (counts, labels, shapes), and the
subsets a config asks for (limits, balanced subsets)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from slt.errors import DataError
from slt.spec import DataSpec


@dataclass(frozen=True)
class Part:
    """One place a split was read from (an idx file pair, a CIFAR pickle, a class tree) and
    how many images and labels it gave: lets a check name the file at fault."""

    images: str
    labels: str  # the images' own path when one file or folder holds both
    n_images: int
    n_labels: int


@dataclass(frozen=True)
class Origin:
    """Where a dataset's splits came from, in reading order (for error messages only)."""

    dataset: str
    train: tuple[Part, ...] = ()
    test: tuple[Part, ...] = ()


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset in memory: uint8 (N, C, H, W) images or float32 (N, D) vectors, int64 labels.

    `mean` / `std` are per channel in [0, 1] pixel units (vectors: 0 and 1), applied per
    batch so the stored images stay uint8 (4x less memory on the device). Building one
    runs `check_splits`, so no loader (plug-ins included) can hand the search bad data.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    spec: DataSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    origin: Origin | None = None

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError("Splits: mean and std differ in length")
        check_splits(self)


def check_splits(splits: Splits) -> None:
    """One DataError naming the file or folder at fault when a split is empty, its images
    and labels differ in count, its images are not of `spec.shape`, or a label is outside
    [0, num_classes): caught at load time, not as an IndexError (or a device assert) after
    the run directory was written."""
    origin = splits.origin
    head = f"dataset {origin.dataset}" if origin is not None else "dataset"
    for split, x, y, parts in (
        ("train", splits.train_x, splits.train_y, origin.train if origin else ()),
        ("test", splits.test_x, splits.test_y, origin.test if origin else ()),
    ):
        if sum(p.n_images for p in parts) != len(x) or sum(p.n_labels for p in parts) != len(y):
            parts = ()  # a loader's bookkeeping that does not add up: name the split only
        where = _places(parts, "images") or f"the {split} split"
        for p in parts:
            if p.n_images != p.n_labels:
                if p.images == p.labels:
                    raise DataError(f"{head}: {p.images} holds {p.n_images} images but "
                                    f"{p.n_labels} labels; the file is damaged, replace it")
                raise DataError(f"{head}: {p.labels} holds {p.n_labels} labels but "
                                f"{p.images} holds {p.n_images} images; one of them is "
                                f"truncated or from another release, replace both")
        if len(x) != len(y):
            raise DataError(f"{head}: the {split} split has {len(x)} images but "
                            f"{len(y)} labels")
        if len(x) == 0:
            raise DataError(f"{head}: {where} holds no images: the {split} split is empty"
                            if parts else f"{head}: the {split} split holds no images")
        if tuple(x.shape[1:]) != tuple(splits.spec.shape):
            like = " as in the train split" if split == "test" else ""
            raise DataError(f"{head}: {where} holds examples of shape "
                            f"{shape_of(x.shape[1:])}, expected {shape_of(splits.spec.shape)}"
                            f"{like}; make every image one size")
        if y.dim() != 1 or y.dtype != torch.int64:
            raise DataError(f"{head}: labels of the {split} split are "
                            f"{y.dtype} of shape {tuple(y.shape)}, expected int64 (N,)")
        k = splits.spec.num_classes
        bad = ((y < 0) | (y >= k)).nonzero()
        if len(bad):
            i = int(bad[0])
            file, j = _locate(parts, i, f"the {split} split")
            raise DataError(f"{head}: {file} holds label {int(y[i])} (example {j}), "
                            f"outside the {k} classes 0..{k - 1}")


def shape_of(shape: Sequence[int]) -> str:
    """28x28 for messages."""
    return "x".join(str(int(s)) for s in shape)


def _places(parts: Sequence[Part], field: str) -> str:
    return ", ".join(dict.fromkeys(getattr(p, field) for p in parts))


def _locate(parts: Sequence[Part], index: int, fallback: str) -> tuple[str, int]:
    """The labels file holding example `index` of a split, and its index in that file."""
    for p in parts:
        if index < p.n_labels:
            return p.labels, index
        index -= p.n_labels
    return fallback, index


def limited_subset(labels: Tensor, limit: int, split: str, dataset: str) -> Tensor:
    """`balanced_subset` of a split for `data.<split>_limit`, after checking that the
    limit describes the subset used: a DataError when it exceeds the split (the run would
    use every example while its id, which hashes the limit, claims a subset) or cannot
    give each class of the split one example (a different task, not a smaller one)."""
    if limit:
        n, classes = len(labels), int(torch.unique(labels).numel())
        key = f"data.{split}_limit = {limit}"
        if limit > n:
            raise DataError(f"{key} exceeds the {n} {split} examples of dataset {dataset}: "
                            f"the run would use all {n} while its id names {limit}; set it "
                            f"to at most {n}, or to 0 for all")
        if limit < classes:
            raise DataError(f"{key} is fewer than the {classes} classes of the {split} "
                            f"split of dataset {dataset}: some classes would have no "
                            f"example; set it to at least {classes}, or to 0 for all")
    return balanced_subset(labels, limit)


def balanced_subset(labels: Tensor, limit: int) -> Tensor:
    """Indices of `limit` examples taken class by class in turn, each class in index order:
    the same subset every time and for every loader (in memory or streamed); all of them
    when `limit` is 0 or not below the number of examples."""
    n = len(labels)
    if limit <= 0 or limit >= n:
        return torch.arange(n)
    order = torch.argsort(labels, stable=True)  # by class, index order within a class
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank_in_class = torch.arange(n) - starts  # 0 for a class's first example, 1, ...
    # round robin: every class's first example, then every class's second, ...
    turn = torch.argsort(rank_in_class * (int(labels.max()) + 1) + sorted_labels, stable=True)
    return torch.sort(order[turn[:limit]]).values


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, from the training set.

    Exact, from a 256-bin histogram per channel: no float copy of the whole dataset.
    A constant channel gets std 1 so normalising never divides by zero.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        mean = float((counts * levels).sum() / counts.sum())
        var = float((counts * (levels - mean) ** 2).sum() / counts.sum())
        means.append(mean)
        stds.append(math.sqrt(var) if var > 0 else 1.0)
    return tuple(means), tuple(stds)
