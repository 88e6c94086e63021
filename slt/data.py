"""Datasets as in-memory tensors; batching, normalisation and augmentation as tensor ops.

Every dataset is small enough to live in memory (and on the GPU) as one tensor, so an
epoch is a permutation and a few batched gathers on the run's device (as airbench does)
instead of a per-image PIL pipeline in worker processes. All randomness comes from
generators seeded by (seed, epoch), never from global RNG state, so an epoch's batches are
the same whenever it is run: this is what makes a resumed search exact.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slt.config import DataConfig, default_data_root
from slt.errors import DataError, first_line
from slt.pickles import ForbiddenPickle, as_array, load_array_pickle
from slt.registry import Registry
from slt.seeding import generator
from slt.spec import DataSpec

if TYPE_CHECKING:
    from slt.stream import StreamBatches

PAD = 4  # zero padding of the random crop (the CIFAR recipe)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


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
                            f"{_shape(x.shape[1:])}, expected {_shape(splits.spec.shape)}"
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


def _shape(shape: Sequence[int]) -> str:
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


DATASETS: Registry[Callable[[DataConfig], Splits]] = Registry("dataset")


def load_data(cfg: DataConfig) -> Splits:
    """The dataset `cfg.name`, loaded whole into memory and checked (`check_splits`); a
    DataError naming the file when it is missing or bad, before anything is written.
    `data.train_limit` / `data.test_limit` keep a class-balanced subset (`balanced_subset`)."""
    splits = DATASETS.get(cfg.name)(cfg)
    if not (cfg.train_limit or cfg.test_limit):
        return splits
    train = limited_subset(splits.train_y, cfg.train_limit, "train", cfg.name)
    test = limited_subset(splits.test_y, cfg.test_limit, "test", cfg.name)
    return dataclasses.replace(
        splits, train_x=splits.train_x[train], train_y=splits.train_y[train],
        test_x=splits.test_x[test], test_y=splits.test_y[test], origin=None)


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


# --- batching ------------------------------------------------------------------------------


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
    """What every batch source (held in memory, or streamed by slt.stream) shares: its sizes
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
        return math.ceil(self.n_train / _check_batch_size(batch_size))

    def normalise(self, x: Tensor) -> Tensor:
        """float32 (x / 255 - mean) / std for images, (x - mean) / std for vectors."""
        x = x.float()
        if self._images:
            x = x / 255.0
        return (x - self._mean) / self._std


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
        _check_batch_size(batch_size)
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
        _check_batch_size(batch_size)
        for start in range(0, self.n_test, batch_size):
            stop = start + batch_size
            yield self.normalise(self.test_x[start:stop]), self.test_y[start:stop]


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


def open_batches(cfg: DataConfig, device: torch.device | str, rank: int = 0, world: int = 1
                 ) -> Batches | StreamBatches:
    """The batches of dataset `cfg.name`: held on the device (`Batches`) by default, read
    from its image files by `data.workers` processes (`slt.stream.StreamBatches`) when
    `data.stream`; either gives the same samples in the same order. A DataError before
    anything is written when the dataset is missing, bad, or cannot be read that way."""
    if not cfg.stream:
        return Batches(load_data(cfg), device)
    from slt.stream import StreamBatches

    return StreamBatches(cfg, device, rank, world)


def _check_batch_size(batch_size: int) -> int:
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    return batch_size


# --- shared helpers of the loaders -----------------------------------------------------------


def data_root(cfg: DataConfig) -> Path:
    """cfg.root (or $SLT_DATA / ./data when empty) as an absolute path, `~` expanded."""
    # abspath, not resolve(): messages then show the path as the user wrote it, symlinks kept.
    return Path(os.path.abspath(os.path.expanduser(cfg.root or default_data_root())))


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


def _image_splits(cfg: DataConfig, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                  num_classes: int, origin: Origin) -> Splits:
    """Splits of uint8 images; the crop+flip recipe only for 32x32 colour images.

    An empty train split gets NaN statistics, which `check_splits` rejects before use."""
    shape = tuple(train[0].shape[1:])
    mean, std = channel_stats(train[0])
    return Splits(train[0], train[1], test[0], test[1], DataSpec(shape, num_classes),
                  mean, std, augment=cfg.augment and shape == (3, 32, 32), origin=origin)



