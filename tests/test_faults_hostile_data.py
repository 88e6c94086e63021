"""Data files from someone else are data: they run no code, take no memory their bytes do
not account for, and a file that is not what it claims (empty, truncated, a subset limit the
dataset cannot give) is one `slt: error:` line naming it, before a run directory exists.

Hostile files are crafted the way an attacker would write them (a pickle whose `__reduce__`
calls `os.system`, headers claiming billions of entries); the bombs are read in a child
process whose address space is capped a little above what it uses after importing slt, so a
bomb that went off would fail the test, not the machine.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slt.config.schema import DataConfig
from slt.data.datasets import load_data
from slt.data.files import read_cifar_pickle
from slt.data.stream import StreamBatches, worker_failure
from slt.errors import DataError
from tests.conftest import REPO, SHARED_DATA
from tests.test_faults_data import assert_refused, search, write_cifar10, write_tree

CPU = torch.device("cpu")


# --- CIFAR python batches as they exist --------------------------------------------------------


def py2_cifar_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch file byte for byte as the CIFAR release writes it: Python 2's cPickle at
    protocol 2, str (SHORT_BINSTRING) keys, numpy 1.x's `numpy.core.multiarray._reconstruct`,
    the pixels as one BINSTRING, labels a list of ints."""
    def s(text: bytes) -> bytes:  # a Python 2 str
        return b"U" + bytes([len(text)]) + text

    def i4(n: int) -> bytes:
        return b"J" + struct.pack("<i", n)

    rows, cols = data.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b")
             + b"\x87R" + b"(K\x01" + i4(rows) + i4(cols) + b"\x86"
             + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + s(b"|") + b"NNN" + i4(-1) + i4(-1) + b"K\x00tb"
             + b"\x89T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb")
    label_list = b"](" + b"".join(i4(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"training batch 1 of 5")
            + s(b"data") + array + s(b"labels") + label_list + b"u.")


def test_the_release_format_loads_exactly(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, (5, 3072), dtype=np.uint8)
    raw = py2_cifar_batch(data, [6, 9, 9, 4, 1])
    # the crafted bytes are what numpy and pickle read as a CIFAR batch
    reference = pickle.loads(raw, encoding="latin1")
    assert np.array_equal(reference["data"], data) and reference["labels"] == [6, 9, 9, 4, 1]
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    x, y = read_cifar_pickle(path, "labels", "cifar10")
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 32, 32)
    assert torch.equal(x.reshape(5, -1), torch.from_numpy(data))
    assert y.dtype == torch.int64 and y.tolist() == [6, 9, 9, 4, 1]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("keys", ["str", "bytes"])
def test_python3_copies_load_at_every_protocol(tmp_path: Path, protocol: int, keys: str) -> None:
    """Re-pickled batches: str or bytes keys, labels as Python or numpy ints, a Fortran
    array, under numpy 2's `numpy._core` names and protocol 5's `_frombuffer`."""
    data = np.asfortranarray(np.arange(4 * 3072, dtype=np.int64).reshape(4, 3072) % 251
                             ).astype(np.uint8)
    labels = [np.int64(3), 7, np.uint8(0), 2] if protocol >= 2 else [3, 7, 0, 2]
    entry = {"data": data, "fine_labels": labels, "filenames": ["a.png"], "extra": 1.5}
    if keys == "bytes":
        entry = {k.encode(): v for k, v in entry.items()}
    path = tmp_path / "train"
    path.write_bytes(pickle.dumps(entry, protocol=protocol))
    x, y = read_cifar_pickle(path, "fine_labels", "cifar100")
    assert torch.equal(x.reshape(4, -1), torch.from_numpy(np.ascontiguousarray(data)))
    assert y.tolist() == [3, 7, 0, 2]


# --- payloads: the file asks pickle to call something -------------------------------------------


