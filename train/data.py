"""Training data: precomputed Wan latents + text embeddings, on disk or synthetic.

On-disk format "sparge-latents-v1" (see docs/training.md): a directory holding
`index.json` and shard files `shard-NNNNN.safetensors`, each with tensors
"latents" `(n, frames, height, width, channels)` and "context" `(n, text_len, text_dim)`
(any float dtype; read as float32). Examples are numbered across shards in index order.

Order: global batch `step` holds examples at positions [step*G, (step+1)*G) of an endless
stream of epochs, each epoch a permutation of all examples drawn from (seed, epoch).
The order depends only on (seed, step, G), not on the number of hosts; each host reads
only the rows its devices hold.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT = "sparge-latents-v1"
FIELDS = ("latents", "context")


class ExampleSource(Protocol):
    """Random access to examples: `read(indices)` -> {"latents": (n, F, H, W, C), "context":
    (n, L, D)} float32 NumPy arrays."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class SyntheticLatents:
    """Deterministic Gaussian latents and text embeddings: example i comes from (seed, i).

    latent_shape: `(frames, height, width, channels)`; context `(text_len, text_dim)`.
    """

    def __init__(self, num_examples: int, latent_shape, text_len: int, text_dim: int, seed: int = 0):
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive; got {num_examples}")
        if len(latent_shape) != 4:
            raise ValueError(f"latent_shape must be (frames, height, width, channels); got {latent_shape}")
        self.num_examples, self.seed = num_examples, seed
        self.shapes = {"latents": tuple(latent_shape), "context": (text_len, text_dim)}

    def __len__(self) -> int:
        return self.num_examples

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        out = {name: np.empty((len(indices), *shape), np.float32) for name, shape in self.shapes.items()}
        for row, index in enumerate(indices):
            gen = np.random.default_rng([self.seed, int(index)])
            for name, shape in self.shapes.items():
                out[name][row] = gen.standard_normal(shape, np.float32)
        return out


class ShardedLatents:
    """Reader of the on-disk "sparge-latents-v1" format (lazy, reads only requested rows)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise ValueError(f"data path {str(self.path)!r} has no index.json (expected format {FORMAT})")
        index = json.loads(index_file.read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_file} has format {index.get('format')!r}; expected {FORMAT!r}")
        self.files = [self.path / shard["file"] for shard in index["shards"]]
        counts = np.array([shard["count"] for shard in index["shards"]], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.shapes = {name: tuple(index["fields"][name]["shape"]) for name in FIELDS}
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.files[shard]), framework="numpy")
        return self._handles[shard]

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        out = {name: np.empty((len(indices), *shape), np.float32) for name, shape in self.shapes.items()}
        for row, index in enumerate(indices):
            shard = int(np.searchsorted(self.starts, index, side="right") - 1)
            local = int(index - self.starts[shard])
            handle = self._handle(shard)
            for name in FIELDS:
                out[name][row] = handle.get_slice(name)[local : local + 1][0]
        return out


def write_dataset(path: str | Path, source: ExampleSource, examples_per_shard: int, dtype=np.float32) -> Path:
    """Write every example of `source` in the on-disk format (shards of `examples_per_shard`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(source), examples_per_shard)):
        indices = np.arange(start, min(start + examples_per_shard, len(source)))
        arrays = {name: np.ascontiguousarray(a.astype(dtype)) for name, a in source.read(indices).items()}
        name = f"shard-{number:05d}.safetensors"
        save_file(arrays, str(path / name))
        shards.append({"file": name, "count": len(indices)})
    first = source.read(np.arange(1))
    fields = {name: {"shape": list(first[name].shape[1:]), "dtype": np.dtype(dtype).name} for name in FIELDS}
    (path / "index.json").write_text(json.dumps({"format": FORMAT, "shards": shards, "fields": fields}, indent=1))
    return path


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def global_batch_indices(step: int, global_batch: int, num_examples: int, seed: int) -> np.ndarray:
    """Example indices `(global_batch,)` int64 of optimizer step `step` (deterministic)."""
    positions = step * global_batch + np.arange(global_batch, dtype=np.int64)
    epochs, within = np.divmod(positions, num_examples)
    return np.array([_epoch_permutation(seed, int(e), num_examples)[w] for e, w in zip(epochs, within)], np.int64)


def local_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], dim: int) -> slice:
    """The contiguous range along `dim` that this process's devices hold."""
    ranges = [index[dim].indices(global_shape[dim]) for index in sharding.addressable_devices_indices_map(global_shape).values()]
    start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
    return slice(start, stop)


class BatchLoader:
    """Global batches as sharded jax Arrays `(grad_accum, micro_batch, ...)`, each process
    reading only its rows. `position(step)` is the number of examples consumed before `step`."""

    def __init__(self, source: ExampleSource, global_batch: int, grad_accum: int, seed: int, sharding_for):
        """sharding_for(ndim) -> Sharding of an array `(grad_accum, micro_batch, ...)`."""
        self.source, self.global_batch, self.grad_accum, self.seed = source, global_batch, grad_accum, seed
        self.micro = global_batch // grad_accum
        self.sharding_for = sharding_for

    def position(self, step: int) -> int:
        return step * self.global_batch

    def batch(self, step: int) -> dict[str, jax.Array]:
        indices = global_batch_indices(step, self.global_batch, len(self.source), self.seed)
        indices = indices.reshape(self.grad_accum, self.micro)
        shapes = {name: (self.grad_accum, self.micro, *shape) for name, shape in self.source.shapes.items()}
        rows = local_rows(self.sharding_for(len(shapes["latents"])), shapes["latents"], 1)
        local = self.source.read(indices[:, rows].reshape(-1))
        out = {}
        for name, array in local.items():
            sharding = self.sharding_for(len(shapes[name]))
            array = array.reshape(self.grad_accum, rows.stop - rows.start, *array.shape[1:])
            out[name] = jax.make_array_from_process_local_data(sharding, array, shapes[name])
        return out
