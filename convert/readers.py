"""Open a Wan2.1 checkpoint (file or directory) as a source of tensors read one at a time.

Accepted: one `.safetensors` file, a sharded set with its `*.safetensors.index.json`, a directory
holding either, or a `.pth`/`.pt` torch file (through `torch.load` when torch is installed,
memory-mapped for the zip format; else through the pure-Python reader in `convert.pth`, zip
format only). Safetensors files are read with plain file reads (header parsed here), one tensor
at a time, never memory-mapped.
"""

from __future__ import annotations

import glob
import json
import math
import os
import zipfile

import ml_dtypes
import numpy as np

PTH_SUFFIXES = (".pth", ".pt")


# safetensors dtype names -> NumPy dtypes.
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


class _SafetensorsFile:
    """One `.safetensors` file: its header, and tensors read with plain file reads.

    Not memory-mapped on purpose: pages of a mapping stay in the process's resident set while
    the file is open, which would add the input's size to the converter's peak RSS."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb", buffering=0)
        try:
            size = os.fstat(self._file.fileno()).st_size
            prefix = self._file.read(8)
            header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < header_size <= size - 8:
                raise ValueError(f"{path} is not a .safetensors file (bad header size)")
            try:
                header = json.loads(self._read_exactly(8, header_size))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{path} is not a .safetensors file (header is not JSON: {error})") from None
            if not isinstance(header, dict):
                raise ValueError(f"{path} is not a .safetensors file (header is not a JSON object)")
            header.pop("__metadata__", None)
            self._base = 8 + header_size
            self.entries = {key: self._entry(key, value, size) for key, value in header.items()}
        except BaseException:
            self._file.close()
            raise

    def _entry(self, key, value, size) -> tuple[np.dtype, tuple[int, ...], int]:
        try:
            dtype_name, shape, (begin, end) = value["dtype"], tuple(value["shape"]), value["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{self.path}: malformed header entry for {key!r}: {value!r}") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {dtype_name!r}")
        dtype = np.dtype(SAFETENSORS_DTYPES[dtype_name])
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or self._base + end > size:
            raise ValueError(f"{self.path}: tensor {key!r} ({dtype_name} {shape}) has data_offsets "
                             f"[{begin}, {end}] that do not fit its size or the file")
        return dtype, shape, self._base + begin

    def _read_exactly(self, offset: int, count: int, out=None):
        buffer = memoryview(bytearray(count) if out is None else out)
        self._file.seek(offset)
        done = 0
        while done < count:
            got = self._file.readinto(buffer[done:])
            if not got:
                raise ValueError(f"{self.path} is truncated")
            done += got
        return buffer.obj if out is None else out

    def read(self, key: str) -> np.ndarray:
        dtype, shape, offset = self.entries[key]
        array = np.empty(shape, dtype)
        flat = array.reshape(-1).view(np.uint8)
        self._read_exactly(offset, flat.size, flat)
        return array

    def close(self) -> None:
        self._file.close()


class SafetensorsReader:
    """Tensors spread over one or more `.safetensors` files: `keys()`, `shape(key)`, `read(key)`.
    Each `read` copies one tensor into a new array (no memory map of the files)."""

    def __init__(self, files: list[str]):
        self._files: list[_SafetensorsFile] = []
        self._where: dict[str, _SafetensorsFile] = {}
        try:
            for path in files:
                self._files.append(_SafetensorsFile(path))
                for key in self._files[-1].entries:
                    if key in self._where:
                        raise ValueError(f"tensor {key!r} appears in two shards (second: {path})")
                    self._where[key] = self._files[-1]
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].entries[key][1]

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        self._files.clear()
        self._where.clear()


class TorchReader:
    """A `.pth` read with torch's own loader: memory-mapped for the zip format (torch >= 1.6's
    default); a legacy (non-zip) file, which torch cannot memory-map, is loaded into memory."""

    def __init__(self, path: str):
        import torch

        legacy = not zipfile.is_zipfile(path)
        try:
            state = torch.load(path, map_location="cpu", mmap=not legacy, weights_only=True)
        except Exception as error:
            if not legacy:
                raise
            raise ValueError(f"{path} is a legacy (non-zip) torch file that torch cannot read: {error}") from error
        if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model", "module"):
            state = next(iter(state.values()))
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def read(self, key: str) -> np.ndarray:
        import torch

        tensor = self._state[key]
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def close(self) -> None:
        self._state = {}


def _index_files(index_path: str) -> list[str]:
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} has no 'weight_map' dict")
    folder = os.path.dirname(index_path)
    files = [os.path.join(folder, name) for name in dict.fromkeys(weight_map.values())]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
        raise ValueError(f"shards listed in {index_path} are missing: {absent}")
    return files


ZIP_MAGIC = b"PK\x03\x04"


def _open_pth(path: str):
    with open(path, "rb") as f:
        zip_start = f.read(4) == ZIP_MAGIC
    if zip_start and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is a truncated or corrupt zip-format torch file (its zip directory is "
                         "missing or damaged); copy or download it again")
    try:
        import torch  # noqa: F401
    except ImportError:
        from convert.pth import PthReader

        return PthReader(path)
    return TorchReader(path)


def checkpoint_files(path: str) -> tuple[str, list[str]]:
    """("safetensors" | "pth", files) of a checkpoint file or directory; ValueError if none or ambiguous."""
    path = os.fspath(path)
    if os.path.isdir(path):
        indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        pths = sorted(p for s in PTH_SUFFIXES for p in glob.glob(os.path.join(path, "*" + s)))
        if len(indexes) > 1:
            raise ValueError(f"input directory {path} holds several index files {indexes}; pass one of them")
        if indexes:
            return "safetensors", _index_files(indexes[0])
        if shards:
            return "safetensors", shards
        if len(pths) == 1:
            return "pth", pths
        raise ValueError(f"input directory {path} must hold .safetensors files (with an optional *.index.json) "
                         f"or one .pth file; found {pths or 'none'}")
    if not os.path.isfile(path):
        raise ValueError(f"input {path} does not exist")
    if path.endswith(".index.json"):
        return "safetensors", _index_files(path)
    if path.endswith(".safetensors"):
        return "safetensors", [path]
    if path.endswith(PTH_SUFFIXES):
        return "pth", [path]
    raise ValueError(f"input must be a directory, .safetensors, *.index.json, .pth or .pt; got {path}")


def open_checkpoint(path: str):
    """A reader (`keys`, `shape`, `read`, `close`) over the checkpoint at `path`."""
    kind, files = checkpoint_files(path)
    return SafetensorsReader(files) if kind == "safetensors" else _open_pth(files[0])


def sidecar_config(path: str) -> dict | None:
    """The `config.json` in the checkpoint directory (or beside the file), if any."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f)
