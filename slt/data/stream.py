"""Image datasets streamed from disk through DataLoader workers, batch for batch the same as
the in-memory path.

`slt.data.Batches` holds a dataset as one tensor on the device; `StreamBatches` reads the
image files instead, for datasets too large for memory (ImageNet) or images of many sizes.
It keeps the in-memory path's guarantee that an epoch's batches depend on (seed, epoch)
alone: the permutation and the crop draws come from `slt.data.epoch_order`, each rank takes
`slt.data.rank_slice` of every global batch, and ImageNet's random crops come from a
generator seeded by (seed, epoch, position in the epoch). A batch sampler hands each global
batch's rank slice to one worker, which decodes and augments it as uint8; the main process
only moves it to the device and normalises it, with the same operations as `Batches`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from slt.config.schema import DataConfig
from slt.data.images import (
    FIXED,
    IMAGENET,
    IMAGENET_MEAN,
    IMAGENET_SIZE,
    IMAGENET_STD,
    STREAMS,
    ImageFiles,
    decoder,
    imagenet_eval_image,
    imagenet_train_image,
    quiet,
    size_of,
)
from slt.data.order import BatchSource, check_batch_size, crop_flip, epoch_order, rank_slice
from slt.data.splits import limited_subset
from slt.errors import DataError, first_line
from slt.seeding import generator
from slt.spec import DataSpec

PREFETCH = 4  # batches each worker decodes ahead: hides a slow file without much memory


CHUNK = 256  # files per task of the opening pass (statistics, sizes)


def worker_failure(name: str, path: str, exc: Exception) -> str:
    """The one line a worker sends back for a failed image (a DataError's own message):
    an exception raised in a DataLoader worker would reach the main process wrapped in
    the worker's traceback."""
    if isinstance(exc, DataError):
        return str(exc)
    return f"dataset {name}: cannot read image {path}: {type(exc).__name__}: {first_line(exc)}"


class _Reader(Dataset):
    """Decodes whole batches: `__getitems__(positions)` gives uint8 (B, C, H, W) and labels
    for positions of an epoch (or of the test set), or the one line of what went wrong
    (`worker_failure`: a worker's exception would come back wrapped in a traceback)."""

    def __init__(self, name: str, files: Sequence[str], labels: Tensor, shape: tuple[int, ...],
                 recipe: str, train: bool, perm: Tensor | None = None,
                 crops: Sequence[Tensor] = (), seed: int = 0, epoch: int = 0) -> None:
        self.name, self.files, self.labels, self.shape = name, files, labels, shape
        self.recipe, self.train, self.perm, self.crops = recipe, train, perm, tuple(crops)
        self.seed, self.epoch = seed, epoch
        self._decode: Callable[[Path], Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int) -> Any:
        return self.__getitems__([position])

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Tensor] | str:
        if self._decode is None:
            self._decode = decoder()
        pos = torch.tensor(positions, dtype=torch.int64)
        index = self.perm[pos] if self.perm is not None else pos
        images = []
        path = ""
        try:
            with quiet():
                for p, i in zip(positions, index.tolist()):
                    path = self.files[i]
                    images.append(self._image(Path(path), p))
        except Exception as exc:  # sent back as one line, not a traceback
            return worker_failure(self.name, path, exc)
        x = torch.stack(images) if images else torch.empty((0, *self.shape), dtype=torch.uint8)
        if self.crops:
            x = crop_flip(x, *(t[pos] for t in self.crops))
        return x, self.labels[index]

    def _image(self, path: Path, position: int) -> Tensor:
        img = self._decode(path)  # type: ignore[misc]
        if self.recipe == IMAGENET:
            if self.train:
                return imagenet_train_image(img, generator("imagenet", self.seed, self.epoch,
                                                           position))
            return imagenet_eval_image(img)
        if tuple(img.shape) != self.shape:
            raise DataError(f"dataset {self.name}: {path} is {size_of(img)}, expected "
                            f"{self.shape[2]}x{self.shape[1]} as every image of the train "
                            f"split; make every image one size")
        return img


