"""Read tensors from a torch `.pth` (zip format, `torch.save` since 1.6) without torch.

The archive holds `<name>/data.pkl`, a pickle whose tensors point at raw little-endian
storages `<name>/data/<key>`. A restricted unpickler turns each tensor into a lazy record
(storage key, dtype, offset, shape, strides); `PthReader.read` loads one tensor's storage only.
Anything but plain (ordered) dicts of tensors is refused with a ValueError.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import zipfile
import zlib

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """Where a tensor lives in the archive; shape and strides in elements."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor(storage, offset, shape, strides, *unused):
    return LazyTensor(storage, int(offset), tuple(shape), tuple(strides))


def _rebuild_parameter(tensor, *unused):
    return tensor


class _Unpickler(pickle.Unpickler):
    _GLOBALS = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        raise ValueError(f"unsupported object {module}.{name} in the .pth pickle; install torch to read this file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise ValueError(f"unsupported storage reference {pid!r} in the .pth pickle")
        return _Storage(str(pid[2]), pid[1].dtype)


class PthReader:
    """Tensors of a zip-format `.pth` state dict: `keys()`, `shape(key)`, `read(key)` -> ndarray."""

    def __init__(self, path: str):
        path = self._path = os.fspath(path)
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is a legacy (non-zip) torch file; install torch to read it")
        self._zip = zipfile.ZipFile(path)
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive; found {pickles}")
        self._root = pickles[0][: -len("data.pkl")]
        order = self._root + "byteorder"
        if order in self._zip.namelist() and self._zip.read(order).decode().strip() != "little":
            raise ValueError(f"{path}: big-endian storages are not supported")
        try:
            with self._zip.open(pickles[0]) as f:
                obj = _Unpickler(f).load()
        except (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(f"{path} is truncated or corrupt: its data.pkl cannot be read ({error})") from None
        self._tensors = _state_dict(obj, path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def read(self, key: str) -> np.ndarray:
        t = self._tensors[key]
        try:
            raw = self._zip.read(f"{self._root}data/{t.storage.key}")
        except (zipfile.BadZipFile, zlib.error, EOFError, KeyError) as error:
            raise ValueError(f"{self._path} is truncated or corrupt: tensor {key!r} cannot be read ({error})") from None
        flat = np.frombuffer(raw, dtype=t.storage.dtype)
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset:], shape=t.shape, strides=tuple(s * itemsize for s in t.strides)
        )
        return np.array(view)

    def close(self) -> None:
        self._zip.close()


def _state_dict(obj, path) -> dict[str, LazyTensor]:
    """The name -> tensor dict, unwrapping one level of {'state_dict' | 'model' | 'module': ...}."""
    if isinstance(obj, dict) and len(obj) == 1:
        (name, inner), = obj.items()
        if name in ("state_dict", "model", "module") and isinstance(inner, dict):
            obj = inner
    if not isinstance(obj, dict) or not all(isinstance(v, LazyTensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(obj)