def _missing(name: str, places: Sequence[Path], holding: str, download: bool = True) -> DataError:
    where = " or ".join(str(p) for p in places)
    fix = f"set data.root or $SLT_DATA to the folder holding {holding}"
    if download:
        fix += ", or set data.download = true"
    return DataError(f"dataset {name} not found in {where}: {fix}")


def _torchvision_split(name: str, cls: type, cfg: DataConfig, train: bool, folder: str,
                       holding: str, places: Sequence[Path] = ()) -> Any:
    """torchvision's dataset object, with its failures turned into one-line DataErrors."""
    root = data_root(cfg)
    try:
        return cls(str(root), train=train, download=cfg.download)
    except RuntimeError as exc:
        if "Dataset not found" in str(exc):
            raise _missing(name, places or [root / folder], holding) from None
        if cfg.download:
            raise DataError(f"dataset {name}: download into {root} failed: "
                            f"{first_line(exc)}") from None
        raise DataError(f"dataset {name}: cannot read {root / folder}: "
                        f"{first_line(exc)}") from None
    except OSError as exc:
        raise DataError(f"dataset {name}: cannot read or download into {root / folder}: "
                        f"{first_line(exc)}") from None


# --- MNIST-like ------------------------------------------------------------------------------

IDX_UBYTE = 0x0800  # idx magic: 0x00 0x00, type 0x08 (unsigned byte), then the number of dims


def read_idx(path: Path, ndim: int, name: str) -> Tensor:
    """An idx file of unsigned bytes (MNIST's format) with `ndim` dimensions, as uint8.

    Read here rather than by torchvision, whose reader fails on a damaged file with a bare
    assert or a view error that names no file; this one says which file and what is wrong.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"dataset {name}: cannot read {path}: {exc.strerror or exc}") from None
    header = 4 * (ndim + 1)
    expected_magic = IDX_UBYTE + ndim
    if len(raw) < header:
        raise DataError(f"dataset {name}: {path} is {len(raw)} bytes, too short for an idx "
                        f"header; the file is truncated, replace it")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"dataset {name}: {path} is not an idx file of {ndim}-d unsigned bytes "
                        f"(magic 0x{magic:08x}, expected 0x{expected_magic:08x})")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    size = math.prod(dims)
    if len(raw) - header != size:
        layout = f"{_shape(dims)} = {size}" if ndim > 1 else f"{size}"
        raise DataError(f"dataset {name}: {path} should hold {layout} bytes after its header "
                        f"but holds {len(raw) - header}; the file is truncated or damaged, "
                        f"replace it")
    if size == 0:
        return torch.zeros(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(dims)


def _mnist_like(name: str, cls_name: str, cfg: DataConfig) -> Splits:
    """torchvision's raw idx files, read by `read_idx`; torchvision itself only downloads
    them (data.download) or reads a legacy processed copy."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    raw = data_root(cfg) / cls_name / "raw"
    parts, places = [], []
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
        if not (images.is_file() and labels.is_file()):
            ds = _torchvision_split(name, cls, cfg, train, f"{cls_name}/raw", f"{cls_name}/raw")
            if not (images.is_file() and labels.is_file()):  # torchvision's legacy .pt copy
                x, y = ds.data, ds.targets.long()
                where = str(raw.parent / "processed")
                parts.append((x.unsqueeze(1).contiguous(), y))
                places.append(Part(where, where, len(x), len(y)))
                continue
        x, y = read_idx(images, 3, name), read_idx(labels, 1, name).long()
        parts.append((x.unsqueeze(1).contiguous(), y))
        places.append(Part(str(images), str(labels), len(x), len(y)))
    origin = Origin(name, (places[0],), (places[1],))
    return _image_splits(cfg, parts[0], parts[1], 10, origin)


