"""Image files for the streamed path: which files a streamed dataset lists, and the
ImageNet-style decode, crop and resize done in the workers."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from slt.config.schema import DataConfig
from slt.data.files import (
    CIFAR10_CLASSES,
    data_root,
    decode_image,
    list_image_tree,
    missing_files,
    torchvision_decoder,
)
from slt.errors import DataError
from slt.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


IMAGENET_SIZE = 224  # side of the square crop the network sees


IMAGENET_RESIZE = 256  # shorter side before the evaluation centre crop


IMAGENET_SCALE = (0.08, 1.0)  # area of the random crop, as a fraction of the image


IMAGENET_RATIO = (3 / 4, 4 / 3)  # aspect ratio (width / height) of the random crop


FIXED = "fixed"  # images of one size; CIFAR's pad-4 crop + flip when augmenting 32x32 colour


IMAGENET = "imagenet"  # images of any size; random-resized crop / resize + centre crop


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """A dataset as image files: both splits' paths and labels (in `read_image_tree`'s
    order, so subsets and permutations pick the same images as in memory) and its recipe.
    `mean` / `std` are None when they must be measured on the training images."""

    name: str
    train_files: tuple[str, ...]
    train_y: Tensor
    test_files: tuple[str, ...]
    test_y: Tensor
    classes: tuple[str, ...]
    recipe: str = FIXED
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


STREAMS: Registry[Callable[[DataConfig], ImageFiles]] = Registry("streamed dataset")


def _tree_files(name: str, train: Path, test: Path, recipe: str = FIXED,
                expected: Sequence[str] | None = None) -> ImageFiles:
    train_files, train_y, classes = list_image_tree(train, name=name)
    if expected is not None and tuple(classes) != tuple(expected):
        raise DataError(f"dataset {name}: class folders of {train} are {classes}, "
                        f"expected {list(expected)}")
    test_files, test_y, _ = list_image_tree(test, classes, name=name, empty_classes_ok=True)
    stats = (IMAGENET_MEAN, IMAGENET_STD) if recipe == IMAGENET else (None, None)
    return ImageFiles(name, tuple(map(str, train_files)), train_y, tuple(map(str, test_files)),
                      test_y, tuple(classes), recipe, *stats)


@STREAMS.register("cifar10")
def cifar10_files(cfg: DataConfig) -> ImageFiles:
    """CIFAR-10's JPEG tree, when it is what `slt.data.datasets.cifar10` reads (no python
    batches)."""
    root = data_root(cfg)
    base, jpg = root / "cifar-10-batches-py", root / "cifar10-jpg"
    if base.is_dir():
        raise DataError(f"dataset cifar10 is read from its python batch files in {base}, "
                        f"which are held in memory: data.stream = true needs the JPEG tree "
                        f"{jpg}/train and {jpg}/test instead; set data.stream = false")
    if not (jpg / "train").is_dir():
        raise missing_files("cifar10", [jpg / "train"],
                       "cifar10-jpg/train and cifar10-jpg/test (streamed)", download=False)
    return _tree_files("cifar10", jpg / "train", jpg / "test", expected=CIFAR10_CLASSES)


@STREAMS.register("imagefolder")
def imagefolder_files(cfg: DataConfig) -> ImageFiles:
    """`root/train/<class>/*` and `root/test/<class>/*`, images of one size."""
    root = data_root(cfg)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise missing_files("imagefolder", [root / "train", root / "test"],
                       "train/<class>/ and test/<class>/ image folders", download=False)
    return _tree_files("imagefolder", root / "train", root / "test")


def imagenet_root(cfg: DataConfig) -> Path:
    """data.root itself when it holds train/ and val/, else its imagenet/ folder: the
    ImageNet folder can be named directly or sit beside the other datasets."""
    root = data_root(cfg)
    for place in (root, root / "imagenet"):
        if (place / "train").is_dir() and (place / "val").is_dir():
            return place
    raise missing_files("imagenet", [root, root / "imagenet"],
                   "train/<class>/ and val/<class>/ image folders", download=False)


@STREAMS.register("imagenet")
def imagenet_files(cfg: DataConfig) -> ImageFiles:
    """ImageNet as `train/<class>/*` and `val/<class>/*` (any sizes); classes = folders."""
    root = imagenet_root(cfg)
    return _tree_files("imagenet", root / "train", root / "val", recipe=IMAGENET)


def decoder() -> Callable[[Path], Tensor]:
    """`slt.data.files.decode_image` with torchvision's decoder (PIL for what it cannot
    read); call it inside `quiet()`."""
    fast = torchvision_decoder()
    return lambda path: decode_image(path, fast)


@contextmanager
def quiet() -> Iterator[None]:
    """Silences torchvision 0.29's deprecation warning of every decode (one per image would
    flood the log); entered once per batch: entering it costs more than a 32x32 decode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding",
                                category=DeprecationWarning)
        yield


def size_of(img: Tensor) -> str:
    """WxH of a CHW image, for messages."""
    return f"{img.shape[2]}x{img.shape[1]}"


def random_resized_box(g: torch.Generator, height: int, width: int,
                       scale: tuple[float, float] = IMAGENET_SCALE,
                       ratio: tuple[float, float] = IMAGENET_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a random fraction `scale` of the image's area at
    a log-uniform aspect ratio in `ratio`, drawn from `g` only; after ten misses, the
    largest centred crop with the ratio clamped to `ratio` (the usual ImageNet recipe)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (1,), generator=g))
            left = int(torch.randint(width - w + 1, (1,), generator=g))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def imagenet_train_image(img: Tensor, g: torch.Generator) -> Tensor:
    """Random-resized crop to 224x224 (bilinear, antialiased) and a coin-flip mirror."""
    from torchvision.transforms.v2 import functional as TF

    flip = bool(torch.randint(2, (1,), generator=g))  # first: its draw never moves
    top, left, h, w = random_resized_box(g, img.shape[1], img.shape[2])
    out = TF.resized_crop(img, top, left, h, w, [IMAGENET_SIZE, IMAGENET_SIZE], antialias=True)
    return out.flip(-1) if flip else out


def imagenet_eval_image(img: Tensor) -> Tensor:
    """Shorter side resized to 256 (bilinear, antialiased), then the centre 224x224."""
    from torchvision.transforms.v2 import functional as TF

    out = TF.resize(img, [IMAGENET_RESIZE], antialias=True)
    return TF.center_crop(out, [IMAGENET_SIZE, IMAGENET_SIZE])
