"""Pickles of numpy arrays from others, read as data: no code runs, no memory is taken that
the file's own bytes do not account for.

`pickle.load` calls whatever a file names (`os.system`, `builtins.eval`, ...), so a dataset
file passed between labs could run code. `load_array_pickle` admits only plain containers
and numbers (which pickle builds without calling anything) and the few numpy globals that
an array pickle names, in every release CIFAR's python batches exist in: the release itself
(Python 2, protocol 2, `numpy.core`), and Python 3 copies at protocols 2-5 under numpy 1.x
(`numpy.core`) or 2.x (`numpy._core`). Those globals are replaced by stand-ins that check
their arguments and build the array from bytes the file holds (`np.frombuffer`), so numpy's
own `__setstate__` never sees a crafted state (an object array of a billion entries, say).
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from typing import Any

import numpy as np

# numeric dtypes an array of a dataset batch may have; object and structured dtypes are out
SIMPLE_DTYPES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f4", "f8"})
RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}  # protocols 0-4: ndarray.__reduce__
FROMBUFFER = {("numpy.core.numeric", "_frombuffer"),
              ("numpy._core.numeric", "_frombuffer")}  # protocol 5
SCALAR = {("numpy.core.multiarray", "scalar"),
          ("numpy._core.multiarray", "scalar")}  # a numpy integer (labels made with numpy)


class ForbiddenPickle(pickle.UnpicklingError):
    """The pickle names a global (a function or class) a numpy-array pickle never names, or
    gives one of those arguments it never gives."""


class DtypeToken:
    """What `numpy.dtype(code, align, copy)` stands for, checked: a simple numeric dtype
    whose byte order `__setstate__` (pickle's BUILD) may set, and nothing else."""

    def __init__(self, code: object, align: object = False, copy: object = True) -> None:
        code = code.decode("latin1") if isinstance(code, bytes) else code
        if not isinstance(code, str) or code not in SIMPLE_DTYPES:
            raise ForbiddenPickle(f"an array of dtype {code!r}, not a plain number type")
        self.code, self.order = code, "|"

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|",
                                                                               "="):
            raise ForbiddenPickle("a dtype state that numpy never writes")
        self.order = state[1]

    def dtype(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


class ArrayToken:
    """What `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` stands for: an empty
    array that pickle's BUILD fills from (version, shape, dtype, fortran, raw bytes); built
    here with `np.frombuffer` once the bytes are exactly what shape and dtype need."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ForbiddenPickle("an array state that numpy never writes")
        shape, dtype, fortran, raw = state[-4:]
        self.array = array_from(raw, dtype, shape, "F" if fortran else "C")


class NdarrayToken:
    """Stands for `numpy.ndarray` where `_reconstruct` names it: calling it (which would
    allocate any shape the file asks for) is refused."""

    def __init__(self, *args: object) -> None:
        raise ForbiddenPickle("a call of numpy.ndarray")


def array_from(raw: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """An array of `shape` from exactly the bytes it needs; anything else is refused."""
    if not isinstance(dtype, DtypeToken):
        raise ForbiddenPickle("an array whose dtype is not a numpy.dtype")
    if isinstance(raw, str):  # Python 2's str, decoded as latin1 by the unpickler
        raw = raw.encode("latin1")
    if isinstance(raw, pickle.PickleBuffer):
        raw = bytes(raw.raw())
    if not isinstance(raw, (bytes, bytearray)):
        raise ForbiddenPickle("array data that are not bytes")
    if (not isinstance(shape, tuple) or len(shape) > 8
            or not all(type(s) is int and s >= 0 for s in shape)):
        raise ForbiddenPickle(f"an array of shape {shape!r}")
    dt = dtype.dtype()
    if math.prod(shape) * dt.itemsize != len(raw):
        raise ForbiddenPickle(f"an array of shape {shape} ({dt}) over {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if order == "F" else "C")


def reconstruct(cls: object, shape: object, code: object) -> ArrayToken:
    """`_reconstruct` as numpy's `ndarray.__reduce__` calls it: (ndarray, (0,), b'b')."""
    if cls is not NdarrayToken or shape != (0,):
        raise ForbiddenPickle("a call of _reconstruct that numpy never writes")
    return ArrayToken()


def frombuffer(buf: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """`_frombuffer` of protocol 5, over the bytes the file holds."""
    return array_from(buf, dtype, shape, order)


def scalar(dtype: object, raw: object) -> int | float | bool:
    """A numpy number as the Python number it holds."""
    if not isinstance(dtype, DtypeToken):
        raise ForbiddenPickle("a numpy scalar whose dtype is not a numpy.dtype")
    return array_from(raw, dtype, (), "C").item()


def encode(text: object, encoding: object = "latin1") -> bytes:
    """`_codecs.encode(str, 'latin1')`: how Python 3 writes bytes at protocols 0-2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ForbiddenPickle("a call of _codecs.encode that pickle never writes")
    return text.encode("latin1")


def empty_bytes(*args: object) -> bytes:
    """`bytes()`: how Python 3 writes b'' at protocols 0-2 (`bytes(n)` would be n bytes)."""
    if args:
        raise ForbiddenPickle("a call of bytes with arguments")
    return b""


STAND_INS: dict[tuple[str, str], Any] = {
    **{key: reconstruct for key in RECONSTRUCT},
    **{key: frombuffer for key in FROMBUFFER},
    **{key: scalar for key in SCALAR},
    ("numpy", "ndarray"): NdarrayToken,
    ("numpy", "dtype"): DtypeToken,
    ("_codecs", "encode"): encode,
    ("builtins", "bytes"): empty_bytes,
    ("__builtin__", "bytes"): empty_bytes,
}


class ArrayUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose only globals are the checked stand-ins of `STAND_INS`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return STAND_INS[(module, name)]
        except KeyError:
            raise ForbiddenPickle(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenPickle("a persistent id")


def load_array_pickle(raw: bytes) -> Any:
    """The object a pickle of plain containers, numbers, strings and numpy arrays holds,
    arrays as `ArrayToken`s (their `.array`) or ndarrays; strings of Python 2 decoded as
    latin1 (what numpy asks for). Raises `ForbiddenPickle` for anything else, and pickle's
    own errors (or ValueError) for a damaged file.

    The opcodes are walked first (`pickletools.genops` reads each argument from what the
    file holds): C pickle allocates the length a bytes or string opcode claims before it
    reads, so a 20-byte file claiming 2**40 bytes would take a terabyte of address space."""
    for _ in pickletools.genops(io.BytesIO(raw)):
        pass
    return ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()


def as_array(value: object) -> np.ndarray | None:
    """The array `value` stands for (None when it is not one)."""
    if isinstance(value, ArrayToken):
        return value.array
    return value if isinstance(value, np.ndarray) else None
