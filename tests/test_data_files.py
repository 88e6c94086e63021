"""Datasets in memory, epoch order from (seed, epoch), normalisation, crop+flip, loaders."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slt.config.schema import DataConfig
from slt.data.datasets import DATASETS, load_data, planted_teacher_task
from slt.data.files import CIFAR10_CLASSES, data_root, read_image_tree
from slt.data.memory import Batches
from slt.data.order import PAD, crop_flip
from slt.data.splits import Splits, channel_stats
from slt.errors import DataError
from slt.seeding import derive_seed
from slt.spec import DataSpec

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CPU = torch.device("cpu")


def teacher_cfg(**kw: object) -> DataConfig:
    return DataConfig(name="planted_teacher", **kw)


def index_splits(n_train: int = 103, n_test: int = 17) -> Splits:
    """Vector data whose single feature is the example's index; label = index % 7."""
    train = torch.arange(n_train, dtype=torch.float32)[:, None]
    test = torch.arange(n_test, dtype=torch.float32)[:, None]
    return Splits(train, torch.arange(n_train) % 7, test, torch.arange(n_test) % 7,
                  DataSpec((1,), 7), (0.0,), (1.0,))


def epoch_indices(batches: Batches, epoch: int, batch_size: int, seed: int) -> list[int]:
    return [int(v) for x, _ in batches.train_epoch(epoch, batch_size, seed) for v in x[:, 0]]


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


# --- registry and seeds ----------------------------------------------------------------------


def test_registered_datasets() -> None:
    assert DATASETS.names() == ["cifar10", "cifar100", "fashion_mnist", "imagefolder",
                                "imagenet", "mnist", "planted_teacher"]


def test_derived_seeds_are_stable_across_versions() -> None:
    # Resuming a run on another machine or release must give the same epoch order.
    assert derive_seed("epoch", 0, 1) == 9078349444151840633
    assert derive_seed("epoch", -5, 3) == 2536953649385754238
    assert derive_seed("epoch", 0, 2) != derive_seed("epoch", 0, 1)


# --- planted teacher -------------------------------------------------------------------------


def test_planted_teacher_shapes_and_dtypes() -> None:
    s = load_data(teacher_cfg(input_dim=12, num_classes=4, train_size=300, test_size=50))
    assert s.train_x.shape == (300, 12) and s.test_x.shape == (50, 12)
    assert s.train_x.dtype == s.test_x.dtype == torch.float32
    assert s.train_y.dtype == s.test_y.dtype == torch.int64
    assert s.spec == DataSpec((12,), 4)
    assert (s.mean, s.std, s.augment) == ((0.0,), (1.0,), False)
    assert 0 <= int(s.train_y.min()) and int(s.train_y.max()) < 4
    # inputs ~ N(0, I)
    assert abs(float(s.train_x.mean())) < 0.05 and abs(float(s.train_x.std()) - 1) < 0.05


def test_planted_teacher_is_deterministic_per_seed() -> None:
    torch.manual_seed(123)  # the global RNG must not matter
    a = load_data(teacher_cfg(seed=3))
    torch.manual_seed(456)
    b = load_data(teacher_cfg(seed=3))
    c = load_data(teacher_cfg(seed=4))
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.train_x, c.train_x)
    assert not torch.equal(a.test_y, c.test_y)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_planted_teacher_classes_are_balanced(seed: int) -> None:
    s = load_data(teacher_cfg(seed=seed))  # defaults: 10 classes, 8192 + 2048 examples
    counts = torch.bincount(s.train_y, minlength=10)
    assert int(counts.min()) > 0 and int(counts.sum()) == 8192
    assert int(counts.max()) < 3 * int(counts.min()), counts.tolist()
    assert len(torch.unique(s.test_y)) == 10


