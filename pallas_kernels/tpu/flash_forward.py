"""Pallas TPU block-sparse flash-attention forward: output and row log-sum-exp.

Grid `(rows, slots)` over rows `(batch, head, q_block)` (in chunks, see
`tpu.tiles.call_over_row_chunks`) and `slots` = the largest kept count of the chunk
(a dynamic grid bound, at least 1). The kept k-block lists of the `BlockIndex`
are scalar-prefetched into SMEM; the K/V index_map reads slot `j` of the current
row's list, so only kept blocks are DMA'd (padding slots repeat the last kept index,
so the pipeline sees an unchanged block index and skips the copy) and compute past
`kv_counts` is skipped with `pl.when`. Online softmax state lives in VMEM scratch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_index import BlockIndex
from pallas_kernels.tpu.tiles import (
    NN_DIMS,
    NT_DIMS,
    call_over_row_chunks,
    compute_dtype,
    load_rows,
    positions,
    row_spec,
    seq_view,
    tile_spec,
)


def _forward_kernel(
    kv_idx_ref, kv_cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref,
    *, list_len, block_q, block_k, seq_k, sm_scale, dtype,
):
    g, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(j < kv_cnt_ref[g])
    def _accumulate():
        kb = kv_idx_ref[g * list_len + j]
        q = q_ref[...].astype(dtype)
        k = load_rows(k_ref, kb, block_k, seq_k, dtype)
        v = load_rows(v_ref, kb, block_k, seq_k, dtype)
        s = jax.lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * sm_scale
        if seq_k % block_k:
            s = jnp.where(positions(kb, block_k, (1, block_k), 1) < seq_k, s, -jnp.inf)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot_general(p.astype(dtype), v, NN_DIMS, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        l = l_ref[...]
        kept = l > 0.0
        l_safe = jnp.where(kept, l, 1.0)
        o_ref[...] = (acc_ref[...] / l_safe).astype(o_ref.dtype)
        lse = jnp.where(kept, m_ref[...] + jnp.log(l_safe), -jnp.inf)
        lse_ref[...] = lse.reshape(1, block_q)


def forward(q, k, v, index: BlockIndex, *, block_q: int, block_k: int, sm_scale: float, interpret: bool = False):
    """q `(batch, seq_q, heads, d)`, k/v `(batch, seq_k, heads, d)` -> out like q, lse `(batch, heads, seq_q)` fp32.

    Rows whose q block keeps no k block get zero output and lse -inf."""
    batch, seq_q, heads, head_dim = q.shape

    def make_specs(locate, listed):
        def q_map(g, j, idx_ref, cnt_ref):
            b, h, i = locate(g)
            return b, i, h

        def kv_map(g, j, idx_ref, cnt_ref):
            b, h, _ = locate(g)
            return b, listed(g, j, idx_ref), h

        q_tile = tile_spec(block_q, head_dim, q_map)
        kv_tile = tile_spec(block_k, head_dim, kv_map)
        return [q_tile, kv_tile, kv_tile], [q_tile, row_spec(block_q, lambda *a: locate(a[0]))]

    kernel = functools.partial(
        _forward_kernel, list_len=index.num_k_blocks, block_q=block_q, block_k=block_k,
        seq_k=k.shape[1], sm_scale=sm_scale, dtype=compute_dtype(q.dtype),
    )
    out, lse = call_over_row_chunks(
        kernel, index.kv_indices, index.kv_counts, make_specs,
        operands=(seq_view(q), seq_view(k), seq_view(v)),
        out_shape=[
            jax.ShapeDtypeStruct((batch, seq_q, heads * head_dim), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, 1, seq_q), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, head_dim), jnp.float32),
        ],
        interpret=interpret,
        name="sparse_flash_fwd",
    )
    return out.reshape(q.shape), lse[:, :, 0, :]