@DATASETS.register("mnist")
def mnist(cfg: DataConfig) -> Splits:
    """MNIST from torchvision's files: 60,000 + 10,000 grey 28x28 digits, no augmentation."""
    return _mnist_like("mnist", "MNIST", cfg)


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg: DataConfig) -> Splits:
    """Fashion-MNIST from torchvision's files: like MNIST, clothes instead of digits."""
    return _mnist_like("fashion_mnist", "FashionMNIST", cfg)


# --- CIFAR -----------------------------------------------------------------------------------


def read_cifar_pickle(path: Path, label_key: str, name: str) -> tuple[Tensor, Tensor]:
    """One batch file of CIFAR's python release: uint8 (N, 3, 32, 32) images and labels.

    Read here rather than by torchvision, which only says "not found or corrupted" for a
    file that fails its checksum; this one names the file and what is wrong with it. The
    file is data from elsewhere: `slt.pickles` admits only what a CIFAR batch holds (no
    code runs), and memory stays within a small multiple of the file's size.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"dataset {name}: cannot read {path}: {exc.strerror or exc}") from None
    not_cifar = f"dataset {name}: {path} is not a CIFAR python batch file"
    try:
        entry = load_array_pickle(raw)
    except ForbiddenPickle as exc:
        raise DataError(f"{not_cifar}: it asks for {first_line(exc)}, which a CIFAR batch "
                        f"never holds (only dicts, lists, strings, numbers and numpy "
                        f"arrays); it was not run; replace the file") from None
    except Exception as exc:  # unpickling a damaged file can raise nearly anything
        raise DataError(f"{not_cifar} ({type(exc).__name__}: {first_line(exc)}); "
                        f"replace it") from None
    if isinstance(entry, dict):  # a Python 3 copy may have bytes keys
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        raise DataError(f"dataset {name}: {path} lacks the 'data' and '{label_key}' entries "
                        f"of a CIFAR python batch file; replace it")
    data = as_array(entry["data"])
    if data is None:
        raise DataError(f"{not_cifar}: its 'data' is a {type(entry['data']).__name__}, "
                        f"not a numpy array; replace it")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"dataset {name}: {path} holds data of shape {data.shape} "
                        f"({data.dtype}), expected uint8 rows of 3072 = 3x32x32 pixels")
    labels = cifar_labels(entry[label_key])
    if labels is None:
        raise DataError(f"dataset {name}: {path} holds '{label_key}' that are not a list of "
                        f"integers; replace it")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels)


def cifar_labels(value: object) -> np.ndarray | None:
    """int64 labels from a list of ints (or an integer array); None for anything else.
    Element by element: `np.asarray` of a list of lists would allocate what they nest."""
    array = as_array(value)
    if array is not None:
        return array.astype(np.int64) if array.ndim == 1 and array.dtype.kind in "iu" else None
    if not isinstance(value, (list, tuple)):
        return None
    if not all(type(v) is int and -(2**63) <= v < 2**63 for v in value):
        return None
    return np.array(value, dtype=np.int64).reshape(-1)


def _cifar(name: str, cls_name: str, folder: str, num_classes: int, cfg: DataConfig,
           jpg: Path | None = None) -> Splits:
    """CIFAR from its python batch files (`read_cifar_pickle`), else (CIFAR-10) from a JPEG
    class tree; torchvision only downloads (data.download)."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root = data_root(cfg)
    base = root / folder
    if not base.is_dir() and jpg is not None and (jpg / "train").is_dir():
        return _cifar10_jpg(cfg, jpg)
    places = [base] + ([jpg] if jpg is not None else [])
    holding = folder + (" (or cifar10-jpg/train and cifar10-jpg/test)" if jpg else "")
    files = {True: [base / f for f, _ in cls.train_list],
             False: [base / f for f, _ in cls.test_list]}
    missing = [p.name for p in files[True] + files[False] if not p.is_file()]
    if missing and base.is_dir() and not cfg.download:
        raise DataError(f"dataset {name}: {base} lacks {', '.join(missing)}; copy the whole "
                        f"folder again, or set data.download = true")
    if missing:
        for train in (True, False):  # downloads, or says where the dataset was looked for
            _torchvision_split(name, cls, cfg, train, folder, holding, places)
    label_key = "fine_labels" if num_classes == 100 else "labels"
    splits, origin = [], []
    for train in (True, False):
        xs, ys, read = [], [], []
        for path in files[train]:
            x, y = read_cifar_pickle(path, label_key, name)
            xs.append(x)
            ys.append(y)
            read.append(Part(str(path), str(path), len(x), len(y)))
        splits.append((torch.cat(xs), torch.cat(ys)))
        origin.append(tuple(read))
    return _image_splits(cfg, splits[0], splits[1], num_classes,
                         Origin(name, origin[0], origin[1]))


