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
    (n, L, D)} float32 NumPy arrays (or jax Arrays made on this process's devices, e.g.
    `ProceduralClips` rendering on the accelerator); `describe(index)` says where example
    `index` lives."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...

    def describe(self, index: int) -> str: ...


def nonfinite_examples(source: ExampleSource, indices) -> list[str]:
    """`source.describe(i)` of each example among `indices` holding NaN/inf, naming the fields."""
    arrays = source.read(np.asarray(indices, np.int64))
    found = []
    for row, index in enumerate(indices):
        bad = [name for name, array in arrays.items() if not np.isfinite(array[row]).all()]
        if bad:
            found.append(f"{source.describe(int(index))} ({', '.join(bad)} not finite)")
    return found


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

    def describe(self, index: int) -> str:
        return f"synthetic example {index}"

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        out = {name: np.empty((len(indices), *shape), np.float32) for name, shape in self.shapes.items()}
        for row, index in enumerate(indices):
            gen = np.random.default_rng([self.seed, int(index)])
            for name, shape in self.shapes.items():
                out[name][row] = gen.standard_normal(shape, np.float32)
        return out


def _positive_ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


class ShardedLatents:
    """Reader of the on-disk "sparge-latents-v1" format (lazy, reads only requested rows).

    Opening validates the index against every shard's header (files present, fields with
    shape `(count, *field shape)`, float dtypes); a problem is a ValueError naming the shard.
    validate: also check every example read is finite (ValueError naming shard and row)."""

    def __init__(self, path: str | Path, validate: bool = False):
        self.path, self.validate = Path(path), validate
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise ValueError(f"data path {str(self.path)!r} has no index.json (expected format {FORMAT})")
        try:
            index = json.loads(index_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{index_file} is not valid JSON: {err}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{index_file} has format {index.get('format') if isinstance(index, dict) else None!r}; "
                             f"expected {FORMAT!r}")
        shards, fields = index.get("shards"), index.get("fields")
        if not isinstance(shards, list) or not shards:
            raise ValueError(f"{index_file} lists no shards; expected 'shards': [{{'file': ..., 'count': n}}, ...]")
        if not isinstance(fields, dict) or any(not _positive_ints(fields.get(n, {}).get("shape")) for n in FIELDS):
            raise ValueError(f"{index_file} must give 'fields' {list(FIELDS)}, each with a 'shape' of positive ints")
        self.shapes = {name: tuple(fields[name]["shape"]) for name in FIELDS}
        self._handles: dict[int, object] = {}
        self.files = []
        for number, shard in enumerate(shards):
            if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and _positive_ints([shard.get("count")])):
                raise ValueError(f"{index_file}: shard {number} must be {{'file': name, 'count': positive int}}; got {shard!r}")
            self.files.append(self.path / shard["file"])
            self._check_shard(number, shard["count"])
        counts = np.array([shard["count"] for shard in shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])

    def _check_shard(self, number: int, count: int) -> None:
        file = self.files[number]
        if not file.is_file():
            raise ValueError(f"data shard {file} (listed in index.json) does not exist")
        try:  # headers only; opened without caching (a data set may have thousands of shards)
            with safe_open(str(file), framework="numpy") as handle:
                present = set(handle.keys())
                header = {name: handle.get_slice(name) for name in FIELDS if name in present}
                found = {name: (tuple(t.get_shape()), t.get_dtype()) for name, t in header.items()}
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise ValueError(f"data shard {file} is not a readable safetensors file: {err}") from None
        for name in FIELDS:
            if name not in present:
                raise ValueError(f"data shard {file} has no tensor {name!r} (has {sorted(present)})")
            shape, dtype = found[name]
            if shape != (count, *self.shapes[name]):
                raise ValueError(f"data shard {file}: {name!r} has shape {shape}; index.json says "
                                 f"{(count, *self.shapes[name])} (count {count} x field shape {list(self.shapes[name])})")
            if not dtype.startswith(("F", "BF")):
                raise ValueError(f"data shard {file}: {name!r} has dtype {dtype}; expected a float dtype")

    def describe(self, index: int) -> str:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        return f"example {index} = {self.files[shard].name} row {index - self.starts[shard]}"

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
                if self.validate and not np.isfinite(out[name][row]).all():
                    raise ValueError(f"data.validate: {self.files[shard]} row {local} (example {int(index)}) "
                                     f"has non-finite values in {name!r}")
        return out