def test_planted_teacher_labels_come_from_the_teacher() -> None:
    cfg = teacher_cfg(input_dim=6, teacher_hidden=9, num_classes=5, train_size=500,
                      test_size=200, seed=7)
    s, teacher = planted_teacher_task(cfg)
    w1, w2 = teacher.weights
    assert w1.shape == (9, 6) and w2.shape == (5, 9)
    assert torch.equal(teacher.labels(s.train_x), s.train_y)
    assert torch.equal(teacher.labels(s.test_x), s.test_y)
    # By hand: argmax over classes of the raw logits standardised with train statistics.
    raw = torch.relu(s.train_x.double() @ w1.T) @ w2.T
    assert torch.allclose(teacher.centre, raw.mean(0))
    by_hand = ((raw - raw.mean(0)) / raw.std(0, correction=0)).argmax(1)
    assert torch.equal(by_hand, s.train_y)
    # Without the per-class centring the labels differ (it is doing something).
    assert not torch.equal(raw.argmax(1), s.train_y)


def test_bias_free_deep_teacher_is_its_weights_and_balances_classes() -> None:
    """data.teacher_bias = false: the logits are the chain of weights alone (what a plant
    writes into a bias-free student), centred and of unit std per class on the training
    inputs; data.teacher_depth sets the hidden layers."""
    cfg = teacher_cfg(input_dim=12, teacher_hidden=16, teacher_depth=3, teacher_bias=False,
                      num_classes=6, train_size=4000, test_size=100, seed=3)
    s, teacher = planted_teacher_task(cfg)
    assert [tuple(w.shape) for w in teacher.weights] == [(16, 12), (16, 16), (16, 16), (6, 16)]
    h = s.train_x.double()
    for w in teacher.weights[:-1]:
        h = torch.relu(h @ w.T)
    logits = h @ teacher.weights[-1].T
    assert torch.equal(teacher.logits(s.train_x), logits)
    assert float(logits.mean(0).abs().max()) < 1e-12
    assert torch.allclose(logits.std(0, correction=0), torch.ones(6, dtype=torch.float64))
    assert torch.equal(logits.argmax(1), s.train_y)
    counts = torch.bincount(s.train_y, minlength=6)
    assert int(counts.min()) > 4000 // 6 // 3, counts.tolist()
    # the default teacher is unchanged by the new keys: depth 1 with a bias
    plain = planted_teacher_task(teacher_cfg(input_dim=12, teacher_hidden=16, num_classes=6,
                                             train_size=4000, test_size=100, seed=3))[1]
    assert len(plain.weights) == 2 and torch.equal(plain.weights[0], teacher.weights[0])


def test_planted_teacher_train_set_does_not_depend_on_test_size() -> None:
    a = load_data(teacher_cfg(test_size=100))
    b = load_data(teacher_cfg(test_size=300))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.test_x, b.test_x[:100])


# --- batches ---------------------------------------------------------------------------------


def test_an_epoch_covers_every_example_once_and_last_batch_is_smaller() -> None:
    batches = Batches(index_splits(103), CPU)
    assert batches.len_train_batches(10) == 11 and batches.len_train_batches(103) == 1
    got = list(batches.train_epoch(1, 10, seed=0))
    assert [len(y) for _, y in got] == [10] * 10 + [3]
    order = [int(v) for x, _ in got for v in x[:, 0]]
    assert sorted(order) == list(range(103))
    assert order != list(range(103))  # shuffled
    for x, y in got:  # labels travel with their inputs
        assert torch.equal(y, x[:, 0].long() % 7)
        assert x.dtype == torch.float32 and y.dtype == torch.int64


def test_epoch_order_comes_from_seed_and_epoch_only() -> None:
    batches = Batches(index_splits(103), CPU)
    torch.manual_seed(1)
    first = epoch_indices(batches, 3, 16, seed=5)
    torch.manual_seed(2)
    assert epoch_indices(batches, 3, 16, seed=5) == first
    assert epoch_indices(Batches(index_splits(103), CPU), 3, 16, seed=5) == first
    # the batch size cuts the same order differently; it does not change it
    assert epoch_indices(batches, 3, 50, seed=5) == first
    assert epoch_indices(batches, 4, 16, seed=5) != first
    assert epoch_indices(batches, 3, 16, seed=6) != first


def test_test_batches_are_in_order_and_complete() -> None:
    batches = Batches(index_splits(103, 17), CPU)
    got = list(batches.test_batches(5))
    assert [len(y) for _, y in got] == [5, 5, 5, 2]
    assert [int(v) for x, _ in got for v in x[:, 0]] == list(range(17))


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch size"):
        Batches(index_splits(), CPU).len_train_batches(0)


