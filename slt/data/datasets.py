"""The registered datasets: a name in `data.name` -> a function that returns checked
`Splits` (MNIST, Fashion-MNIST, CIFAR-10/100, image folders, the planted teacher)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slt.config.schema import DataConfig
from slt.data.files import (
    CIFAR10_CLASSES,
    data_root,
    missing_files,
    read_cifar_pickle,
    read_idx,
    read_image_tree,
)
from slt.data.splits import Origin, Part, Splits, channel_stats, limited_subset
from slt.errors import DataError, first_line
from slt.registry import Registry
from slt.seeding import generator
from slt.spec import DataSpec

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


def _image_splits(cfg: DataConfig, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                  num_classes: int, origin: Origin) -> Splits:
    """Splits of uint8 images; the crop+flip recipe only for 32x32 colour images.

    An empty train split gets NaN statistics, which `check_splits` rejects before use."""
    shape = tuple(train[0].shape[1:])
    mean, std = channel_stats(train[0])
    return Splits(train[0], train[1], test[0], test[1], DataSpec(shape, num_classes),
                  mean, std, augment=cfg.augment and shape == (3, 32, 32), origin=origin)


def _torchvision_split(name: str, cls: type, cfg: DataConfig, train: bool, folder: str,
                       holding: str, places: Sequence[Path] = ()) -> Any:
    """torchvision's dataset object, with its failures turned into one-line DataErrors."""
    root = data_root(cfg)
    try:
        return cls(str(root), train=train, download=cfg.download)
    except RuntimeError as exc:
        if "Dataset not found" in str(exc):
            raise missing_files(name, places or [root / folder], holding) from None
        if cfg.download:
            raise DataError(f"dataset {name}: download into {root} failed: "
                            f"{first_line(exc)}") from None
        raise DataError(f"dataset {name}: cannot read {root / folder}: "
                        f"{first_line(exc)}") from None
    except OSError as exc:
        raise DataError(f"dataset {name}: cannot read or download into {root / folder}: "
                        f"{first_line(exc)}") from None


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


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> Splits:
    """Any `root/train/<class>/*` and `root/test/<class>/*` images of one size, as RGB."""
    root = data_root(cfg)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise missing_files("imagefolder", [root / "train", root / "test"],
                       "train/<class>/ and test/<class>/ image folders", download=False)
    train_x, train_y, classes = read_image_tree(root / "train")
    test_x, test_y, _ = read_image_tree(root / "test", classes, empty_classes_ok=True)
    origin = Origin("imagefolder", (_tree_part(root / "train", train_y),),
                    (_tree_part(root / "test", test_y),))
    return _image_splits(cfg, (train_x, train_y), (test_x, test_y), len(classes), origin)


@DATASETS.register("imagenet")
def imagenet(cfg: DataConfig) -> Splits:
    """ImageNet (`train/<class>/*`, `val/<class>/*`) is read from disk only: its images
    differ in size and it does not fit in memory (see slt.data.stream)."""
    raise DataError("dataset imagenet is streamed from its image files only (its images "
                    "differ in size and do not fit in memory): set data.stream = true")


@dataclass(frozen=True, eq=False)
class Teacher:
    """The random ReLU MLP that labels planted-teacher data (float64, so labels do not hinge
    on float32 rounding): labels = argmax of its logits, standardised per class."""

    weights: tuple[Tensor, ...]  # (out, in) per layer: input -> hidden ... -> classes
    centre: Tensor  # (num_classes,) mean logit over the training inputs (0 when bias-free)
    scale: Tensor  # (num_classes,) std of the logit over the training inputs (1 when folded)

    def hidden(self, x: Tensor) -> Tensor:
        """The last hidden layer's activations."""
        h = x.double()
        for w in self.weights[:-1]:
            h = torch.relu(h @ w.T)
        return h

    def logits(self, x: Tensor) -> Tensor:
        raw = self.hidden(x) @ self.weights[-1].T
        return (raw - self.centre) / self.scale

    def labels(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(1)


def _teacher(cfg: DataConfig, train_x: Tensor) -> Teacher:
    """Weights N(0, 1/fan_in) drawn layer by layer from the teacher's seed. With a bias the
    logits are standardised per class; without one (data.teacher_bias = false) the output
    weights lose their component along the mean hidden activation, which centres every
    logit over the training inputs, and are divided by each logit's std, so the whole
    teacher is its weights: that is what a plant writes into a bias-free student."""
    g = generator("planted_teacher", "teacher", cfg.seed)
    dims = [cfg.input_dim] + [cfg.teacher_hidden] * cfg.teacher_depth + [cfg.num_classes]
    weights = [torch.randn(n_out, n_in, dtype=torch.float64, generator=g) / math.sqrt(n_in)
               for n_in, n_out in zip(dims[:-1], dims[1:])]
    plain = Teacher(tuple(weights), torch.zeros(()), torch.ones(()))
    hidden = plain.hidden(train_x)
    if cfg.teacher_bias:
        raw = hidden @ weights[-1].T
        return Teacher(tuple(weights), raw.mean(0), raw.std(0, correction=0).clamp_min(1e-12))
    mean = hidden.mean(0)
    last = weights[-1] - torch.outer(weights[-1] @ mean, mean) / (mean @ mean).clamp_min(1e-300)
    scale = (hidden @ last.T).std(0, correction=0).clamp_min(1e-12)
    weights[-1] = last / scale[:, None]
    return Teacher(tuple(weights), torch.zeros(()), torch.ones(()))


def planted_teacher_task(cfg: DataConfig) -> tuple[Splits, Teacher]:
    """Inputs x ~ N(0, I) labelled by a random teacher MLP; returns the teacher too.

    A raw random teacher's argmax favours a few classes; centring each class's logit (and
    dividing by its std) over the training inputs makes the classes roughly balanced.
    Teacher, train inputs and test inputs have separate seeds derived from data.seed, so
    e.g. changing test_size leaves the training set as it was.
    """
    d, k = cfg.input_dim, cfg.num_classes
    train_x = torch.randn(cfg.train_size, d, generator=generator("planted_teacher", "train",
                                                                   cfg.seed))
    test_x = torch.randn(cfg.test_size, d, generator=generator("planted_teacher", "test",
                                                                 cfg.seed))
    teacher = _teacher(cfg, train_x)
    splits = Splits(train_x, teacher.labels(train_x), test_x, teacher.labels(test_x),
                    DataSpec((d,), k), (0.0,), (1.0,), augment=False,
                    origin=Origin("planted_teacher"))
    return splits, teacher


@DATASETS.register("planted_teacher")
def planted_teacher(cfg: DataConfig) -> Splits:
    """A synthetic task with a known solution; needs no files (see planted_teacher_task)."""
    return planted_teacher_task(cfg)[0]
