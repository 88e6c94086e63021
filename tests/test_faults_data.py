"""Bad data on disk ends as one `slt: error:` line naming the file, before anything is written.

Each fault is injected the way it happens in life: small MNIST idx files, CIFAR python
pickles and PNG class trees written into a temporary data root, some of them damaged; then
the real CLI runs a search on them and must exit 2 with one line that names the file or
folder at fault, leaving --out without a run directory.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slt.cli import main
from slt.config.schema import DataConfig
from slt.data.datasets import load_data
from slt.data.files import CIFAR10_CLASSES
from slt.data.splits import Origin, Part, Splits
from slt.errors import DataError
from slt.spec import DataSpec
from tests.conftest import REPO, SHARED_DATA

RAW = "MNIST/raw"
SEARCH = ["model.name=mlp", "model.hidden=[8]", "search.epochs=1", "search.batch_size=16",
          "search.ticket_density=0.5", "source.density=1.0", "run.progress=false",
          "run.device=cpu"]


# --- writing data the way it exists on disk ----------------------------------------------------


def idx_bytes(dims: list[int], data: bytes) -> bytes:
    """An idx file of unsigned bytes: magic 0x0000080N, N big-endian uint32 dims, the data."""
    head = (0x0800 + len(dims)).to_bytes(4, "big")
    return head + b"".join(d.to_bytes(4, "big") for d in dims) + data


def write_mnist(root: Path, n_train: int = 24, n_test: int = 8, size: tuple[int, int] = (28, 28),
                test_size: tuple[int, int] | None = None) -> Path:
    """root/MNIST/raw with four small valid idx files (labels i % 10); returns the raw folder."""
    raw = root / RAW
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n, (h, w) in (("train", n_train, size), ("t10k", n_test, test_size or size)):
        pixels = rng.integers(0, 256, (n, h, w), dtype=np.uint8).tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes([n, h, w], pixels))
        labels = bytes(i % 10 for i in range(n))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes([n], labels))
    return raw


def write_cifar10(root: Path, per_file: int = 6) -> Path:
    """root/cifar-10-batches-py with the six batch files of the python release, small."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"batch_label": name,
                 "data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(per_file)],
                 "filenames": [f"{i}.png" for i in range(per_file)]}
        with open(base / name, "wb") as fh:
            pickle.dump(entry, fh)
    return base


def rewrite_pickle(path: Path, **changes: object) -> None:
    with open(path, "rb") as fh:
        entry = pickle.load(fh)
    entry.update(changes)
    with open(path, "wb") as fh:
        pickle.dump(entry, fh)


def write_png(path: Path, size: tuple[int, int] = (16, 16), level: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), level, dtype=np.uint8)).save(path)


def write_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3,
               size: tuple[int, int] = (16, 16)) -> None:
    """root/{train,test}/<class>/<i>.png, all of one size."""
    for split in ("train", "test"):
        for c, cls in enumerate(classes):
            for i in range(per_class):
                write_png(root / split / cls / f"{i}.png", size, level=(20 * c + i) % 256)


# --- running the CLI -----------------------------------------------------------------------


def search(capsys: pytest.CaptureFixture[str], out: Path, dataset: str, root: Path,
           *extra: str) -> tuple[int, list[str]]:
    """`slt search` on `dataset` under `root`; (exit code, stderr lines)."""
    argv = ["search", "--config", "quick.toml", "--out", str(out), "--no-progress",
            "--set", f"data.name={dataset}", "--set", f"data.root={root}"]
    for item in [*SEARCH, *extra]:
        argv += ["--set", item]
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.splitlines()


def assert_refused(code: int, err: list[str], out: Path, *named: object) -> str:
    """Exit 2, one `slt: error:` line naming every `named` path, no run directory."""
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("slt: error: ")
    for thing in named:
        assert str(thing) in err[0], (thing, err[0])
    assert not out.exists() or list(out.iterdir()) == []
    return err[0]


# --- the healthy baseline: the same files, undamaged, run ---------------------------------


def test_small_valid_mnist_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_mnist(tmp_path / "data")
    code, err = search(capsys, tmp_path / "out", "mnist", tmp_path / "data")
    assert code == 0, err
    (run_dir,) = (tmp_path / "out").iterdir()
    assert (run_dir / "summary.json").is_file() and (run_dir / "ticket.slt").is_file()


