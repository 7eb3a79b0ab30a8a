"""Metrics: host copies of replicated scalars, a parameter checksum, a JSONL writer and a
TensorBoard writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from train.sharding import replicated


def host_scalars(metrics: dict) -> dict[str, float]:
    """Python floats from replicated scalar arrays (works when they span several processes); the
    copies to the host all start before the first is waited for."""
    shards = jax.device_get({name: value.addressable_data(0) for name, value in metrics.items()})
    return {name: float(value) for name, value in shards.items()}


def param_checksum(params, mesh) -> float:
    """sum(x) + 1e-3 * sum(x^2) over all parameter entries, float32, computed on device and
    replicated, so every process returns the same number."""
    def checksum(tree):
        leaves = jax.tree.leaves(tree)
        return sum(jnp.sum(x.astype(jnp.float32)) + 1e-3 * jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)

    return host_scalars({"c": jax.jit(checksum, out_shardings=replicated(mesh))(params)})["c"]


def tokens_per_example(latent_shape, patch_size) -> int:
    """DiT tokens of one latent `(frames, height, width, channels)` with patch `(pt, ph, pw)`."""
    return math.prod(size // patch for size, patch in zip(latent_shape[:3], patch_size))


class JsonlWriter:
    """Appends one JSON object per line; only process 0 writes."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path and jax.process_index() == 0 else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class TensorBoardWriter:
    """Scalars as TensorBoard event files (tensorboardX's writer) under `logdir`; only process 0
    writes, None writes nothing. `write(record)` logs every number of `record` except "step"
    at `record["step"]`."""

    def __init__(self, logdir: str | Path | None):
        self.writer = None
        if logdir and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(logdir))

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
