"""Open a Wan2.1 checkpoint (file or directory) as a source of tensors read one at a time.

Accepted: one `.safetensors` file, a sharded set with its `*.safetensors.index.json`, a directory
holding either, or a `.pth`/`.pt` torch file (through `torch.load(mmap=True)` when torch is
installed, else through the pure-Python reader in `convert.pth`).
"""

from __future__ import annotations

import glob
import json
import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for safetensors)
import numpy as np

PTH_SUFFIXES = (".pth", ".pt")


class SafetensorsReader:
    """Tensors spread over one or more `.safetensors` files: `keys()`, `shape(key)`, `read(key)`."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self._handles = [safe_open(f, framework="numpy") for f in files]
        self._where = {}
        for handle, path in zip(self._handles, files):
            for key in handle.keys():
                if key in self._where:
                    raise ValueError(f"tensor {key!r} appears in two shards (second: {path})")
                self._where[key] = handle

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        return self._where[key].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()
        self._where.clear()


class TorchReader:
    """A `.pth` read with torch's own loader (memory-mapped)."""

    def __init__(self, path: str):
        import torch

        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
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


def _open_pth(path: str):
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