def test_normalisation_of_images() -> None:
    x = torch.tensor([[[[0, 51], [102, 255]]]], dtype=torch.uint8)  # 1 image, 1 channel, 2x2
    s = Splits(x, torch.tensor([0]), x, torch.tensor([0]), DataSpec((1, 2, 2), 2), (0.2,), (0.5,))
    (got, y), = Batches(s, CPU).test_batches(8)
    expected = torch.tensor([[[[-0.4, 0.0], [0.4, 1.6]]]])  # (v / 255 - 0.2) / 0.5
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-6)
    (train, _), = Batches(s, CPU).train_epoch(1, 8, seed=0)
    assert torch.allclose(train, expected, atol=1e-6)  # augment=False: only normalised


def test_normalisation_per_channel() -> None:
    x = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    s = Splits(x, torch.tensor([0]), x, torch.tensor([0]), DataSpec((3, 1, 1), 1),
               (0.0, 0.5, 1.0), (1.0, 0.5, 0.25))
    (got, _), = Batches(s, CPU).test_batches(1)
    assert got.flatten().tolist() == [1.0, 1.0, 0.0]


def test_channel_stats_are_exact() -> None:
    x = torch.tensor([0, 255, 255, 255], dtype=torch.uint8).view(4, 1, 1, 1)
    x = torch.cat([x, torch.full_like(x, 51)], dim=1)  # channel 1 is constant
    mean, std = channel_stats(x)
    assert mean[0] == pytest.approx(0.75) and std[0] == pytest.approx(math.sqrt(0.75 * 0.25))
    assert mean[1] == pytest.approx(0.2) and std[1] == 1.0  # constant: never divide by 0


# --- crop and flip ---------------------------------------------------------------------------


def test_crop_flip_identity_and_flip() -> None:
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    center = torch.full((5,), PAD)
    no, yes = torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool)
    assert torch.equal(crop_flip(x, center, center, no), x)
    assert torch.equal(crop_flip(x, center, center, yes), x.flip(-1))
    assert crop_flip(x, center - 3, center + 4, yes).shape == x.shape


