"""Pallas TPU block-sparse flash-attention backward: dQ kernel and dK/dV kernel.

With P = exp(S * scale - lse), dS = P * (dO V^T - delta), delta = rowsum(dO * O):
dQ = scale * dS K walks each q block's kept k blocks (`kv_indices/kv_counts`), and
dK = scale * dS^T Q, dV = P^T dO walk each k block's kept q blocks, the transposed
lists (`q_indices/q_counts`). Both use the forward's scheme (`call_over_row_chunks`):
the lists are scalar-prefetched, the index_map fetches only listed blocks, the slot
axis is as long as the largest count and slots past a row's count are skipped with
`pl.when`. The dK/dV kernel works on S^T `(block_k, block_q)` so lse and delta stay
lane-dense `(1, block_q)` rows.
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
    row_view,
    seq_view,
    tile_spec,
)


def _dq_kernel(
    kv_idx_ref, kv_cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_ref,
    *, list_len, block_k, seq_k, sm_scale, dtype,
):
    g, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(j < kv_cnt_ref[g])
    def _accumulate():
        kb = kv_idx_ref[g * list_len + j]
        q, do = q_ref[...].astype(dtype), do_ref[...].astype(dtype)
        k = load_rows(k_ref, kb, block_k, seq_k, dtype)
        v = load_rows(v_ref, kb, block_k, seq_k, dtype)
        lse = jnp.expand_dims(lse_ref[0], 1)
        delta = jnp.expand_dims(delta_ref[0], 1)
        s = jax.lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32) * sm_scale
        p = jnp.exp(s - lse)
        if seq_k % block_k:
            p = jnp.where(positions(kb, block_k, (1, block_k), 1) < seq_k, p, 0.0)
        dp = jax.lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        acc_ref[...] += jax.lax.dot_general(ds.astype(dtype), k, NN_DIMS, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_idx_ref, q_cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc,
    *, list_len, block_q, seq_q, sm_scale, dtype,
):
    g, t = pl.program_id(0), pl.program_id(1)

    @pl.when(t == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when(t < q_cnt_ref[g])
    def _accumulate():
        qb = q_idx_ref[g * list_len + t]
        q = load_rows(q_ref, qb, block_q, seq_q, dtype)
        do = load_rows(do_ref, qb, block_q, seq_q, dtype)
        k, v = k_ref[...].astype(dtype), v_ref[...].astype(dtype)
        s_t = jax.lax.dot_general(k, q, NT_DIMS, preferred_element_type=jnp.float32) * sm_scale
        p_t = jnp.exp(s_t - lse_ref[...])
        dp_t = jax.lax.dot_general(v, do, NT_DIMS, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_ref[...])
        if seq_q % block_q:
            row_ok = positions(qb, block_q, (1, block_q), 1) < seq_q
            p_t = jnp.where(row_ok, p_t, 0.0)
            ds_t = jnp.where(row_ok, ds_t, 0.0)
        dv_acc[...] += jax.lax.dot_general(p_t.astype(dtype), do, NN_DIMS, preferred_element_type=jnp.float32)
        dk_acc[...] += jax.lax.dot_general(ds_t.astype(dtype), q, NN_DIMS, preferred_element_type=jnp.float32)

    @pl.when(t == pl.num_programs(1) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq(q, k, v, dout, lse, delta, index: BlockIndex, *, block_q, block_k, sm_scale, interpret):
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
        rows = row_spec(block_q, lambda g, *_: locate(g))
        return [q_tile, kv_tile, kv_tile, q_tile, rows, rows], [q_tile]

    kernel = functools.partial(
        _dq_kernel, list_len=index.num_k_blocks, block_k=block_k, seq_k=k.shape[1],
        sm_scale=sm_scale, dtype=compute_dtype(q.dtype),
    )
    (dq,) = call_over_row_chunks(
        kernel, index.kv_indices, index.kv_counts, make_specs,
        operands=(seq_view(q), seq_view(k), seq_view(v), seq_view(dout), row_view(lse), row_view(delta)),
        out_shape=[jax.ShapeDtypeStruct((batch, seq_q, heads * head_dim), q.dtype)],
        scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
        interpret=interpret,
        name="sparse_flash_bwd_dq",
    )
    return dq.reshape(q.shape)


def _dkv(q, k, v, dout, lse, delta, index: BlockIndex, *, block_q, block_k, sm_scale, interpret):
    batch, seq_k, heads, head_dim = k.shape

    def make_specs(locate, listed):
        def k_map(g, t, idx_ref, cnt_ref):
            b, h, kb = locate(g)
            return b, kb, h

        def q_map(g, t, idx_ref, cnt_ref):
            b, h, _ = locate(g)
            return b, listed(g, t, idx_ref), h

        def rows_map(g, t, idx_ref, cnt_ref):
            b, h, _ = locate(g)
            return b, h, listed(g, t, idx_ref)

        q_tile = tile_spec(block_q, head_dim, q_map)
        k_tile = tile_spec(block_k, head_dim, k_map)
        rows = row_spec(block_q, rows_map)
        return [q_tile, k_tile, k_tile, q_tile, rows, rows], [k_tile, k_tile]

    kernel = functools.partial(
        _dkv_kernel, list_len=index.num_q_blocks, block_q=block_q, seq_q=q.shape[1],
        sm_scale=sm_scale, dtype=compute_dtype(q.dtype),
    )
    grad_shape = jax.ShapeDtypeStruct((batch, seq_k, heads * head_dim), k.dtype)
    dk, dv = call_over_row_chunks(
        kernel, index.q_indices, index.q_counts, make_specs,
        operands=(seq_view(q), seq_view(k), seq_view(v), seq_view(dout), row_view(lse), row_view(delta)),
        out_shape=[grad_shape, grad_shape],
        scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32)] * 2,
        interpret=interpret,
        name="sparse_flash_bwd_dkv",
    )
    return dk.reshape(k.shape), dv.reshape(v.shape)


def backward(q, k, v, out, lse, dout, index: BlockIndex, *, block_q: int, block_k: int, sm_scale: float,
             interpret: bool = False):
    """Gradients (dq, dk, dv) of `tpu.flash_forward.forward`, in the dtypes of q, k, v.

    out/dout `(batch, seq_q, heads, d)`, lse `(batch, heads, seq_q)` fp32 from the forward."""
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
    kwargs = dict(block_q=block_q, block_k=block_k, sm_scale=sm_scale, interpret=interpret)
    dq = _dq(q, k, v, dout, lse, delta, index, **kwargs)
    dk, dv = _dkv(q, k, v, dout, lse, delta, index, **kwargs)
    return dq, dk, dv