class _Counter(Dataset):
    """Decodes a chunk of files for the opening pass: their pixel histogram per channel
    (C, 256) when counting, after checking every image has `shape`."""

    def __init__(self, name: str, files: Sequence[str], shape: tuple[int, ...], first: str,
                 count: bool) -> None:
        self.name, self.files, self.shape, self.first, self.count = name, files, shape, first, count
        self._decode: Callable[[Path], Tensor] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> Tensor | str:
        if self._decode is None:
            self._decode = decoder()
        counts = torch.zeros(self.shape[0], 256, dtype=torch.int64)
        path = ""
        try:
            with quiet():
                for i in indices:
                    path = self.files[i]
                    self._add(self._decode(Path(path)), path, counts)
        except Exception as exc:  # sent back as one line, not a traceback
            return worker_failure(self.name, path, exc)
        return counts


    def _add(self, img: Tensor, path: str, counts: Tensor) -> None:
        if tuple(img.shape) != self.shape:
            raise DataError(f"dataset {self.name}: images differ in size: {path} is "
                            f"{size_of(img)}, {self.first} is {self.shape[2]}x{self.shape[1]}; "
                            f"resize them all to one size first")
        if self.count:
            for c in range(self.shape[0]):
                counts[c] += torch.bincount(img[c].reshape(-1), minlength=256)


def _as_is(batch: Any) -> Any:
    """collate_fn: `__getitems__` already made the batch."""
    return batch


class RankBatches(Sampler[list[int]]):
    """Positions [lo, hi) of this rank's slice (`rank_slice`) of each global batch of an
    epoch of `n`, from global batch `start_step` on: skipped batches are never decoded."""

    def __init__(self, n: int, batch_size: int, start_step: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        self.n, self.batch_size, self.start_step = n, check_batch_size(batch_size), start_step
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.start_step * self.batch_size, self.n, self.batch_size):
            lo, hi = rank_slice(start, min(start + self.batch_size, self.n), self.rank,
                                self.world)
            yield list(range(lo, hi))

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.batch_size) - self.start_step)


