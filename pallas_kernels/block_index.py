"""Compact block-sparse mask format consumed by the kernels.

A bool block mask `(batch, heads, nq, nk)` becomes, per (batch, head, q_block), the
sorted list of kept k-block indices plus a count, and the transposed lists per
k_block (the q blocks that attend to it), which the dK/dV backward pass walks.
A `TokenBand` optionally masks tokens inside the kept blocks (a backend whose
`Backend.token_band` is False cannot run it; see `pallas_kernels.dispatch`).

Padding convention: list entries past `count` repeat the last kept index (0 for an
empty list), so a kernel that prefetches one entry ahead never reads outside the
tensor and a repeated index re-fetches a block already in flight.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class BlockIndex(NamedTuple):
    """Kept-block lists of one block mask. All arrays int32.

    kv_indices: `(batch, heads, nq, nk)` kept k blocks of each q block, ascending, padded.
    kv_counts:  `(batch, heads, nq)` number of valid entries in `kv_indices`.
    q_indices:  `(batch, heads, nk, nq)` q blocks that keep each k block, ascending, padded.
    q_counts:   `(batch, heads, nk)` number of valid entries in `q_indices`.
    """

    kv_indices: jax.Array
    kv_counts: jax.Array
    q_indices: jax.Array
    q_counts: jax.Array

    @property
    def num_q_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def num_k_blocks(self) -> int:
        return self.q_indices.shape[2]


class TokenBand(NamedTuple):
    """Token-level mask inside the kept blocks: query slot i sees key slot j only when
    `|i - j| <= width` or `j < sink` (slot = position along the sequence as given to the kernel).

    width: int32 `(batch, heads)`, >= 0. sink: int32 `(batch, heads)`, >= 0 (0: no sink).
    A head without a band takes a width of at least max(seq_q, seq_k).
    """

    width: jax.Array
    sink: jax.Array

    def allows(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        """Bool: whether query slots `q_pos` see key slots `k_pos`; both int arrays whose shapes,
        broadcast together, start with (batch, heads)."""
        rank = max(q_pos.ndim, k_pos.ndim)
        width, sink = (x.reshape(x.shape + (1,) * (rank - 2)) for x in (self.width, self.sink))
        return (jnp.abs(q_pos - k_pos) <= width) | (k_pos < sink)


def _kept_lists(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of a bool `(..., n)` array: ascending kept indices padded by repeating the last, and counts.

    No sort: a kept entry's slot is the number of kept entries before it (a running count),
    and each kept index is scattered to its slot; slots past the count take the row's last
    kept index (0 for an empty row), the padding. On an H100 this is 2x faster than one sort
    of int keys per row at t2v-14B 720p's rows of 1182 k blocks (0.435 against 0.872 ms a
    layer's mask, 5 % kept; benchmarks/floor_kernels.py, piece compact_5%); at 1.3B 480p's
    512 as fast with 5 % kept (0.051 against 0.052 ms) and slower with 0.2 % (0.071 against 0.057).
    """
    shape, n = mask.shape, mask.shape[-1]
    rows = mask.reshape(-1, n)
    idx = jax.lax.broadcasted_iota(jnp.int32, rows.shape, 1)
    running = jnp.cumsum(rows, axis=-1, dtype=jnp.int32)
    slot = jnp.where(rows, running - 1, n)  # a dropped entry's slot is out of range: the scatter drops it
    row = jax.lax.broadcasted_iota(jnp.int32, rows.shape, 0)
    kept = jnp.zeros(rows.shape, jnp.int32).at[row, slot].set(idx, mode="drop", unique_indices=True)
    counts = running[:, -1:]
    last = jnp.max(jnp.where(rows, idx, 0), axis=-1, keepdims=True)
    return jnp.where(idx < counts, kept, last).reshape(shape), counts.reshape(shape[:-1])


def mask_to_block_index(block_mask: jax.Array) -> BlockIndex:
    """Bool `(batch, heads, nq, nk)` block mask -> `BlockIndex`. jit-able (static shapes)."""
    if block_mask.ndim != 4:
        raise ValueError(f"block_mask must have shape (batch, heads, q_blocks, k_blocks); got {block_mask.shape}")
    block_mask = block_mask.astype(bool)
    kv_indices, kv_counts = _kept_lists(block_mask)
    # Under jit the transposed lists (read by the backward only) are dropped as dead code
    # when nothing uses them.
    q_indices, q_counts = _kept_lists(jnp.swapaxes(block_mask, -1, -2))
    return BlockIndex(kv_indices, kv_counts, q_indices, q_counts)


def _lists_to_mask(indices: jax.Array, counts: jax.Array, n: int) -> jax.Array:
    valid = jnp.arange(indices.shape[-1]) < counts[..., None]
    hits = (indices[..., None] == jnp.arange(n)) & valid[..., None]
    return jnp.any(hits, axis=-2)


def block_index_to_mask(index: BlockIndex) -> jax.Array:
    """`BlockIndex` -> bool `(batch, heads, nq, nk)` block mask, from the row lists."""
    return _lists_to_mask(index.kv_indices, index.kv_counts, index.num_k_blocks)


def block_index_to_mask_transposed(index: BlockIndex) -> jax.Array:
    """The same mask rebuilt from the transposed (per k block) lists."""
    return jnp.swapaxes(_lists_to_mask(index.q_indices, index.q_counts, index.num_q_blocks), -1, -2)
