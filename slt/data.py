"""Datasets as in-memory tensors; batching, normalisation and augmentation as tensor ops.

Every dataset is small enough to live in memory (and on the GPU) as one tensor, so an
epoch is a permutation and a few batched gathers on the run's device (as airbench does)
instead of a per-image PIL pipeline in worker processes. All randomness comes from
generators seeded by (seed, epoch), never from global RNG state, so an epoch's batches are
the same whenever it is run: this is what makes a resumed search exact.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from slt.config import DataConfig, default_data_root
from slt.errors import DataError
from slt.registry import Registry
from slt.seeding import generator
from slt.spec import DataSpec

PAD = 4  # zero padding of the random crop (the CIFAR recipe)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset in memory: uint8 (N, C, H, W) images or float32 (N, D) vectors, int64 labels.

    `mean` / `std` are per channel in [0, 1] pixel units (vectors: 0 and 1), applied per
    batch so the stored images stay uint8 (4x less memory on the device).
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    spec: DataSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False

    def __post_init__(self) -> None:
        if len(self.train_x) != len(self.train_y) or len(self.test_x) != len(self.test_y):
            raise ValueError("Splits: inputs and labels differ in length")
        if len(self.mean) != len(self.std):
            raise ValueError("Splits: mean and std differ in length")


DATASETS: Registry[Callable[[DataConfig], Splits]] = Registry("dataset")


def load_data(cfg: DataConfig) -> Splits:
    """The dataset `cfg.name`, loaded whole into memory (DataError when it is missing)."""
    return DATASETS.get(cfg.name)(cfg)


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


class Batches:
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

    def train_epoch(self, epoch: int, batch_size: int,
                    seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the training set in the order (and augmentation) of (seed, epoch).

        The draws are made on the CPU and moved, so a CPU and a GPU run see the same order
        and the same crops and flips. The last batch may be smaller; nothing is dropped.
        """
        _check_batch_size(batch_size)
        n = self.n_train
        g = generator("epoch", seed, epoch)
        perm = torch.randperm(n, generator=g).to(self.device)
        if self.augment:
            span = 2 * PAD + 1
            dy = torch.randint(span, (n,), generator=g).to(self.device)
            dx = torch.randint(span, (n,), generator=g).to(self.device)
            flip = torch.randint(2, (n,), generator=g).bool().to(self.device)
        for start in range(0, n, batch_size):
            stop = start + batch_size
            idx = perm[start:stop]
            x = self.train_x[idx]
            if self.augment:
                x = crop_flip(x, dy[start:stop], dx[start:stop], flip[start:stop])
            yield self.normalise(x), self.train_y[idx]

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The test set in order, normalised, never augmented."""
        _check_batch_size(batch_size)
        for start in range(0, self.n_test, batch_size):
            stop = start + batch_size
            yield self.normalise(self.test_x[start:stop]), self.test_y[start:stop]


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
                  num_classes: int) -> Splits:
    """Splits of uint8 images; the crop+flip recipe only for 32x32 colour images."""
    shape = tuple(train[0].shape[1:])
    mean, std = channel_stats(train[0])
    return Splits(train[0], train[1], test[0], test[1], DataSpec(shape, num_classes),
                  mean, std, augment=cfg.augment and shape == (3, 32, 32))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
                            f"{_first_line(exc)}") from None
        raise DataError(f"dataset {name}: cannot read {root / folder}: "
                        f"{_first_line(exc)}") from None
    except OSError as exc:
        raise DataError(f"dataset {name}: cannot read or download into {root / folder}: "
                        f"{_first_line(exc)}") from None


# --- MNIST-like ------------------------------------------------------------------------------


def _mnist_like(name: str, cls_name: str, cfg: DataConfig) -> Splits:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    parts = []
    for train in (True, False):
        ds = _torchvision_split(name, cls, cfg, train, f"{cls_name}/raw", f"{cls_name}/raw")
        parts.append((ds.data.unsqueeze(1).contiguous(), ds.targets.long()))
    return _image_splits(cfg, parts[0], parts[1], 10)


@DATASETS.register("mnist")
def mnist(cfg: DataConfig) -> Splits:
    """MNIST from torchvision's files: 60,000 + 10,000 grey 28x28 digits, no augmentation."""
    return _mnist_like("mnist", "MNIST", cfg)


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg: DataConfig) -> Splits:
    """Fashion-MNIST from torchvision's files: like MNIST, clothes instead of digits."""
    return _mnist_like("fashion_mnist", "FashionMNIST", cfg)


