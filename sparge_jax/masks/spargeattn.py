"""SpargeAttn's training-free block mask: pooled scores, cdf threshold, self-similarity guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference import default_sm_scale
from sparge_jax.masks.sparge import pool_blocks


def mean_pairwise_cosine(x: jax.Array, block: int) -> jax.Array:
    """Mean cosine similarity over all ordered token pairs (self-pairs included) of each block.

    `(batch, seq, heads, d)` -> fp32 `(batch, heads, n_blocks)`. Equal to the squared norm
    of the mean unit vector of the block's real tokens.
    """
    x = x.astype(jnp.float32)
    unit = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    mean_unit = pool_blocks(unit, block)
    return jnp.sum(mean_unit * mean_unit, axis=-1)


def cdf_mask(probs: jax.Array, threshold) -> jax.Array:
    """Per row, keep the largest entries whose cumulative sum stays <= threshold (at least one).

    probs: `(batch, heads, q_blocks, k_blocks)` rows summing to 1; threshold: float or `(heads,)`.
    """
    heads = probs.shape[1]
    thr = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (heads,)).reshape(1, heads, 1, 1)
    order = jnp.argsort(-probs, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1)
    cdf = jnp.cumsum(jnp.take_along_axis(probs, order, axis=-1), axis=-1)
    count = jnp.maximum(jnp.sum(cdf <= thr, axis=-1, keepdims=True), 1)
    return ranks < count


def spargeattn_mask(q, k, *, block_q: int, block_k: int, cdf_threshold, sim_threshold,
                    keep_first: bool = False, sm_scale: float | None = None) -> jax.Array:
    """SpargeAttn's block mask, bool `(batch, heads, q_blocks, k_blocks)`.

    q, k: `(batch, seq, heads, d)`. Blocks with mean pairwise cosine <= sim_threshold are
    rough: rough k blocks are excluded from the pooled softmax and their columns kept;
    rough q blocks keep their whole row. The rest of each row is selected by `cdf_mask`.
    """
    scale = default_sm_scale(q.shape[-1]) if sm_scale is None else sm_scale
    smooth_q = mean_pairwise_cosine(q, block_q) > sim_threshold
    smooth_k = mean_pairwise_cosine(k, block_k) > sim_threshold
    logits = jnp.einsum("bhid,bhjd->bhij", pool_blocks(q, block_q), pool_blocks(k, block_k)) * scale
    logits = jnp.where(smooth_k[..., None, :], logits, -jnp.inf)
    any_smooth = jnp.any(smooth_k, axis=-1)[..., None, None]
    probs = jax.nn.softmax(jnp.where(any_smooth, logits, 0.0), axis=-1)
    mask = cdf_mask(probs, cdf_threshold) | ~smooth_q[..., :, None] | ~smooth_k[..., None, :]
    if keep_first:
        mask = mask.at[..., 0].set(True)
    return mask
