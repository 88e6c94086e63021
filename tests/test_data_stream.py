"""Datasets streamed from disk (slt.stream): the same batches as in memory, ImageNet's recipe,
and one-line errors."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slt.config.schema import DataConfig
from slt.data.datasets import load_data
from slt.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_eval_image,
    imagenet_train_image,
    random_resized_box,
)
from slt.data.loader import open_batches
from slt.data.memory import Batches
from slt.data.stream import RankBatches, StreamBatches
from slt.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_JPG = SHARED_DATA / "cifar10-jpg"
CPU = torch.device("cpu")


def write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90) if path.suffix == ".jpg" else \
        Image.fromarray(pixels).save(path)


def same_batches(a: list[tuple[torch.Tensor, torch.Tensor]],
                 b: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.float32
        assert torch.equal(xa, xb)  # bit for bit
        assert torch.equal(ya, yb)


def streamed(cfg: DataConfig, **kw: object) -> DataConfig:
    return dataclasses.replace(cfg, stream=True, **kw)


# --- CIFAR-10 from its JPEG tree -------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_pair() -> tuple[Batches, StreamBatches]:
    if not (CIFAR_JPG / "train").is_dir() or (SHARED_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 JPEG tree not found at {CIFAR_JPG} (or python batches beside)")
    cfg = DataConfig(name="cifar10", root=str(SHARED_DATA), train_limit=2000, test_limit=500)
    memory = open_batches(cfg, CPU)
    stream = open_batches(streamed(cfg, workers=2), CPU)
    assert isinstance(memory, Batches) and isinstance(stream, StreamBatches)
    return memory, stream


@pytest.mark.slow
@pytest.mark.data
def test_cifar10_streams_the_in_memory_batches(cifar_pair: tuple[Batches, StreamBatches]
                                               ) -> None:
    memory, stream = cifar_pair
    assert stream.spec == memory.spec == memory.splits.spec
    assert stream.spec.shape == (3, 32, 32) and stream.spec.num_classes == 10
    assert (stream.n_train, stream.n_test) == (memory.n_train, memory.n_test) == (2000, 500)
    assert stream.augment and memory.augment
    # Statistics of the whole training set (as in memory), bit-identical.
    assert stream.mean == memory.splits.mean and stream.std == memory.splits.std
    assert 0.47 < stream.mean[0] < 0.50 and 0.24 < stream.std[0] < 0.26
    assert stream.len_train_batches(128) == memory.len_train_batches(128) == 16
    for kw in ({}, {"rank": 1, "world": 2}, {"start_step": 3}, {"start_step": 14}):
        first = [list(itertools.islice(b.train_epoch(1, 128, 0, **kw), 4))
                 for b in (memory, stream)]
        same_batches(*first)
    # rank 1 of 2 takes the second half of each global batch; start_step 3 starts at batch 3.
    whole = list(itertools.islice(stream.train_epoch(1, 128, 0), 4))
    half = list(itertools.islice(stream.train_epoch(1, 128, 0, rank=1, world=2), 4))
    assert torch.equal(half[0][0], whole[0][0][64:]) and torch.equal(half[0][1], whole[0][1][64:])
    later = next(iter(stream.train_epoch(1, 128, 0, start_step=3)))
    assert torch.equal(later[0], whole[3][0])
    # The last, smaller batch; another epoch is another order.
    last = list(stream.train_epoch(1, 128, 0, start_step=15))
    assert len(last) == 1 and last[0][0].shape == (2000 - 15 * 128, 3, 32, 32)
    other = next(iter(stream.train_epoch(2, 128, 0)))
    assert not torch.equal(other[1], whole[0][1])
    same_batches(list(memory.test_batches(200)), list(stream.test_batches(200)))


@pytest.mark.slow
@pytest.mark.data
def test_cifar10_subsets_are_class_balanced(cifar_pair: tuple[Batches, StreamBatches]) -> None:
    memory, stream = cifar_pair
    assert torch.equal(stream.train_y, memory.train_y)
    assert torch.bincount(stream.train_y).tolist() == [200] * 10
    assert torch.bincount(stream.test_y).tolist() == [50] * 10
    assert Path(stream.train_files[0]).parent.name == "airplane"


# --- a small image folder --------------------------------------------------------------------


def folder_tree(root: Path, size: tuple[int, int] = (32, 32), per_class: int = 7,
                classes: tuple[str, ...] = ("ant", "bee", "cat")) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 3)):
        for cls in classes:
            for i in range(n):
                write_image(root / split / cls / f"{i:03d}.png",
                            rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return root


@pytest.mark.parametrize(("size", "workers"), [((32, 32), 2), ((10, 12), 0)])
def test_imagefolder_streams_the_in_memory_batches(tmp_path: Path, size: tuple[int, int],
                                                   workers: int) -> None:
    cfg = DataConfig(name="imagefolder", root=str(folder_tree(tmp_path, size)))
    memory = Batches(load_data(cfg), CPU)
    stream = open_batches(streamed(cfg, workers=workers), CPU)
    assert isinstance(stream, StreamBatches)
    assert stream.spec.shape == (3, *size) and stream.spec.num_classes == 3
    assert stream.augment == memory.augment == (size == (32, 32))
    assert (stream.mean, stream.std) == (memory.splits.mean, memory.splits.std)
    for kw in ({}, {"rank": 0, "world": 3}, {"rank": 2, "world": 3}, {"start_step": 2}):
        same_batches(list(memory.train_epoch(4, 5, 7, **kw)), list(stream.train_epoch(4, 5, 7,
                                                                                       **kw)))
    same_batches(list(memory.test_batches(4)), list(stream.test_batches(4)))
    limited = dataclasses.replace(cfg, train_limit=6, test_limit=4)
    memory = Batches(load_data(limited), CPU)
    stream = StreamBatches(streamed(limited, workers=workers), CPU)
    assert stream.n_train == 6 and stream.train_y.tolist() == [0, 0, 1, 1, 2, 2]
    same_batches(list(memory.train_epoch(0, 4, 1)), list(stream.train_epoch(0, 4, 1)))
    same_batches(list(memory.test_batches(3)), list(stream.test_batches(3)))


def test_rank_batches_cover_every_position_once() -> None:
    slices = [list(RankBatches(10, 4, rank=r, world=3)) for r in range(3)]
    assert slices[0] == [[0, 1], [4, 5], [8]]
    assert slices[2] == [[3], [7], []]  # a rank may get nothing of the last batch
    assert sorted(i for s in slices for b in s for i in b) == list(range(10))
    assert list(RankBatches(10, 4, start_step=2)) == [[8, 9]]
    assert len(RankBatches(10, 4)) == 3 and len(RankBatches(10, 4, start_step=2)) == 1


def _open_on_rank(rank: int, world: int, root: str, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        cfg = DataConfig(name="imagefolder", root=root, stream=True, workers=0)
        batches = StreamBatches(cfg, CPU, rank, world)
        torch.save((batches.mean, batches.std), f"{out}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_opening_pass_split_over_ranks(tmp_path: Path) -> None:
    import socket

    root = folder_tree(tmp_path / "tree", per_class=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(  # fork: no second import of torch per rank
        _open_on_rank, args=(2, str(root), port, str(tmp_path)), nprocs=2, start_method="fork")
    alone = StreamBatches(DataConfig(name="imagefolder", root=str(root), stream=True), CPU)
    assert torch.load(tmp_path / "0.pt") == torch.load(tmp_path / "1.pt") \
        == (alone.mean, alone.std)


# --- ImageNet --------------------------------------------------------------------------------

SIZES = ((300, 260), (180, 400), (250, 250), (520, 333))  # (height, width), all differ


def imagenet_tree(root: Path, classes: tuple[str, ...] = ("n01", "n02", "n03")) -> Path:
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 2)):
        for c, cls in enumerate(classes):
            for i in range(n):
                h, w = SIZES[(i + c) % len(SIZES)]
                write_image(root / split / cls / f"{cls}_{i}.jpg",
                            rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return root


def test_imagenet_streams_seeded_crops(tmp_path: Path) -> None:
    cfg = DataConfig(name="imagenet", root=str(imagenet_tree(tmp_path / "imagenet")),
                     stream=True, workers=2)
    batches = open_batches(cfg, CPU)
    assert isinstance(batches, StreamBatches)
    assert batches.spec.shape == (3, 224, 224) and batches.spec.num_classes == 3
    assert (batches.n_train, batches.n_test) == (12, 6)
    assert (batches.mean, batches.std) == (IMAGENET_MEAN, IMAGENET_STD)
    first = list(batches.train_epoch(1, 5, 0))
    assert [tuple(x.shape) for x, _ in first] == [(5, 3, 224, 224)] * 2 + [(2, 3, 224, 224)]
    assert sorted(torch.cat([y for _, y in first]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    same_batches(first, list(batches.train_epoch(1, 5, 0)))  # same seed and epoch
    x = torch.cat([x for x, _ in first])
    # Crops hang on (seed, epoch, position): any world size or resume sees the same.
    rank1 = list(batches.train_epoch(1, 5, 0, rank=1, world=2))
    assert torch.equal(rank1[0][0], x[3:5]) and torch.equal(rank1[2][0], x[11:])
    assert torch.equal(next(iter(batches.train_epoch(1, 5, 0, start_step=1)))[0], x[5:10])
    other = torch.cat([x for x, _ in batches.train_epoch(2, 5, 0)])
    assert not torch.equal(other, x)
    # The network's view: normalised with ImageNet's statistics (about zero-mean).
    assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 2.0
    # The parent folder works as data.root too; the val split in order, centre crops.
    same_root = dataclasses.replace(cfg, root=str(tmp_path), workers=0)
    test = list(StreamBatches(same_root, CPU).test_batches(4))
    assert torch.cat([y for _, y in test]).tolist() == [0, 0, 1, 1, 2, 2]
    img = torch.from_numpy(np.array(Image.open(tmp_path / "imagenet/val/n01/n01_0.jpg")))
    expected = imagenet_eval_image(img.permute(2, 0, 1).contiguous()).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(test[0][0][0], (expected - mean) / std, atol=0.05)  # PIL vs torchvision
    same_batches(test, list(batches.test_batches(4)))


def test_imagenet_recipe() -> None:
    from torchvision.transforms import v2

    img = torch.randint(0, 256, (3, 300, 500), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(0))
    reference = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])(img)
    assert torch.equal(imagenet_eval_image(img), reference)
    assert imagenet_eval_image(img[:, :, :200]).shape == (3, 224, 224)
    areas, ratios = [], []
    for i in range(300):
        top, left, h, w = random_resized_box(torch.Generator().manual_seed(i), 300, 500)
        assert 0 <= top <= 300 - h and 0 <= left <= 500 - w
        areas.append(h * w / (300 * 500))
        ratios.append(w / h)
    # At most a 300x400 crop fits a 300x500 image at ratio <= 4/3: 0.8 of its area.
    assert 0.08 <= min(areas) < 0.15 and 0.7 < max(areas) <= 0.8
    assert min(ratios) > 0.74 and max(ratios) < 1.35  # 3/4 and 4/3, rounded to pixels
    # Nothing fits a 1:10 strip at these ratios often: the fallback is a centred crop.
    assert random_resized_box(torch.Generator().manual_seed(0), 10, 100,
                              scale=(1.0, 1.0)) == (0, 43, 10, 13)
    out = imagenet_train_image(img, torch.Generator().manual_seed(3))
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    assert torch.equal(out, imagenet_train_image(img, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, imagenet_train_image(img, torch.Generator().manual_seed(4)))


# --- errors ----------------------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("name", ["mnist", "planted_teacher", "cifar100", "fashion_mnist"])
def test_streaming_a_dataset_held_in_memory_is_an_error(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        open_batches(DataConfig(name=name, root=str(tmp_path), stream=True), CPU)
    text = one_line(exc)
    assert text.startswith(f"dataset {name} is not read from image files")
    assert "data.stream = false" in text and "imagenet" in text


def test_cifar10_from_python_batches_cannot_stream(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    folder_tree(tmp_path / "cifar10-jpg")
    with pytest.raises(DataError) as exc:
        open_batches(DataConfig(name="cifar10", root=str(tmp_path), stream=True), CPU)
    assert "python batch files" in one_line(exc) and "cifar10-jpg" in str(exc.value)
    (tmp_path / "cifar-10-batches-py").rmdir()  # now the JPEG tree is read: wrong classes
    with pytest.raises(DataError) as exc:
        open_batches(DataConfig(name="cifar10", root=str(tmp_path), stream=True), CPU)
    assert "class folders of" in one_line(exc) and "'airplane'" in str(exc.value)


def test_missing_datasets(tmp_path: Path) -> None:
    for name, fragment in (("imagenet", "val/<class>/"), ("imagefolder", "test/<class>/"),
                           ("cifar10", "cifar10-jpg/train")):
        with pytest.raises(DataError) as exc:
            open_batches(DataConfig(name=name, root=str(tmp_path), stream=True), CPU)
        assert f"dataset {name} not found" in one_line(exc) and fragment in str(exc.value)


def test_imagenet_in_memory_is_an_error(tmp_path: Path) -> None:
    imagenet_tree(tmp_path)
    with pytest.raises(DataError) as exc:
        open_batches(DataConfig(name="imagenet", root=str(tmp_path)), CPU)
    assert "set data.stream = true" in one_line(exc)


def test_images_of_another_size_are_found_when_opening(tmp_path: Path) -> None:
    root = folder_tree(tmp_path)
    write_image(root / "train/bee/odd.png", np.zeros((30, 32, 3), np.uint8))
    with pytest.raises(DataError) as exc:
        StreamBatches(DataConfig(name="imagefolder", root=str(root), stream=True), CPU)
    assert "odd.png is 32x30" in one_line(exc) and "resize them all" in str(exc.value)
    (root / "train/bee/odd.png").unlink()
    write_image(root / "test/cat/odd.png", np.zeros((32, 31, 3), np.uint8))
    with pytest.raises(DataError) as exc:
        StreamBatches(DataConfig(name="imagefolder", root=str(root), stream=True), CPU)
    assert "odd.png is 31x32" in one_line(exc)


def test_a_damaged_image_is_one_line_from_a_worker(tmp_path: Path) -> None:
    root = imagenet_tree(tmp_path)
    (root / "train/n02/n02_1.jpg").write_bytes(b"not a jpeg")
    batches = StreamBatches(DataConfig(name="imagenet", root=str(root), stream=True,
                                       workers=2), CPU)
    with pytest.raises(DataError) as exc:
        list(batches.train_epoch(0, 4, 0))
    assert "n02_1.jpg" in one_line(exc) and "cannot read image" in str(exc.value)
    assert math.isfinite(float(next(iter(batches.test_batches(6)))[0].sum()))
