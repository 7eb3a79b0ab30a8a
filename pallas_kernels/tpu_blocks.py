"""Shared pieces of the Pallas TPU kernels: array views, block specs, tail masks.

The kernels never pad or copy q/k/v. `(batch, seq, heads, head_dim)` is viewed (a free
reshape) as `(batch, seq, heads * head_dim)`, and one head's block is the column block
`head` of width `head_dim`, so the TPU tiling rule (last two block dims multiples of
8 and 128, or equal to the array's) holds when head_dim % 128 == 0 or heads == 1.
Per-row fp32 vectors (lse, delta) `(batch, heads, seq)` are viewed as
`(batch, heads, 1, seq)` and moved as lane-dense `(1, block)` rows.
The last block of a sequence may run past its end: Pallas reads unspecified values
there and drops writes there, so the kernels mask those rows/columns themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NT_DIMS = (((1,), (1,)), ((), ()))  # contract the last dim of both operands: a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b


def seq_view(x: jax.Array) -> jax.Array:
    """`(batch, seq, heads, d)` -> `(batch, seq, heads * d)` (no copy)."""
    b, s, h, d = x.shape
    return x.reshape(b, s, h * d)


def row_view(x: jax.Array) -> jax.Array:
    """`(batch, heads, seq)` -> `(batch, heads, 1, seq)` (no copy)."""
    return x[:, :, None, :]


def tile_spec(block: int, head_dim: int, index_map) -> pl.BlockSpec:
    """Block `(block, head_dim)` of a `(batch, seq, heads * head_dim)` view.

    `index_map(*grid, *prefetch) -> (batch, seq_block, head)`."""
    return pl.BlockSpec((None, block, head_dim), index_map)


def row_spec(block: int, index_map) -> pl.BlockSpec:
    """Block `(1, block)` of a `(batch, heads, 1, seq)` row view.

    `index_map(*grid, *prefetch) -> (batch, head, seq_block)`."""

    def full_map(*args):
        b, h, i = index_map(*args)
        return b, h, 0, i

    return pl.BlockSpec((None, None, 1, block), full_map)


def compute_dtype(dtype) -> jnp.dtype:
    """Matmul operand dtype: bf16 stays bf16 (MXU native); fp16 and fp32 run in fp32."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(jnp.float32)


def positions(block_idx, block: int, shape: tuple[int, int], axis: int) -> jax.Array:
    """int32 `shape` array of token positions `block_idx * block + iota` along `axis`."""
    return block_idx * block + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def load_rows(ref, block_idx, block: int, seq: int, dtype) -> jax.Array:
    """Load a `(block, d)` tile as `dtype`, zeroing rows past `seq` (only when seq % block != 0)."""
    x = ref[...].astype(dtype)
    if seq % block == 0:
        return x
    return jnp.where(positions(block_idx, block, (block, 1), 0) < seq, x, jnp.zeros_like(x))


def flat_slot(grid_b, grid_h, grid_row, slot, heads: int, rows: int, list_len: int):
    """Offset of `lists[b, h, row, slot]` in a flattened `(batch, heads, rows, list_len)` list."""
    return ((grid_b * heads + grid_h) * rows + grid_row) * list_len + slot


def flat_row(grid_b, grid_h, grid_row, heads: int, rows: int):
    """Offset of `counts[b, h, row]` in a flattened `(batch, heads, rows)` count array."""
    return (grid_b * heads + grid_h) * rows + grid_row


def grid_slots(counts: jax.Array) -> jax.Array:
    """Dynamic grid bound of the slot axis: the largest kept count, at least 1 so every
    row block is visited once and its (possibly empty) result written."""
    return jnp.maximum(jnp.max(counts), 1)


def interpret_arg(interpret: bool):
    """The `interpret` argument of `pallas_call`: the TPU interpreter on CPU, or off."""
    return pltpu.InterpretParams() if interpret else False


def compiler_params() -> pltpu.CompilerParams:
    """(batch, heads, row block) are independent; the slot axis accumulates."""
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
