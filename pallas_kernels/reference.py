"""Dense masked block-sparse attention in plain jnp: the oracle for every kernel.

Layout is `(batch, seq, heads, head_dim)`. The block mask has shape
`(batch, heads, ceil(seq_q / block_q), ceil(seq_k / block_k))` and is expanded to a
token mask (intersected with an optional `TokenBand`), so this costs O(seq_q * seq_k)
memory: use it on small shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_index import TokenBand
from pallas_kernels.blocks import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, default_sm_scale


def expand_block_mask(block_mask: jax.Array, seq_q: int, seq_k: int, block_q: int, block_k: int) -> jax.Array:
    """Bool `(batch, heads, nq, nk)` block mask -> bool `(batch, heads, seq_q, seq_k)` token mask."""
    rows = jnp.arange(seq_q) // block_q
    cols = jnp.arange(seq_k) // block_k
    return block_mask[:, :, rows][:, :, :, cols]


def reference_attention_with_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_mask: jax.Array,
    *,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    sm_scale: float | None = None,
    band: TokenBand | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Masked softmax attention over the kept blocks.

    Args:
      q: `(batch, seq_q, heads, head_dim)`, bf16/fp16/fp32.
      k, v: `(batch, seq_k, heads, head_dim)`, same dtype as `q`.
      block_mask: bool `(batch, heads, ceil(seq_q/block_q), ceil(seq_k/block_k))`.
      band: optional `TokenBand`; its excluded tokens count as masked.
    Returns:
      out `(batch, seq_q, heads, head_dim)` in `q.dtype` (zeros on rows with no kept
      block) and the row log-sum-exp `(batch, heads, seq_q)` in fp32 (-inf on such rows).
    Accumulation is in fp32.
    """
    seq_q, seq_k, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    scale = default_sm_scale(head_dim) if sm_scale is None else sm_scale
    token_mask = expand_block_mask(block_mask, seq_q, seq_k, block_q, block_k)
    if band is not None:
        rows, cols = jnp.arange(seq_q)[None, None, :, None], jnp.arange(seq_k)[None, None, None]
        token_mask = token_mask & band.allows(rows, cols)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    s = jnp.where(token_mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(l == 0.0, 1.0, l), v.astype(jnp.float32))
    lse = jnp.where(l[..., 0] > 0.0, m[..., 0] + jnp.log(l[..., 0]), -jnp.inf)
    return out.astype(q.dtype), lse


def reference_attention(q, k, v, block_mask, *, block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K, sm_scale=None,
                        band=None):
    """Output only of `reference_attention_with_lse`; differentiable with `jax.grad`."""
    return reference_attention_with_lse(
        q, k, v, block_mask, block_q=block_q, block_k=block_k, sm_scale=sm_scale, band=band
    )[0]