def test_small_valid_cifar10_pickles_load(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    s = load_data(DataConfig(name="cifar10", root=str(tmp_path)))
    assert s.train_x.shape == (30, 3, 32, 32) and s.test_x.shape == (6, 3, 32, 32)
    assert s.train_y.tolist() == [i % 10 for i in range(6)] * 5
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as fh:
        raw = pickle.load(fh)["data"]
    # CHW from the python release's rows of 1024 red, 1024 green, 1024 blue values
    assert s.train_x[6].flatten().tolist() == raw[0].tolist()


# --- MNIST idx files -----------------------------------------------------------------------


def test_mnist_labels_fewer_than_images(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_mnist(tmp_path / "data")
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes([20], bytes(range(10)) * 2))  # 20 labels for 24 images
    code, err = search(capsys, tmp_path / "out", "mnist", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", "dataset mnist", labels,
                          raw / "train-images-idx3-ubyte")
    assert "holds 20 labels" in line and "holds 24 images" in line


@pytest.mark.data
def test_real_mnist_with_a_shortened_label_file(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The real files, the train labels cut to 59,990 (header and data agree): the counts
    of the two files differ, which only the pair can tell."""
    if not (SHARED_DATA / RAW).is_dir():
        pytest.skip(f"MNIST not found at {SHARED_DATA / RAW}")
    raw = tmp_path / "data" / RAW
    shutil.copytree(SHARED_DATA / RAW, raw)
    labels = raw / "train-labels-idx1-ubyte"
    os.chmod(labels, 0o644)
    data = labels.read_bytes()
    labels.write_bytes(idx_bytes([59990], data[8:8 + 59990]))
    code, err = search(capsys, tmp_path / "out", "mnist", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", labels, raw / "train-images-idx3-ubyte")
    assert "59990 labels" in line and "60000 images" in line


def test_mnist_truncated_label_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_mnist(tmp_path / "data")
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])  # a copy cut short: header says 8 labels
    code, err = search(capsys, tmp_path / "out", "mnist", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", labels)
    assert "should hold 8 bytes after its header but holds 5" in line


def test_mnist_label_outside_the_classes(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_mnist(tmp_path / "data")
    labels = raw / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[8 + 17] = 12  # example 17 gets label 12
    labels.write_bytes(bytes(data))
    code, err = search(capsys, tmp_path / "out", "mnist", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", labels)
    assert "holds label 12 (example 17), outside the 10 classes 0..9" in line


@pytest.mark.parametrize("prefix, split", [("train", "train"), ("t10k", "test")])
def test_mnist_file_with_zero_images(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     prefix: str, split: str) -> None:
    raw = write_mnist(tmp_path / "data")
    images = raw / f"{prefix}-images-idx3-ubyte"
    images.write_bytes(idx_bytes([0, 28, 28], b""))
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes([0], b""))
    code, err = search(capsys, tmp_path / "out", "mnist", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", images)
    assert f"holds no images: the {split} split is empty" in line


def test_mnist_files_swapped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_mnist(tmp_path / "data")
    labels = raw / "train-labels-idx1-ubyte"
    shutil.copy(raw / "train-images-idx3-ubyte", labels)
    code, err = search(capsys, tmp_path / "out", "mnist", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", labels)
    assert "magic 0x00000803, expected 0x00000801" in line


def test_mnist_test_images_of_another_size(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_mnist(tmp_path / "data", test_size=(27, 28))
    code, err = search(capsys, tmp_path / "out", "mnist", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", raw / "t10k-images-idx3-ubyte")
    assert "shape 1x27x28, expected 1x28x28 as in the train split" in line


@pytest.mark.slow
def test_fault_through_the_installed_command(tmp_path: Path) -> None:
    """The same promise from a separate process: `python -m slt.cli`, stderr and exit code."""
    raw = write_mnist(tmp_path / "data")
    labels = raw / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[8] = 200
    labels.write_bytes(bytes(data))
    argv = [sys.executable, "-m", "slt.cli", "search", "--config", "quick.toml",
            "--out", str(tmp_path / "out"), "--set", "data.name=mnist",
            "--set", f"data.root={tmp_path / 'data'}"]
    for item in SEARCH:
        argv += ["--set", item]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_refused(proc.returncode, proc.stderr.splitlines(), tmp_path / "out", labels,
                   "label 200 (example 0)")


# --- CIFAR python pickles ------------------------------------------------------------------


def test_cifar_pickle_with_fewer_labels(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    batch = write_cifar10(tmp_path / "data") / "data_batch_3"
    rewrite_pickle(batch, labels=[1, 2, 3, 4])  # 4 labels for 6 images
    code, err = search(capsys, tmp_path / "out", "cifar10", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", "dataset cifar10", batch)
    assert "holds 6 images but 4 labels" in line


def test_cifar_label_outside_the_classes(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    batch = write_cifar10(tmp_path / "data") / "test_batch"
    rewrite_pickle(batch, labels=[0, 1, 2, 3, 10, 5])
    code, err = search(capsys, tmp_path / "out", "cifar10", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", batch)
    assert "holds label 10 (example 4), outside the 10 classes 0..9" in line


def test_cifar_label_outside_the_classes_in_a_later_file(tmp_path: Path) -> None:
    """The message points into the file holding the bad label, not the concatenated split."""
    batch = write_cifar10(tmp_path) / "data_batch_4"
    rewrite_pickle(batch, labels=[0, 1, -1, 3, 4, 5])
    with pytest.raises(DataError, match="holds label -1 \\(example 2\\)") as err:
        load_data(DataConfig(name="cifar10", root=str(tmp_path)))
    assert str(batch) in str(err.value)


def test_cifar_file_that_is_not_a_pickle(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    batch = write_cifar10(tmp_path / "data") / "data_batch_1"
    batch.write_bytes(b"<html>404 not found</html>")
    code, err = search(capsys, tmp_path / "out", "cifar10", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", batch)
    assert "is not a CIFAR python batch file" in line


def test_cifar_batch_file_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_cifar10(tmp_path / "data")
    (base / "data_batch_5").unlink()
    code, err = search(capsys, tmp_path / "out", "cifar10", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", base)
    assert "lacks data_batch_5" in line


def test_cifar_rows_of_the_wrong_length(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    batch = write_cifar10(tmp_path / "data") / "data_batch_2"
    rewrite_pickle(batch, data=np.zeros((6, 1024), dtype=np.uint8))  # grey 32x32, not RGB
    code, err = search(capsys, tmp_path / "out", "cifar10", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", batch)
    assert "(6, 1024)" in line and "3072" in line


# --- image folders -------------------------------------------------------------------------


def test_empty_class_folder_in_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tree(tmp_path / "data")
    empty = tmp_path / "data" / "train" / "bird"
    empty.mkdir()
    (empty / "README.txt").write_text("images to come")  # not an image
    code, err = search(capsys, tmp_path / "out", "imagefolder", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", "dataset imagefolder", empty)
    assert "holds no images" in line


def test_empty_class_folder_in_test_is_allowed(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A test split may lack a class (its folder missing, or empty): it is only evaluated."""
    write_tree(tmp_path / "data")
    for f in (tmp_path / "data" / "test" / "dog").iterdir():
        f.unlink()
    code, err = search(capsys, tmp_path / "out", "imagefolder", tmp_path / "data")
    assert code == 0, err
    s = load_data(DataConfig(name="imagefolder", root=str(tmp_path / "data")))
    assert s.spec.num_classes == 2 and s.test_y.tolist() == [0, 0, 0]


def test_images_of_differing_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tree(tmp_path / "data")
    odd = tmp_path / "data" / "train" / "dog" / "odd.png"
    write_png(odd, size=(20, 24))
    code, err = search(capsys, tmp_path / "out", "imagefolder", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", odd,
                          tmp_path / "data" / "train" / "cat" / "0.png")
    assert "images differ in size" in line and "24x20" in line and "16x16" in line


def test_test_split_of_another_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tree(tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "test")
    for cls in ("cat", "dog"):
        write_png(tmp_path / "data" / "test" / cls / "0.png", size=(32, 32))
    code, err = search(capsys, tmp_path / "out", "imagefolder", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", tmp_path / "data" / "test")
    assert "shape 3x32x32, expected 3x16x16 as in the train split" in line


def test_empty_test_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tree(tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "test")
    for cls in ("cat", "dog"):
        (tmp_path / "data" / "test" / cls).mkdir(parents=True)
    code, err = search(capsys, tmp_path / "out", "imagefolder", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", tmp_path / "data" / "test")
    assert "no images" in line


def test_cifar10_jpeg_tree_with_an_empty_class(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    jpg = tmp_path / "data" / "cifar10-jpg"
    write_tree(jpg, classes=CIFAR10_CLASSES, per_class=1, size=(32, 32))
    for f in (jpg / "train" / "frog").iterdir():
        f.unlink()
    code, err = search(capsys, tmp_path / "out", "cifar10", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", "dataset cifar10",
                          jpg / "train" / "frog")
    assert "holds no images" in line


# --- the check itself, for loaders that build Splits directly ------------------------------


def test_every_splits_is_checked_on_construction() -> None:
    """A plug-in loader cannot hand the search bad data either: Splits checks itself."""
    x = torch.zeros(4, 3)
    good = torch.tensor([0, 1, 2, 0])
    spec = DataSpec((3,), 3)
    with pytest.raises(DataError, match="the train split has 4 images but 3 labels"):
        Splits(x, good[:3], x, good, spec, (0.0,), (1.0,))
    with pytest.raises(DataError, match="the test split holds label 3 \\(example 1\\)"):
        Splits(x, good, x, torch.tensor([0, 3, 1, 1]), spec, (0.0,), (1.0,))
    with pytest.raises(DataError, match="the test split holds no images"):
        Splits(x, good, x[:0], good[:0], spec, (0.0,), (1.0,))
    with pytest.raises(DataError, match="labels of the train split are torch.float32"):
        Splits(x, good.float(), x, good, spec, (0.0,), (1.0,))
    with pytest.raises(DataError, match="shape 4, expected 3"):
        Splits(torch.zeros(4, 4), good, x, good, spec, (0.0,), (1.0,))
    assert Splits(x, good, x, good, spec, (0.0,), (1.0,)).spec == spec


def test_part_counts_name_the_pair_of_files() -> None:
    x, y = torch.zeros(5, 2), torch.zeros(4, dtype=torch.int64)
    origin = Origin("toy", (Part("a.img", "a.lab", 5, 4),), (Part("t", "t", 4, 4),))
    with pytest.raises(DataError, match="dataset toy: a.lab holds 4 labels but a.img holds 5"):
        Splits(x, y, x[:4], y, DataSpec((2,), 2), (0.0,), (1.0,), origin=origin)