def stats_from_counts(counts: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units from (C, 256) pixel counts: the arithmetic
    of `slt.data.channel_stats`, step for step, so the values are bit-identical to it."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(counts.shape[0]):
        n = counts[c].double()
        mean = float((n * levels).sum() / n.sum())
        var = float((n * (levels - mean) ** 2).sum() / n.sum())
        means.append(mean)
        stds.append(math.sqrt(var) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


def _process_group(world: int) -> Any:
    """torch.distributed when a group of `world` processes is up (else None)."""
    if world <= 1 or not torch.distributed.is_available():
        return None
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() != world:
        return None
    return dist


class StreamBatches(BatchSource):
    """`slt.data.Batches` for image files: the same attributes and methods, the same
    samples in the same order with the same crops and flips, read by `data.workers`
    processes into pinned memory (on CUDA) a few batches ahead."""

    def __init__(self, cfg: DataConfig, device: torch.device | str, rank: int = 0,
                 world: int = 1) -> None:
        """Lists the files, then (images of one size) decodes every one once to check its
        size and measure the training set's mean and std, as the in-memory path does: split
        over the ranks when a process group of `world` is up, else done by each."""
        if cfg.name not in STREAMS:
            raise DataError(f"dataset {cfg.name} is not read from image files, so it cannot "
                            f"be streamed: set data.stream = false (streamed: "
                            f"{', '.join(STREAMS.names())})")
        files = STREAMS.get(cfg.name)(cfg)
        self.name = files.name
        self.device = torch.device(device)
        self.workers = cfg.workers
        self.recipe = files.recipe
        self.classes = files.classes
        # the limits are checked (as load_data does) before any image is decoded
        keep_train = limited_subset(files.train_y, cfg.train_limit, "train", files.name)
        keep_test = limited_subset(files.test_y, cfg.test_limit, "test", files.name)
        started = time.perf_counter()
        mean, std = files.mean or IMAGENET_MEAN, files.std or IMAGENET_STD
        shape: tuple[int, ...] = (3, IMAGENET_SIZE, IMAGENET_SIZE)  # what the crops give
        if files.recipe != IMAGENET:
            with quiet():
                shape = tuple(decoder()(Path(files.train_files[0])).shape)
            counts = self._opening_pass(files, shape, rank, world)
            if files.mean is None or files.std is None:
                mean, std = stats_from_counts(counts)
        self.open_seconds = time.perf_counter() - started
        self.spec = DataSpec(shape, len(files.classes))
        self.mean, self.std = mean, std
        self.augment = cfg.augment and (files.recipe == IMAGENET or shape == (3, 32, 32))
        train, test = files.train_y, files.test_y
        if cfg.train_limit or cfg.test_limit:  # as load_data: the same balanced subsets
            self.train_files = tuple(files.train_files[i] for i in keep_train.tolist())
            self.test_files = tuple(files.test_files[i] for i in keep_test.tolist())
            train, test = train[keep_train], test[keep_test]
        else:
            self.train_files, self.test_files = files.train_files, files.test_files
        self.train_y, self.test_y = train, test
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def _opening_pass(self, files: ImageFiles, shape: tuple[int, ...], rank: int,
                      world: int) -> Tensor:
        """(C, 256) pixel counts of the whole training set (before any train_limit, as in
        memory), checking the size of every image of both splits on the way."""
        dist = _process_group(world)
        total = torch.zeros(shape[0], 256, dtype=torch.int64)
        failure = ""
        for paths, count in ((files.train_files, True), (files.test_files, False)):
            chunks = [list(range(i, min(i + CHUNK, len(paths))))
                      for i in range(0, len(paths), CHUNK)]
            if dist is not None:
                chunks = chunks[rank::world]
            reader = _Counter(files.name, paths, shape, files.train_files[0], count)
            for out in self._drain(self._loader(reader, chunks, pin=False)):
                if isinstance(out, str):
                    failure = failure or out
                    break
                total += out
            if failure:
                break
        if dist is not None:  # every rank learns of a bad image, and no rank waits forever
            flat = torch.cat([total.reshape(-1), torch.tensor([1 if failure else 0])])
            on = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            flat = flat.to(on)
            dist.all_reduce(flat)
            flat = flat.cpu()
            if flat[-1] and not failure:
                failure = (f"dataset {files.name}: another process of this search found a "
                           f"bad image (see its message)")
            total = flat[:-1].reshape(total.shape)
        if failure:
            raise DataError(failure)
        return total

    def _loader(self, dataset: Dataset, batches: Any, pin: bool | None = None) -> DataLoader:
        """Workers decode whole batches (one each), `PREFETCH` ahead; pinned for CUDA."""
        extra: dict[str, Any] = {"prefetch_factor": PREFETCH} if self.workers else {}
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                          collate_fn=_as_is,
                          pin_memory=self.device.type == "cuda" if pin is None else pin,
                          **extra)

    def _drain(self, loader: DataLoader) -> Iterator[Any]:
        """What the workers send; a worker that died (a decoder crashing on a crafted
        image, or the machine out of memory) is one DataError, not torch's traceback."""
        try:
            yield from loader
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            raise DataError(f"dataset {self.name}: a data.workers process ended unexpectedly "
                            f"({first_line(exc)}): an image crashed its decoder, or memory "
                            f"ran out") from None

    def _batches(self, loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
        for out in self._drain(loader):
            if isinstance(out, str):
                raise DataError(out)
            x, y = out
            yield (self.normalise(x.to(self.device, non_blocking=True)),
                   y.to(self.device, non_blocking=True))

    def train_epoch(self, epoch: int, batch_size: int, seed: int, start_step: int = 0,
                    rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of `Batches.train_epoch` for (seed, epoch), read from disk."""
        check_batch_size(batch_size)
        n = self.n_train
        order = epoch_order(n, self.augment and self.recipe == FIXED, seed, epoch)
        reader = _Reader(self.name, self.train_files, self.train_y, self.spec.shape,
                         self.recipe, train=self.augment, perm=order.perm, crops=order.crops,
                         seed=seed, epoch=epoch)
        yield from self._batches(self._loader(reader, RankBatches(n, batch_size, start_step,
                                                                  rank, world)))

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The test set in order, normalised, never augmented (every rank reads it all)."""
        check_batch_size(batch_size)
        reader = _Reader(self.name, self.test_files, self.test_y, self.spec.shape,
                         self.recipe, train=False)
        yield from self._batches(self._loader(reader, RankBatches(self.n_test, batch_size)))