def _cifar10_jpg(cfg: DataConfig, jpg: Path) -> Splits:
    """CIFAR-10 re-encoded as JPEG (train/<class>/, test/<class>/), in CIFAR label order."""
    train_x, train_y, classes = read_image_tree(jpg / "train", name="cifar10")
    if tuple(classes) != CIFAR10_CLASSES:
        raise DataError(f"dataset cifar10: class folders of {jpg / 'train'} are {classes}, "
                        f"expected {list(CIFAR10_CLASSES)}")
    test_x, test_y, _ = read_image_tree(jpg / "test", classes, name="cifar10",
                                        empty_classes_ok=True)
    origin = Origin("cifar10", (_tree_part(jpg / "train", train_y),),
                    (_tree_part(jpg / "test", test_y),))
    return _image_splits(cfg, (train_x, train_y), (test_x, test_y), 10, origin)


def _tree_part(folder: Path, labels: Tensor) -> Part:
    return Part(str(folder), str(folder), len(labels), len(labels))


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> Splits:
    """CIFAR-10: 50,000 + 10,000 colour 32x32 images, crop+flip when data.augment."""
    return _cifar("cifar10", "CIFAR10", "cifar-10-batches-py", 10, cfg,
                  jpg=data_root(cfg) / "cifar10-jpg")


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig) -> Splits:
    """CIFAR-100 (fine labels): like CIFAR-10 with 100 classes."""
    return _cifar("cifar100", "CIFAR100", "cifar-100-python", 100, cfg)


# --- image folders ---------------------------------------------------------------------------


def _torchvision_decoder() -> Callable[[bytes], Tensor] | None:
    """torchvision's decoder: 2-3x faster than PIL and pixel-identical to it on CIFAR-10's
    JPEGs; None once a torchvision release drops it (0.29 deprecates it for TorchCodec)."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # pragma: no cover - future torchvision
        return None

    def decode(raw: bytes) -> Tensor:
        return decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                            mode=ImageReadMode.RGB)

    return decode


JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn markers (not DHT...)


def image_pixels(raw: bytes) -> int | None:
    """Width x height from a PNG's or JPEG's header (None for other formats or a header
    that cannot be parsed): a few byte reads, so every image is sized before decoding."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR" and len(raw) >= 24:
        width, height = struct.unpack_from(">II", raw, 16)
        return width * height
    if raw[:2] != b"\xff\xd8":
        return None
    at, end = 2, len(raw) - 9
    while at <= end:  # walk the marker segments up to the frame header
        if raw[at] != 0xFF:
            return None
        marker = raw[at + 1]
        if marker in JPEG_FRAMES:
            height, width = struct.unpack_from(">HH", raw, at + 5)
            return width * height
        at += 1 if marker == 0xFF else 2 + (raw[at + 2] << 8 | raw[at + 3])
    return None