class Call:
    """Pickles as a call of `func(*args)`: what a hostile batch file holds."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def payloads(marker: Path) -> dict[str, object]:
    return {
        "os.system": Call(os.system, f"touch {marker}"),
        "subprocess.call": Call(subprocess.call, ["touch", str(marker)]),
        "builtins.exec": Call(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.open": Call(open, str(marker), "w"),
    }


@pytest.mark.parametrize("how", ["os.system", "subprocess.call", "builtins.exec",
                                 "builtins.open"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_payload_in_a_batch_runs_nothing(tmp_path: Path, how: str, protocol: int) -> None:
    marker = tmp_path / "MARKER"
    base = write_cifar10(tmp_path / "data")
    entry = {"data": np.zeros((6, 3072), np.uint8), "labels": [0] * 6,
             "batch_label": payloads(marker)[how]}
    batch = base / "data_batch_2"
    batch.write_bytes(pickle.dumps(entry, protocol=protocol))
    before = batch.read_bytes()
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="cifar10", root=str(tmp_path / "data")))
    message = str(err.value)
    assert "\n" not in message
    assert f"{batch} is not a CIFAR python batch file: it asks for " in message
    assert "it was not run" in message
    assert not marker.exists()
    assert batch.read_bytes() == before
    # the file is a real payload: plain pickle would have run it
    pickle.loads(before)
    assert marker.exists()


def test_a_payload_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "MARKER"
    base = write_cifar10(tmp_path / "data")
    entry = {"data": np.zeros((6, 3072), np.uint8), "labels": [0] * 6,
             "x": payloads(marker)["os.system"]}
    (base / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    code, err = search(capsys, tmp_path / "out", "cifar10", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", base / "test_batch")
    assert "is not a CIFAR python batch file: it asks for posix.system" in line
    assert "Traceback" not in line
    assert not marker.exists()


def test_a_global_of_numpy_outside_the_list_is_refused(tmp_path: Path) -> None:
    """numpy is not trusted wholesale: `numpy.load` of a path the file names (an .npy with
    allow_pickle, say) is not what a batch holds."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Call(np.load, "/etc/passwd"), "labels": []}))
    with pytest.raises(DataError, match=r"it asks for numpy\.load, which a CIFAR batch"):
        read_cifar_pickle(path, "labels", "cifar10")


# --- memory bombs, read under a capped address space ---------------------------------------------


def batch(data: bytes, labels: bytes = b"]") -> bytes:
    """A protocol-4 pickle of {'data': <data opcodes>, 'labels': <labels opcodes>}."""
    return (b"\x80\x04}(X\x04\x00\x00\x00data" + data + b"X\x06\x00\x00\x00labels" + labels
            + b"u.")


def bomb_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Small files whose contents ask for gigabytes, and the message each must give."""
    folder.mkdir(parents=True, exist_ok=True)
    rec = b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
    dtype_u1 = b"cnumpy\ndtype\nX\x02\x00\x00\x00u1\x89\x88\x87R"
    dtype_obj = b"cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
    tera = b"\x8a\x06" + struct.pack("<q", 2**40)[:6]  # LONG1 2**40
    # one row of 3072 ints, remembered (MEMOIZE) and then referenced 200,000 times (BINGET):
    # 600 KB of file that np.asarray would turn into 4.9 GB
    row = pickle.dumps(list(range(3072)), protocol=2)[2:-1] + b"\x94"
    refs = b"](" + row + b"h\x00" * 200_000 + b"e"
    files = {
        # an object array of 2**40 entries: numpy's own __setstate__ allocates it first
        "object array": (batch(rec + b"(K\x01" + tera + b"\x85" + dtype_obj + b"\x89]tb"),
                         "dtype 'O8'"),
        # a 10^6 x 10^6 uint8 array over no bytes
        "array over no bytes": (batch(rec + b"(K\x01J\x40\x42\x0f\x00J\x40\x42\x0f\x00\x86"
                                      + dtype_u1 + b"\x89C\x00tb"), "(1000000, 1000000)"),
        # ndarray((2**40,)) called directly: an empty array of a terabyte
        "ndarray call": (batch(b"cnumpy\nndarray\n" + tera + b"\x85\x85R"),
                         "a call of numpy.ndarray"),
        # _reconstruct asked for a terabyte instead of numpy's (0,)
        "reconstruct shape": (batch(b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                                    + tera + b"\x85C\x01b\x87R"),
                              "_reconstruct that numpy never writes"),
        # BINBYTES8 claiming 2**40 bytes the file does not hold: C pickle allocates first
        "claimed length": (b"\x80\x04}X\x04\x00\x00\x00data\x8e" + struct.pack("<q", 2**40)
                           + b"xx", "is not a CIFAR python batch file (ValueError: expected "
                                    "1099511627776 bytes in a bytes8, but only 2 remain)"),
        # a subarray dtype whose one scalar is 10^10 bytes
        "subarray scalar": (batch(b"cnumpy._core.multiarray\nscalar\ncnumpy\ndtype\n"
                                  b"X\x10\x00\x00\x00(10000000000,)u1\x89\x88\x87RC\x00\x86R"),
                            "(10000000000,)u1"),
        "nested lists": (batch(refs), "its 'data' is a list, not a numpy array"),
        "nested labels": (batch(rec + b"(K\x01K\x00M\x00\x0c\x86" + dtype_u1 + b"\x89C\x00tb",
                                refs), "holds 'labels' that are not a list of integers"),
    }
    out = {}
    for name, (raw, expected) in files.items():
        path = folder / name.replace(" ", "_")
        path.write_bytes(raw)
        assert path.stat().st_size < 1_000_000, name
        out[name] = (path, expected)
    return out


CAPPED = r"""
import json, resource, sys
from pathlib import Path
import slt.data, slt.data.pickles, slt.errors  # before the cap: torch maps a lot of address space
slt.data.files.torchvision_decoder()  # so is torchvision.io

