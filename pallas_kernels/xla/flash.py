"""Block-sparse flash attention in jnp: the `xla` backend's forward and backward.

Walks only the kept blocks of each row with an online softmax, like the Pallas
kernels, by gathering one kept K/V block per q block per step of a `while_loop`
whose trip count is the largest kept count. Memory is O(seq * block), not O(seq^2).
Shapes: q `(batch, seq_q, heads, head_dim)`, k/v `(batch, seq_k, heads, head_dim)`,
log-sum-exp `(batch, heads, seq_q)` fp32. Accumulation in fp32. An optional `TokenBand`
masks tokens inside the kept blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backend import check_inputs
from pallas_kernels.block_index import BlockIndex, TokenBand
from pallas_kernels.blocks import to_blocks


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    """`(batch, seq, heads, d)` -> fp32 `(batch, heads, n_blocks, block, d)`, zero-padded."""
    return to_blocks(x.astype(jnp.float32), block).transpose(0, 3, 1, 2, 4)


def _from_blocks(x: jax.Array, seq: int, dtype) -> jax.Array:
    """Inverse of `_to_blocks`, cropping the padding."""
    b, h, n, blk, d = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(b, n * blk, h, d)[:, :seq].astype(dtype)


def _rows_to_blocks(x: jax.Array, n_blocks: int, block: int) -> jax.Array:
    """`(batch, heads, seq)` -> `(batch, heads, n_blocks, block)`, zero-padded."""
    return jnp.pad(x, ((0, 0), (0, 0), (0, n_blocks * block - x.shape[-1]))).reshape(
        *x.shape[:2], n_blocks, block
    )


def _gather(blocks: jax.Array, idx: jax.Array) -> jax.Array:
    """blocks `(batch, heads, n, ...)`, idx `(batch, heads, m)` -> `(batch, heads, m, ...)`.

    `take_along_axis` keeps batch and heads as batching dimensions of the gather, so with q/k/v
    sharded over heads (tensor parallelism) each device gathers its own heads, with no
    collectives inside the loops below."""
    idx = idx.reshape(*idx.shape, *(1,) * (blocks.ndim - 3))
    return jnp.take_along_axis(blocks, idx, axis=2, mode="clip")


def _valid_positions(seq: int, n_blocks: int, block: int) -> jax.Array:
    """Bool `(n_blocks, block)`: which padded positions are real tokens."""
    return (jnp.arange(n_blocks * block) < seq).reshape(n_blocks, block)


def _positions(idx: jax.Array, block: int) -> jax.Array:
    """Block numbers `(...)` -> token positions `(..., block)` of those blocks."""
    return idx[..., None] * block + jnp.arange(block)


def _band_allows(band: TokenBand | None, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array | bool:
    """`band.allows(q_pos[..., :, None], k_pos[..., None, :])`, or True without a band."""
    return True if band is None else band.allows(q_pos[..., :, None], k_pos[..., None, :])


def forward(q, k, v, index: BlockIndex, *, block_q: int, block_k: int, sm_scale: float, interpret: bool = False,
            band: TokenBand | None = None):
    """Returns out `(batch, seq_q, heads, head_dim)` in q.dtype and lse `(batch, heads, seq_q)` fp32.
    band: optional `TokenBand` (tokens it excludes count as masked). `interpret` is ignored
    (jnp runs on any device)."""
    check_inputs(q, k, v, index, block_q, block_k)
    seq_q, seq_k = q.shape[1], k.shape[1]
    nq, nk = index.num_q_blocks, index.num_k_blocks
    qb = _to_blocks(q, block_q) * sm_scale
    kb, vb = _to_blocks(k, block_k), _to_blocks(v, block_k)
    key_valid = _valid_positions(seq_k, nk, block_k)
    q_pos = _positions(jnp.arange(nq), block_q)
    counts = index.kv_counts

    def body(carry):
        j, m, l, acc = carry
        idx = index.kv_indices[..., j]
        kj, vj = _gather(kb, idx), _gather(vb, idx)
        s = jnp.einsum("bhnid,bhnjd->bhnij", qb, kj)
        valid = (j < counts)[..., None, None] & key_valid[idx][..., None, :]
        valid = valid & _band_allows(band, q_pos, _positions(idx, block_k))
        s = jnp.where(valid, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + jnp.sum(p, axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("bhnij,bhnjd->bhnid", p, vj)
        return j + 1, m_new, l, acc

    row_shape = qb.shape[:-1]
    init = (
        jnp.int32(0),
        jnp.full(row_shape, -jnp.inf, jnp.float32),
        jnp.zeros(row_shape, jnp.float32),
        jnp.zeros(qb.shape[:-1] + (v.shape[-1],), jnp.float32),
    )
    trips = jnp.max(counts)  # once, outside the loop: no reduction over sharded heads per step
    _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < trips, body, init)
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
    lse = jnp.where(l > 0.0, m + jnp.log(jnp.where(l > 0.0, l, 1.0)), -jnp.inf)
    lse = lse.reshape(*lse.shape[:2], -1)[..., :seq_q]
    return _from_blocks(out, seq_q, q.dtype), lse


def backward(q, k, v, out, lse, dout, index: BlockIndex, *, block_q: int, block_k: int, sm_scale: float,
             interpret: bool = False, band: TokenBand | None = None):
    """Gradients (dq, dk, dv) of `forward` (with the same `band`) w.r.t. q, k, v, touching only
    kept blocks. `interpret` is ignored."""
    check_inputs(q, k, v, index, block_q, block_k, out=out, lse=lse, dout=dout)
    seq_q, seq_k = q.shape[1], k.shape[1]
    nq, nk = index.num_q_blocks, index.num_k_blocks
    qb = _to_blocks(q, block_q)
    kb, vb = _to_blocks(k, block_k), _to_blocks(v, block_k)
    dob = _to_blocks(dout, block_q)
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
    delta_b = _rows_to_blocks(delta, nq, block_q)
    lse_b = _rows_to_blocks(jnp.where(jnp.isfinite(lse), lse, 0.0), nq, block_q)
    key_valid = _valid_positions(seq_k, nk, block_k)
    row_valid = _valid_positions(seq_q, nq, block_q)
    q_pos, k_pos = _positions(jnp.arange(nq), block_q), _positions(jnp.arange(nk), block_k)

    def probs(qx, kx, lse_rows, valid):
        s = jnp.einsum("bhnid,bhnjd->bhnij", qx, kx) * sm_scale
        return jnp.where(valid, jnp.exp(s - lse_rows[..., None]), 0.0)

    def dq_body(carry):
        j, dq = carry
        idx = index.kv_indices[..., j]
        kj, vj = _gather(kb, idx), _gather(vb, idx)
        valid = (j < index.kv_counts)[..., None, None] & key_valid[idx][..., None, :]
        valid = valid & _band_allows(band, q_pos, _positions(idx, block_k))
        p = probs(qb, kj, lse_b, valid)
        dp = jnp.einsum("bhnid,bhnjd->bhnij", dob, vj)
        ds = p * (dp - delta_b[..., None])
        return j + 1, dq + jnp.einsum("bhnij,bhnjd->bhnid", ds, kj)

    kv_trips, q_trips = jnp.max(index.kv_counts), jnp.max(index.q_counts)
    _, dq = jax.lax.while_loop(lambda c: c[0] < kv_trips, dq_body, (jnp.int32(0), jnp.zeros_like(qb)))

    def dkv_body(carry):
        i, dk, dv = carry
        idx = index.q_indices[..., i]
        qi, doi = _gather(qb, idx), _gather(dob, idx)
        lse_i, delta_i = _gather(lse_b, idx), _gather(delta_b, idx)
        valid = (
            (i < index.q_counts)[..., None, None]
            & row_valid[idx][..., :, None]
            & key_valid[None, None, :, None, :]
            & _band_allows(band, _positions(idx, block_q), k_pos)
        )
        p = probs(qi, kb, lse_i, valid)
        dv = dv + jnp.einsum("bhnij,bhnid->bhnjd", p, doi)
        dp = jnp.einsum("bhnid,bhnjd->bhnij", doi, vb)
        ds = p * (dp - delta_i[..., None])
        return i + 1, dk + jnp.einsum("bhnij,bhnid->bhnjd", ds, qi), dv

    _, dk, dv = jax.lax.while_loop(
        lambda c: c[0] < q_trips,
        dkv_body,
        (jnp.int32(0), jnp.zeros_like(kb), jnp.zeros_like(vb)),
    )
    return (
        _from_blocks(dq * sm_scale, seq_q, q.dtype),
        _from_blocks(dk * sm_scale, seq_k, k.dtype),
        _from_blocks(dv, seq_k, v.dtype),
    )