def test_crop_flip_on_a_hand_made_image() -> None:
    img = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    x = torch.cat([img, img, img])  # one batch, a different crop and flip per image
    dy, dx = torch.tensor([0, 2, 1]), torch.tensor([0, 1, 2])
    flip = torch.tensor([False, True, True])
    out = crop_flip(x, dy, dx, flip, pad=1)
    # dy=dx=0: the window starts in the padding: content moves down and right by one.
    assert out[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    # dy=2, dx=1: content moves up one row, then the image is mirrored.
    assert out[1, 0].tolist() == [[6, 5, 4], [9, 8, 7], [0, 0, 0]]
    # dy=1, dx=2: content moves left one column, then mirrored.
    assert out[2, 0].tolist() == [[0, 3, 2], [0, 6, 5], [0, 9, 8]]


def test_crop_flip_moves_all_channels_together() -> None:
    x = torch.stack([torch.arange(16).view(4, 4) + 16 * c for c in range(3)])[None].to(torch.uint8)
    out = crop_flip(x, torch.tensor([3]), torch.tensor([5]), torch.tensor([True]), pad=4)
    expected = shifted(x, 1, -1).flip(-1)  # down 1, left 1, mirrored
    assert torch.equal(out, expected)


def shifted(x: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """Reference: content moved by (down, right) with zeros filling in, by slicing."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    src_r = slice(max(0, -down), h - max(0, down))
    dst_r = slice(max(0, down), h - max(0, -down))
    src_c = slice(max(0, -right), w - max(0, right))
    dst_c = slice(max(0, right), w - max(0, -right))
    out[..., dst_r, dst_c] = x[..., src_r, src_c]
    return out


def test_augmented_epoch_applies_one_of_the_crops_and_flips() -> None:
    n = 24
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    s = Splits(x, torch.arange(n), x, torch.arange(n), DataSpec((3, 32, 32), n), mean, std,
               augment=True)
    batches = Batches(s, CPU)
    seen_flip = seen_plain = seen_shift = False
    for xb, yb in batches.train_epoch(2, 10, seed=1):
        assert xb.shape[1:] == (3, 32, 32) and xb.dtype == torch.float32
        for img, label in zip(xb, yb):
            # Every candidate augmentation of the source image, normalised like the batch.
            src = x[int(label)].expand(2 * (2 * PAD + 1) ** 2, 3, 32, 32)
            grid = torch.cartesian_prod(torch.arange(2 * PAD + 1), torch.arange(2 * PAD + 1),
                                        torch.tensor([0, 1]))
            cands = batches.normalise(crop_flip(src, grid[:, 0], grid[:, 1], grid[:, 2].bool()))
            hits = [i for i in range(len(cands)) if torch.allclose(cands[i], img)]
            assert hits, "an augmented image that no crop+flip produces"
            dy, dx, f = grid[hits[0]].tolist()
            seen_flip |= bool(f)
            seen_plain |= not f
            seen_shift |= (dy, dx) != (PAD, PAD)
    assert seen_flip and seen_plain and seen_shift
    again = [xb for xb, _ in batches.train_epoch(2, 10, seed=1)]
    first = [xb for xb, _ in batches.train_epoch(2, 10, seed=1)]
    assert all(torch.equal(a, b) for a, b in zip(again, first))
    (test_x, _), = batches.test_batches(n)
    assert torch.equal(test_x, batches.normalise(x))  # the test split is never augmented


@pytest.mark.cuda
def test_cpu_and_cuda_see_the_same_epoch() -> None:
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    s = Splits(x, torch.arange(40), x, torch.arange(40), DataSpec((3, 32, 32), 40),
               (0.5,) * 3, (0.25,) * 3, augment=True)
    cpu = list(Batches(s, CPU).train_epoch(1, 16, seed=0))
    gpu = list(Batches(s, torch.device("cuda")).train_epoch(1, 16, seed=0))
    for (a, ya), (b, yb) in zip(cpu, gpu):
        assert torch.equal(ya, yb.cpu()) and torch.allclose(a, b.cpu(), atol=1e-6)


# --- image folders and CIFAR-10 as JPEGs ----------------------------------------------------


def make_tree(root: Path, classes: dict[str, list[int]], size: int = 32) -> None:
    """root/<split>/<class>/<i>.png, each image one flat grey level."""
    for split in ("train", "test"):
        for cls, levels in classes.items():
            for i, level in enumerate(levels):
                pixels = np.full((size, size, 3), level, dtype=np.uint8)
                write_png(root / split / cls / f"{i}.png", pixels)


def test_imagefolder_loader(tmp_path: Path) -> None:
    make_tree(tmp_path, {"b_second": [200, 100], "a_first": [0]})
    write_png(tmp_path / "train" / "a_first" / "grey.png", np.full((32, 32), 60, np.uint8))
    (tmp_path / "train" / "a_first" / "notes.txt").write_text("not an image")
    s = load_data(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert s.spec == DataSpec((3, 32, 32), 2)
    assert s.train_x.dtype == torch.uint8 and s.train_x.shape == (4, 3, 32, 32)
    # classes sorted by name; files sorted inside a class; grey converted to RGB
    assert s.train_y.tolist() == [0, 0, 1, 1]
    assert [int(img[0, 0, 0]) for img in s.train_x] == [0, 60, 200, 100]
    assert bool((s.train_x[1] == 60).all())
    assert s.test_y.tolist() == [0, 1, 1]
    assert s.mean == pytest.approx((360 / 4 / 255,) * 3)
    assert s.augment  # 32x32 colour and data.augment
    no_aug = load_data(DataConfig(name="imagefolder", root=str(tmp_path), augment=False))
    assert not no_aug.augment


def test_imagefolder_of_other_sizes_is_not_augmented(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": [1], "b": [2]}, size=16)
    s = load_data(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert s.spec.shape == (3, 16, 16) and not s.augment


def test_imagefolder_images_of_different_sizes(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": [1], "b": [2]})
    odd = tmp_path / "train" / "b" / "odd.png"
    write_png(odd, np.zeros((20, 24, 3), np.uint8))
    with pytest.raises(DataError, match="differ in size") as err:
        load_data(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert str(odd) in str(err.value) and "24x20" in str(err.value)


def test_imagefolder_test_class_missing_from_train(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": [1], "b": [2]})
    write_png(tmp_path / "test" / "zebra" / "0.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="zebra"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_unreadable_image(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": [1], "b": [2]})
    bad = tmp_path / "train" / "a" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image") as err:
        load_data(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert str(bad) in str(err.value)


def test_cifar10_falls_back_to_a_jpeg_tree(tmp_path: Path) -> None:
    make_tree(tmp_path / "cifar10-jpg", {c: [10 * i] for i, c in enumerate(CIFAR10_CLASSES)})
    s = load_data(DataConfig(name="cifar10", root=str(tmp_path)))
    assert s.spec == DataSpec((3, 32, 32), 10) and s.augment
    assert s.train_y.tolist() == list(range(10)) == s.test_y.tolist()
    assert [int(img[0, 0, 0]) for img in s.test_x] == [10 * i for i in range(10)]


def test_cifar10_jpeg_tree_with_other_classes(tmp_path: Path) -> None:
    make_tree(tmp_path / "cifar10-jpg", {"cats": [1], "dogs": [2]})
    with pytest.raises(DataError, match="class folders"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path)))


@pytest.mark.data
@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpg" / "test").is_dir(),
                    reason=f"CIFAR-10 JPEG tree not found at {SHARED_DATA / 'cifar10-jpg'}")
def test_real_cifar10_jpeg_test_split() -> None:
    # The test split only (10,000 JPEGs, about a second): the full load takes ~5 s.
    x, y, classes = read_image_tree(SHARED_DATA / "cifar10-jpg" / "test", CIFAR10_CLASSES)
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [1000] * 10
    assert classes == list(CIFAR10_CLASSES)
    mean, _ = channel_stats(x)
    assert mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.01)  # CIFAR-10's known means


# --- MNIST -----------------------------------------------------------------------------------


@pytest.mark.data
def test_real_mnist() -> None:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found at {SHARED_DATA / 'MNIST' / 'raw'}")
    s = load_data(DataConfig(name="mnist", root=str(SHARED_DATA)))
    assert s.train_x.shape == (60000, 1, 28, 28) and s.test_x.shape == (10000, 1, 28, 28)
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert s.spec == DataSpec((1, 28, 28), 10) and not s.augment
    counts = torch.bincount(s.test_y, minlength=10)
    assert int(counts.sum()) == 10000 and len(counts) == 10
    assert counts[1] == 1135  # the well-known size of the test set's class "1"
    assert s.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert s.std[0] == pytest.approx(0.3081, abs=1e-4)
    (x, _), = Batches(dataclasses.replace(s, train_x=s.train_x[:10], train_y=s.train_y[:10]),
                      CPU).train_epoch(1, 10, seed=0)
    assert x.shape == (10, 1, 28, 28)


# --- missing data and paths ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"])
def test_missing_dataset_says_where_it_looked(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name=name, root=str(tmp_path)))
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert str(tmp_path) in msg and "data.root" in msg and name in msg
    assert ("data.download = true" in msg) == (name != "imagefolder")
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or created


def test_data_root_expands_home_and_defaults_to_slt_data(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_root(DataConfig(root="~/sets")) == tmp_path / "sets"
    monkeypatch.setenv("SLT_DATA", str(tmp_path / "env"))
    assert data_root(DataConfig(root="")) == tmp_path / "env"
    with pytest.raises(DataError, match=str(tmp_path / "sets" / "MNIST")):
        load_data(DataConfig(name="mnist", root="~/sets"))


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_pil_fallback_decodes_like_torchvision(tmp_path: Path) -> None:
    from slt.data.files import decode_image, torchvision_decoder

    rng = np.random.default_rng(0)
    for mode, ext in (("RGB", "png"), ("L", "png"), ("P", "png"), ("RGBA", "png"),
                      ("RGB", "bmp")):
        path = tmp_path / f"img_{mode}.{ext}"
        Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).convert(mode).save(path)
        slow = decode_image(path, None)
        assert slow.shape == (3, 5, 7) and slow.dtype == torch.uint8
        assert torch.equal(slow, decode_image(path, torchvision_decoder())), mode