def vm_bytes():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

cap = vm_bytes() + 512 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
results = {}
for kind, name, path in json.loads(sys.argv[1]):
    try:
        if kind == "pickle":
            slt.data.read_cifar_pickle(Path(path), "labels", "cifar10")
        elif kind == "idx":
            slt.data.read_idx(Path(path), 3, "mnist")
        else:
            slt.data.files.decode_image(Path(path), slt.data.files.torchvision_decoder())
        results[name] = "loaded"
    except slt.errors.DataError as exc:
        results[name] = str(exc)
    except BaseException as exc:
        results[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(results))
"""


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height RGB pixels, one tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is rewritten to claim width x height."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    raw = bytearray(buf.getvalue())
    at = raw.index(b"\xff\xc0")
    raw[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


IDX_HEAD = (0x0803).to_bytes(4, "big")
IDX_BOMBS = {
    "huge dims": IDX_HEAD + b"".join(d.to_bytes(4, "big") for d in (2**32 - 1, 2**16, 2**16)),
    "huge dims, some data": IDX_HEAD + b"".join(d.to_bytes(4, "big")
                                                for d in (100_000, 28, 28)) + b"\0" * 784,
}


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, str]]:
    """Every bomb file, and what reading each gave in a child whose address space is capped
    at 512 MiB above what importing slt took: a bomb that went off is a MemoryError there,
    not a stalled machine. One child for all of them (importing torch takes seconds)."""
    folder = tmp_path_factory.mktemp("bombs")
    paths = {name: path for name, (path, _) in bomb_files(folder / "pickle").items()}
    cases = [["pickle", name, str(path)] for name, path in paths.items()]
    for name, raw in IDX_BOMBS.items():
        paths[name] = folder / name.replace(" ", "_").replace(",", "")
        paths[name].write_bytes(raw)
        cases.append(["idx", name, str(paths[name])])
    paths["png"], paths["jpeg"] = folder / "bomb.png", folder / "bomb.jpg"
    paths["png"].write_bytes(png_claiming(100_000, 100_000))
    paths["jpeg"].write_bytes(jpeg_claiming(60_000, 60_000))
    cases += [["image", "png", str(paths["png"])], ["image", "jpeg", str(paths["jpeg"])]]
    assert all(p.stat().st_size < 1_000_000 for p in paths.values())
    proc = subprocess.run([sys.executable, "-c", CAPPED, json.dumps(cases)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return paths, json.loads(proc.stdout.splitlines()[-1])


def test_pickle_bombs_are_refused_within_bounded_memory(
        tmp_path: Path, capped: tuple[dict[str, Path], dict[str, str]]) -> None:
    paths, results = capped
    for name, (_, expected) in bomb_files(tmp_path).items():
        message = results[name]
        assert message.startswith(f"dataset cifar10: {paths[name]} "), (name, message)
        assert expected in message, (name, message)
        assert "\n" not in message and "MemoryError" not in message, (name, message)


def test_idx_headers_claiming_billions_are_refused_within_bounded_memory(
        capped: tuple[dict[str, Path], dict[str, str]]) -> None:
    paths, results = capped
    assert results["huge dims"] == (
        f"dataset mnist: {paths['huge dims']} should hold 4294967295x65536x65536 = "
        f"{(2**32 - 1) * 2**32} bytes after its header but holds 0; the file is truncated or "
        f"damaged, replace it")
    assert "should hold 100000x28x28 = 78400000 bytes after its header but holds 784" in \
        results["huge dims, some data"]


def test_image_headers_claiming_billions_of_pixels_are_refused(
        capped: tuple[dict[str, Path], dict[str, str]]) -> None:
    paths, results = capped
    assert results["png"] == (f"cannot read image {paths['png']}: its header claims "
                              f"10,000,000,000 pixels, over PIL's limit of 178,956,970 "
                              f"(2 x PIL.Image.MAX_IMAGE_PIXELS); the file is damaged or not "
                              f"meant for this dataset")
    assert results["jpeg"].startswith(f"cannot read image {paths['jpeg']}: its header claims "
                                      f"3,600,000,000 pixels")


def test_an_image_bomb_in_a_tree_through_the_cli(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    write_tree(tmp_path / "data")
    bomb = tmp_path / "data" / "train" / "dog" / "1.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    code, err = search(capsys, tmp_path / "out", "imagefolder", tmp_path / "data")
    line = assert_refused(code, err, tmp_path / "out", bomb)
    assert "its header claims 10,000,000,000 pixels" in line


# --- images that are not what they claim ---------------------------------------------------------


def damage(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    else:  # truncated inside the pixel data, past the header
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
                        ).save(buf, "PNG")
        path.write_bytes(buf.getvalue()[:120])


EXPECTED = {"empty": "the file is empty (0 bytes); replace it or remove it",
            "truncated": ""}


@pytest.mark.parametrize("how", ["empty", "truncated"])
@pytest.mark.parametrize("stream", ["false", "true,workers=0", "true,workers=2"])
def test_a_damaged_image_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     how: str, stream: str) -> None:
    write_tree(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "dog" / "1.png"  # not the first file: a worker reads it
    damage(bad, how)
    streaming, _, workers = stream.partition(",workers=")
    extra = [f"data.stream={streaming}"] + ([f"data.workers={workers}"] if workers else [])
    code, err = search(capsys, tmp_path / "out", "imagefolder", tmp_path / "data", *extra)
    line = assert_refused(code, err, tmp_path / "out", bad)
    assert line.startswith(f"slt: error: cannot read image {bad}: ")
    assert EXPECTED[how] in line
    assert "Traceback" not in line and "DataLoader worker" not in line


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_emptied_after_opening_fails_in_the_epoch_as_one_line(
        tmp_path: Path, workers: int) -> None:
    """The worker that decodes a batch meets the empty file: the main process raises the
    same one-line DataError, not the worker's wrapped traceback."""
    write_tree(tmp_path / "data", per_class=4)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "data"), stream=True,
                     workers=workers)
    batches = StreamBatches(cfg, CPU)
    bad = tmp_path / "data" / "train" / "cat" / "2.png"
    bad.write_bytes(b"")
    with pytest.raises(DataError) as err:
        list(batches.train_epoch(0, 4, 0))
    assert str(err.value) == (f"cannot read image {bad}: the file is empty (0 bytes); "
                              f"replace it or remove it")