def _too_large(path: Path, raw: bytes) -> None:
    """A DataError when the image's header claims more pixels than PIL's decompression-bomb
    error (twice `PIL.Image.MAX_IMAGE_PIXELS`, 179 million; PIL only warns below it): a file
    of a few hundred bytes would otherwise make the decoder allocate gigabytes. PIL reads
    the header of formats other than PNG and JPEG."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is None:  # the user turned PIL's check off
        return
    limit = 2 * Image.MAX_IMAGE_PIXELS
    pixels = image_pixels(raw)
    if pixels is None:
        try:
            with Image.open(io.BytesIO(raw)) as im:  # lazy: the header only
                pixels = im.size[0] * im.size[1] * max(1, getattr(im, "n_frames", 1))
        except Exception:  # PIL cannot tell; the decoders below will say what is wrong
            return
    if pixels > limit:
        raise DataError(f"cannot read image {path}: its header claims {pixels:,} pixels, "
                        f"over PIL's limit of {limit:,} (2 x PIL.Image.MAX_IMAGE_PIXELS); the "
                        f"file is damaged or not meant for this dataset")


def _decode(path: Path, fast: Callable[[bytes], Tensor] | None) -> Tensor:
    """One image as RGB uint8 (3, H, W); PIL reads what the fast decoder cannot. Every
    failure, in this process or a DataLoader worker, is one DataError naming the file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if not raw:
        raise DataError(f"cannot read image {path}: the file is empty (0 bytes); replace it "
                        f"or remove it")
    _too_large(path, raw)
    if fast is not None:
        try:
            return fast(raw)
        except (RuntimeError, ValueError):
            pass
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            arr = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image format PIL or torchvision "
                        f"can decode") from None
    except Exception as exc:  # OSError for truncation; SyntaxError, ValueError, bombs, ...
        raise DataError(f"cannot read image {path}: {first_line(exc)}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def list_image_tree(folder: Path, classes: Sequence[str] | None = None,
                    name: str = "imagefolder", empty_classes_ok: bool = False
                    ) -> tuple[list[Path], Tensor, list[str]]:
    """The files of `folder/<class>/<image>` and their labels, in class then file-name
    order, checked (unknown test classes, empty class folders, no images) but not decoded:
    what `read_image_tree` decodes and what a streamed dataset reads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"dataset {name}: folder {folder} not found: it should hold "
                        f"<class>/<image> folders")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"dataset {name}: {folder} has classes {extra} that the train "
                            f"split lacks")
    files: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, cls in enumerate(classes):
        if not (folder / cls).is_dir():
            continue
        in_class = [f for f in sorted((folder / cls).iterdir())
                    if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
                    and f.is_file()]
        if not in_class:
            empty.append(cls)
        files += in_class
        labels += [label] * len(in_class)
    if empty and files and not empty_classes_ok:
        raise DataError(f"dataset {name}: class folder {folder / empty[0]} holds no images "
                        f"({', '.join(IMAGE_EXTENSIONS)})"
                        + (f" (nor do {', '.join(empty[1:])})" if len(empty) > 1 else "")
                        + "; add its images or remove the folder")
    if not files:
        raise DataError(f"dataset {name}: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                        f"{folder}/<class>/")
    return files, torch.tensor(labels, dtype=torch.int64), list(classes)


def read_image_tree(folder: Path, classes: Sequence[str] | None = None,
                    name: str = "imagefolder", empty_classes_ok: bool = False
                    ) -> tuple[Tensor, Tensor, list[str]]:
    """Decode `folder/<class>/<image>` into uint8 (N, 3, H, W), int64 labels, class names.

    Classes are the sorted sub-folder names (as torchvision's ImageFolder), or `classes`
    when given (the train split's, so test labels mean the same). All images must share
    one size: resizing is a modelling choice this tool does not make silently. A class
    folder without images is an error unless `empty_classes_ok` (the test split, which
    may lack a class as it may lack its folder): in training it would be a class that
    the network never sees, yet counts in its output.
    """
    files, labels, classes = list_image_tree(folder, classes, name, empty_classes_ok)
    # A plain loop: decoding holds the GIL, so threads measured slower (on 2 cores), and
    # torchvision's decoder takes ~5 s for CIFAR-10's 60,000 JPEGs, so no cache is kept.
    fast = _torchvision_decoder()
    images: list[Tensor] = []
    with warnings.catch_warnings():
        # torchvision 0.29 warns of the deprecation on every call: 60,000 times.
        warnings.filterwarnings("ignore", message="The image decoding",
                                category=DeprecationWarning)
        for f in files:
            img = _decode(f, fast)
            if images and img.shape != images[0].shape:
                raise DataError(
                    f"dataset {name}: images differ in size: {f} is "
                    f"{img.shape[2]}x{img.shape[1]}, {files[0]} is {images[0].shape[2]}x"
                    f"{images[0].shape[1]}; resize them all to one size first"
                )
            images.append(img)
    return torch.stack(images), labels, list(classes)


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> Splits:
    """Any `root/train/<class>/*` and `root/test/<class>/*` images of one size, as RGB."""
    root = data_root(cfg)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise _missing("imagefolder", [root / "train", root / "test"],
                       "train/<class>/ and test/<class>/ image folders", download=False)
    train_x, train_y, classes = read_image_tree(root / "train")
    test_x, test_y, _ = read_image_tree(root / "test", classes, empty_classes_ok=True)
    origin = Origin("imagefolder", (_tree_part(root / "train", train_y),),
                    (_tree_part(root / "test", test_y),))
    return _image_splits(cfg, (train_x, train_y), (test_x, test_y), len(classes), origin)


@DATASETS.register("imagenet")
def imagenet(cfg: DataConfig) -> Splits:
    """ImageNet (`train/<class>/*`, `val/<class>/*`) is read from disk only: its images
    differ in size and it does not fit in memory (see slt.stream)."""
    raise DataError("dataset imagenet is streamed from its image files only (its images "
                    "differ in size and do not fit in memory): set data.stream = true")


# --- planted teacher -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Teacher:
    """The random MLP that labels planted-teacher data (float64, so labels do not hinge on
    float32 rounding): labels = argmax of its logits, standardised per class."""

    w1: Tensor  # (hidden, input_dim)
    w2: Tensor  # (num_classes, hidden)
    centre: Tensor  # (num_classes,) mean logit over the training inputs
    scale: Tensor  # (num_classes,) std of the logit over the training inputs

    def logits(self, x: Tensor) -> Tensor:
        raw = torch.relu(x.double() @ self.w1.T) @ self.w2.T
        return (raw - self.centre) / self.scale

    def labels(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(1)


def planted_teacher_task(cfg: DataConfig) -> tuple[Splits, Teacher]:
    """Inputs x ~ N(0, I) labelled by a random teacher MLP; returns the teacher too.

    A raw random teacher's argmax favours a few classes; subtracting each class's mean
    logit (and dividing by its std) over the training inputs makes the classes roughly
    balanced. Teacher, train inputs and test inputs have separate seeds derived from
    data.seed, so e.g. changing test_size leaves the training set as it was.
    """
    d, h, k = cfg.input_dim, cfg.teacher_hidden, cfg.num_classes
    g = generator("planted_teacher", "teacher", cfg.seed)
    w1 = torch.randn(h, d, dtype=torch.float64, generator=g) / math.sqrt(d)
    w2 = torch.randn(k, h, dtype=torch.float64, generator=g) / math.sqrt(h)
    train_x = torch.randn(cfg.train_size, d, generator=generator("planted_teacher", "train",
                                                                   cfg.seed))
    test_x = torch.randn(cfg.test_size, d, generator=generator("planted_teacher", "test",
                                                                 cfg.seed))
    raw = torch.relu(train_x.double() @ w1.T) @ w2.T
    scale = raw.std(0, correction=0).clamp_min(1e-12)
    teacher = Teacher(w1, w2, raw.mean(0), scale)
    splits = Splits(train_x, teacher.labels(train_x), test_x, teacher.labels(test_x),
                    DataSpec((d,), k), (0.0,), (1.0,), augment=False,
                    origin=Origin("planted_teacher"))
    return splits, teacher


@DATASETS.register("planted_teacher")
def planted_teacher(cfg: DataConfig) -> Splits:
    """A synthetic task with a known solution; needs no files (see planted_teacher_task)."""
    return planted_teacher_task(cfg)[0]
