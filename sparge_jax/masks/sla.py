"""SLA's three-way block split: critical (exact), marginal (linear attention), negligible (skipped)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparge_jax.masks.sparge import pool_blocks


def sla_block_split(q, k, *, block_q: int, block_k: int, critical: float, negligible: float,
                    critical_count: str = "at_least_one") -> tuple[jax.Array, jax.Array]:
    """Critical and marginal block masks, each bool `(batch, heads, q_blocks, k_blocks)`.

    q, k: `(batch, seq, heads, d)`. Blocks are ranked per row by pool(Q) pool(K - mean_seq K)^T
    (keys centred over the sequence, as SLA does). The top floor(critical * k_blocks) (at
    least one; with critical_count="truncate", int(critical * k_blocks) as SLA's code, which
    must not be 0) are critical, the bottom floor(negligible * k_blocks) are negligible and
    the others are marginal.
    """
    centred = k.astype(jnp.float32) - jnp.mean(k.astype(jnp.float32), axis=1, keepdims=True)
    scores = jnp.einsum("bhid,bhjd->bhij", pool_blocks(q, block_q), pool_blocks(centred, block_k))
    nk = scores.shape[-1]
    if critical_count == "truncate":
        n_critical = min(nk, int(critical * nk))
        if n_critical == 0:
            raise ValueError(f"critical={critical} keeps int({critical} * {nk} k blocks) = 0 blocks (SLA's code "
                             "then returns NaN); raise critical or use critical_count='at_least_one'")
    else:
        n_critical = max(1, math.floor(critical * nk + 1e-6))
    n_negligible = min(nk - n_critical, math.floor(negligible * nk + 1e-6))
    order = jnp.argsort(-scores, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1)
    return ranks < n_critical, (ranks >= n_critical) & (ranks < nk - n_negligible)