def write_shard(path: Path, number: int, arrays: dict[str, np.ndarray], dtype=np.float32) -> dict:
    """Write `arrays` (each field `(count, ...)`) as shard `number` of the data set in `path`,
    cast to `dtype`; returns its index entry {"file", "count"}. Written under a temporary name
    and renamed: a shard file that exists is complete."""
    name = f"shard-{number:05d}.safetensors"
    temporary = path / f".{name}.partial"
    save_file({field: np.ascontiguousarray(np.asarray(arrays[field]).astype(dtype)) for field in FIELDS},
              str(temporary))
    temporary.replace(path / name)
    return {"file": name, "count": len(arrays["latents"])}


def write_index(path: Path, shards: list[dict], field_shapes: dict[str, tuple], dtype=np.float32) -> None:
    """Write (atomically) the data set's index.json listing `shards` (entries of `write_shard`),
    with each field's per-example shape."""
    fields = {name: {"shape": list(field_shapes[name]), "dtype": np.dtype(dtype).name} for name in FIELDS}
    temporary = path / ".index.json.partial"
    temporary.write_text(json.dumps({"format": FORMAT, "shards": shards, "fields": fields}, indent=1))
    temporary.replace(path / "index.json")


def write_dataset(path: str | Path, source: ExampleSource, examples_per_shard: int, dtype=np.float32) -> Path:
    """Write every example of `source` in the on-disk format (shards of `examples_per_shard`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(source), examples_per_shard)):
        indices = np.arange(start, min(start + examples_per_shard, len(source)))
        shards.append(write_shard(path, number, source.read(indices), dtype))
    first = source.read(np.arange(1))
    write_index(path, shards, {name: first[name].shape[1:] for name in FIELDS}, dtype)
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
    reading only its rows. `position(step)` is the number of examples consumed before `step`.
    `batch(step)` is `place(read(step))`: `read` gathers this process's rows, `place` makes the
    global jax Arrays (`train.prefetch` runs both on a background thread)."""

    def __init__(self, source: ExampleSource, global_batch: int, grad_accum: int, seed: int, sharding_for):
        """sharding_for(ndim) -> Sharding of an array `(grad_accum, micro_batch, ...)`."""
        self.source, self.global_batch, self.grad_accum, self.seed = source, global_batch, grad_accum, seed
        self.micro = global_batch // grad_accum
        self.sharding_for = sharding_for
        self.batch_shapes = {name: (grad_accum, self.micro, *shape) for name, shape in source.shapes.items()}

    def position(self, step: int) -> int:
        return step * self.global_batch

    def indices(self, step: int) -> np.ndarray:
        """Example indices `(global_batch,)` of step `step`."""
        return global_batch_indices(step, self.global_batch, len(self.source), self.seed)

    def read(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step `step`'s batch: float32 `(grad_accum, rows, ...)`, NumPy (or
        jax Arrays where the source makes them)."""
        indices = self.indices(step).reshape(self.grad_accum, self.micro)
        rows = local_rows(self.sharding_for(len(self.batch_shapes["latents"])), self.batch_shapes["latents"], 1)
        local = self.source.read(indices[:, rows].reshape(-1))
        return {name: array.reshape(self.grad_accum, rows.stop - rows.start, *array.shape[1:])
                for name, array in local.items()}

    def place(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The global batch as sharded jax Arrays from every process's `read` of one step."""
        return {name: jax.make_array_from_process_local_data(self.sharding_for(len(self.batch_shapes[name])), array,
                                                             self.batch_shapes[name])
                for name, array in local.items()}

    def batch(self, step: int) -> dict[str, jax.Array]:
        return self.place(self.read(step))
