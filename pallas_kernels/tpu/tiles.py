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
SMEM_LIST_ENTRIES = 1 << 16  # int32 list entries one pallas_call prefetches into SMEM (256 KiB)


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


def grid_slots(counts: jax.Array) -> jax.Array:
    """Dynamic grid bound of the slot axis: the largest kept count, at least 1 so every
    row block is visited once and its (possibly empty) result written."""
    return jnp.maximum(jnp.max(counts), 1)


def interpret_arg(interpret: bool):
    """The `interpret` argument of `pallas_call`: the TPU interpreter on CPU, or off."""
    return pltpu.InterpretParams() if interpret else False


def call_over_row_chunks(
    kernel, lists, counts, make_specs, *, operands, out_shape, scratch_shapes, interpret, name,
):
    """Run a block-list kernel over all rows, a chunk of rows per `pallas_call`.

    lists `(batch, heads, rows, list_len)` / counts `(batch, heads, rows)` int32 are
    flattened to rows `g = (b * heads + h) * rows + r`; each call scalar-prefetches only
    its chunk's lists (at most `SMEM_LIST_ENTRIES` entries, so SMEM holds them at any
    size) and runs grid `(chunk_rows, slots)`. Later calls write into the earlier
    calls' outputs in place (`input_output_aliases`).

    kernel(list_ref, count_ref, *in_refs, *out_refs, *scratch): inside it `program_id(0)`
    is the chunk row, `program_id(1)` the slot; the row's list is
    `list_ref[program_id(0) * list_len + slot]`, its count `count_ref[program_id(0)]`.
    make_specs(locate, listed) -> (in_specs, out_specs), where `locate(g) -> (b, h, r)`
    and `listed(g, slot, list_ref)` is the listed block, both for the index maps.
    """
    _, heads, rows, list_len = lists.shape
    flat_lists, flat_counts = lists.reshape(-1), counts.reshape(-1)
    total = flat_counts.shape[0]
    chunk = max(1, min(total, SMEM_LIST_ENTRIES // list_len))
    outputs = None
    for r0 in range(0, total, chunk):
        n = min(chunk, total - r0)

        def locate(g, r0=r0):
            row = r0 + g  # non-negative: truncating lax.div/rem avoid floor-division sign fixes
            return (jax.lax.div(row, heads * rows), jax.lax.rem(jax.lax.div(row, rows), heads),
                    jax.lax.rem(row, rows))

        def listed(g, slot, list_ref):
            return list_ref[g * list_len + slot]

        in_specs, out_specs = make_specs(locate, listed)
        n_in = 2 + len(in_specs)
        aliased = [] if outputs is None else list(outputs)

        def body(*refs, n_in=n_in, n_alias=len(aliased)):
            kernel(*refs[:n_in], *refs[n_in + n_alias:])

        outputs = pl.pallas_call(
            body,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(n, grid_slots(flat_counts[r0:r0 + n])),
                in_specs=in_specs + [pl.BlockSpec(memory_space=pl.ANY)] * len(aliased),
                out_specs=out_specs,
                scratch_shapes=scratch_shapes,
            ),
            out_shape=out_shape,
            input_output_aliases={n_in + t: t for t in range(len(aliased))},
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
            interpret=interpret_arg(interpret),
            name=name,
        )(flat_lists[r0 * list_len:(r0 + n) * list_len], flat_counts[r0:r0 + n], *operands, *aliased)
    return outputs
