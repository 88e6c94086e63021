"""Dataset files read as data: MNIST idx, CIFAR python batches, image trees and single
images, each checked so that a bad or hostile file is one line naming it."""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from slt.config.schema import DataConfig, default_data_root
from slt.data.pickles import ForbiddenPickle, as_array, load_array_pickle
from slt.data.splits import shape_of
from slt.errors import DataError, first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def data_root(cfg: DataConfig) -> Path:
    """cfg.root (or $SLT_DATA / ./data when empty) as an absolute path, `~` expanded."""
    # abspath, not resolve(): messages then show the path as the user wrote it, symlinks kept.
    return Path(os.path.abspath(os.path.expanduser(cfg.root or default_data_root())))


def missing_files(name: str, places: Sequence[Path], holding: str,
                  download: bool = True) -> DataError:
    """The one-line DataError of a dataset not found, with where it was looked for and the fix."""
    where = " or ".join(str(p) for p in places)
    fix = f"set data.root or $SLT_DATA to the folder holding {holding}"
    if download:
        fix += ", or set data.download = true"
    return DataError(f"dataset {name} not found in {where}: {fix}")


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
        layout = f"{shape_of(dims)} = {size}" if ndim > 1 else f"{size}"
        raise DataError(f"dataset {name}: {path} should hold {layout} bytes after its header "
                        f"but holds {len(raw) - header}; the file is truncated or damaged, "
                        f"replace it")
    if size == 0:
        return torch.zeros(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(dims)


def read_cifar_pickle(path: Path, label_key: str, name: str) -> tuple[Tensor, Tensor]:
    """One batch file of CIFAR's python release: uint8 (N, 3, 32, 32) images and labels.

    Read here rather than by torchvision, which only says "not found or corrupted" for a
    file that fails its checksum; this one names the file and what is wrong with it. The
    file is data from elsewhere: `slt.data.pickles` admits only what a CIFAR batch holds (no
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


def torchvision_decoder() -> Callable[[bytes], Tensor] | None:
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


def decode_image(path: Path, fast: Callable[[bytes], Tensor] | None) -> Tensor:
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
    fast = torchvision_decoder()
    images: list[Tensor] = []
    with warnings.catch_warnings():
        # torchvision 0.29 warns of the deprecation on every call: 60,000 times.
        warnings.filterwarnings("ignore", message="The image decoding",
                                category=DeprecationWarning)
        for f in files:
            img = decode_image(f, fast)
            if images and img.shape != images[0].shape:
                raise DataError(
                    f"dataset {name}: images differ in size: {f} is "
                    f"{img.shape[2]}x{img.shape[1]}, {files[0]} is {images[0].shape[2]}x"
                    f"{images[0].shape[1]}; resize them all to one size first"
                )
            images.append(img)
    return torch.stack(images), labels, list(classes)