# --- CIFAR -----------------------------------------------------------------------------------


def _cifar(name: str, cls_name: str, folder: str, num_classes: int, cfg: DataConfig,
           jpg: Path | None = None) -> Splits:
    """CIFAR from torchvision's python pickles, else (CIFAR-10) from a JPEG class tree."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root = data_root(cfg)
    if not (root / folder).is_dir() and jpg is not None and (jpg / "train").is_dir():
        return _cifar10_jpg(cfg, jpg)
    places = [root / folder] + ([jpg] if jpg is not None else [])
    holding = folder + (" (or cifar10-jpg/train and cifar10-jpg/test)" if jpg else "")
    parts = []
    for train in (True, False):
        ds = _torchvision_split(name, cls, cfg, train, folder, holding, places)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        parts.append((x, torch.tensor(ds.targets, dtype=torch.int64)))
    return _image_splits(cfg, parts[0], parts[1], num_classes)


def _cifar10_jpg(cfg: DataConfig, jpg: Path) -> Splits:
    """CIFAR-10 re-encoded as JPEG (train/<class>/, test/<class>/), in CIFAR label order."""
    train_x, train_y, classes = read_image_tree(jpg / "train", name="cifar10")
    if tuple(classes) != CIFAR10_CLASSES:
        raise DataError(f"dataset cifar10: class folders of {jpg / 'train'} are {classes}, "
                        f"expected {list(CIFAR10_CLASSES)}")
    test_x, test_y, _ = read_image_tree(jpg / "test", classes, name="cifar10")
    return _image_splits(cfg, (train_x, train_y), (test_x, test_y), 10)


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


def _decode(path: Path, fast: Callable[[bytes], Tensor] | None) -> Tensor:
    """One image as RGB uint8 (3, H, W); PIL reads what the fast decoder cannot."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if fast is not None:
        try:
            return fast(raw)
        except RuntimeError:
            pass
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            arr = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image format PIL or torchvision "
                        f"can decode") from None
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {_first_line(exc)}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_image_tree(folder: Path, classes: Sequence[str] | None = None,
                    name: str = "imagefolder") -> tuple[Tensor, Tensor, list[str]]:
    """Decode `folder/<class>/<image>` into uint8 (N, 3, H, W), int64 labels, class names.

    Classes are the sorted sub-folder names (as torchvision's ImageFolder), or `classes`
    when given (the train split's, so test labels mean the same). All images must share
    one size: resizing is a modelling choice this tool does not make silently.
    """
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
    for label, cls in enumerate(classes):
        if not (folder / cls).is_dir():
            continue
        for f in sorted((folder / cls).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file():
                files.append(f)
                labels.append(label)
    if not files:
        raise DataError(f"dataset {name}: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                        f"{folder}/<class>/")
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
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(classes)


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> Splits:
    """Any `root/train/<class>/*` and `root/test/<class>/*` images of one size, as RGB."""
    root = data_root(cfg)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise _missing("imagefolder", [root / "train", root / "test"],
                       "train/<class>/ and test/<class>/ image folders", download=False)
    train_x, train_y, classes = read_image_tree(root / "train")
    test_x, test_y, _ = read_image_tree(root / "test", classes)
    return _image_splits(cfg, (train_x, train_y), (test_x, test_y), len(classes))


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
                    DataSpec((d,), k), (0.0,), (1.0,), augment=False)
    return splits, teacher


@DATASETS.register("planted_teacher")
def planted_teacher(cfg: DataConfig) -> Splits:
    """A synthetic task with a known solution; needs no files (see planted_teacher_task)."""
    return planted_teacher_task(cfg)[0]