def test_a_worker_sends_any_failure_back_as_one_line_naming_the_file() -> None:
    assert worker_failure("imagenet", "/d/x.jpg", DataError("dataset imagenet: bad")) == \
        "dataset imagenet: bad"
    assert worker_failure("imagenet", "/d/x.jpg", MemoryError("out of\nmemory")) == \
        "dataset imagenet: cannot read image /d/x.jpg: MemoryError: out of"


# --- subset limits the dataset cannot give --------------------------------------------------------


LIMITS = {
    "data.train_limit=100": "data.train_limit = 100 exceeds the 6 train examples of dataset "
                            "imagefolder: the run would use all 6 while its id names 100; set "
                            "it to at most 6, or to 0 for all",
    "data.train_limit=1": "data.train_limit = 1 is fewer than the 2 classes of the train split "
                          "of dataset imagefolder: some classes would have no example; set it "
                          "to at least 2, or to 0 for all",
    "data.test_limit=7": "data.test_limit = 7 exceeds the 6 test examples of dataset "
                         "imagefolder: the run would use all 6 while its id names 7; set it to "
                         "at most 6, or to 0 for all",
    "data.test_limit=1": "data.test_limit = 1 is fewer than the 2 classes of the test split of "
                         "dataset imagefolder: some classes would have no example; set it to "
                         "at least 2, or to 0 for all",
}


@pytest.mark.parametrize("limit", list(LIMITS))
@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_limit_the_dataset_cannot_give_is_one_line_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], limit: str, stream: str) -> None:
    write_tree(tmp_path / "data")  # 2 classes x 3 images in each split
    code, err = search(capsys, tmp_path / "out", "imagefolder", tmp_path / "data", limit,
                       f"data.stream={stream}", "data.workers=0")
    assert_refused(code, err, tmp_path / "out")
    assert err == [f"slt: error: {LIMITS[limit]}"]


@pytest.mark.parametrize("stream", [False, True])
def test_limits_the_dataset_can_give_are_used_exactly(tmp_path: Path, stream: bool) -> None:
    write_tree(tmp_path / "data")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "data"), stream=stream,
                     workers=0, train_limit=6, test_limit=2)
    if stream:
        batches = StreamBatches(cfg, CPU)
        train, test = batches.train_y, batches.test_y
    else:
        splits = load_data(cfg)
        train, test = splits.train_y, splits.test_y
    assert train.tolist() == [0, 0, 0, 1, 1, 1]  # the limit equal to the split: all of it
    assert test.tolist() == [0, 1]  # one per class


def test_planted_teacher_limit_over_its_size() -> None:
    cfg = DataConfig(name="planted_teacher", train_size=64, test_size=16, train_limit=65)
    with pytest.raises(DataError, match=r"^data\.train_limit = 65 exceeds the 64 train "
                                        r"examples of dataset planted_teacher"):
        load_data(cfg)


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(),
                    reason=f"real MNIST not found at {SHARED_DATA / 'MNIST' / 'raw'}")
def test_real_mnist_limit_over_its_60000_images() -> None:
    cfg = DataConfig(name="mnist", root=str(SHARED_DATA), train_limit=70_000, test_limit=100)
    with pytest.raises(DataError) as err:
        load_data(cfg)
    assert str(err.value).startswith("data.train_limit = 70000 exceeds the 60000 train "
                                     "examples of dataset mnist")


def test_a_worker_that_dies_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder that crashes on a crafted image kills its worker process: one DataError
    naming the dataset, not torch's "DataLoader worker exited unexpectedly" traceback."""
    import signal

    import slt.data.stream

    write_tree(tmp_path / "data", per_class=4)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "data"), stream=True, workers=2)
    batches = StreamBatches(cfg, CPU)
    main_pid = os.getpid()

    def crash(self: object, positions: list[int]) -> object:
        if os.getpid() != main_pid:  # only in the (forked) workers
            os.kill(os.getpid(), signal.SIGSEGV)
        raise AssertionError("decoded in the main process")

    monkeypatch.setattr(slt.data.stream._Reader, "__getitems__", crash)
    with pytest.raises(DataError) as err:
        list(batches.train_epoch(0, 4, 0))
    message = str(err.value)
    assert message.startswith("dataset imagefolder: a data.workers process ended "
                              "unexpectedly (DataLoader worker (pid")
    assert "\n" not in message
