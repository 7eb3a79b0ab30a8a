"""Sparse VideoGen2: k-means semantic clusters, permuted into blocks, Top-p over centroids.

Per (batch, head), queries and keys are clustered by Euclidean k-means. Tokens are
permuted so each cluster is contiguous (stable sort by label). A q cluster attends to the
k clusters chosen by Top-p over the size-weighted centroid softmax. Our kernels use fixed
blocks, so a block pair of the permuted order is kept when any of its q clusters is
linked to any of its k clusters. The attention output is permuted back by the caller.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import default_sm_scale, num_blocks


class Centroids(NamedTuple):
    """k-means state reused across denoising steps: q `(batch, heads, q_clusters, d)`, k `(..., k_clusters, d)` fp32."""

    q: jax.Array
    k: jax.Array


def _assign(x: jax.Array, cent: jax.Array) -> jax.Array:
    """Nearest centroid of each point (lowest index on ties): int32 `(groups, n)`."""
    dist = jnp.sum(cent * cent, -1)[:, None, :] - 2.0 * jnp.einsum("gnd,gcd->gnc", x, cent)
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def _cluster_sums(x: jax.Array, labels: jax.Array, clusters: int) -> tuple[jax.Array, jax.Array]:
    """Per cluster, the sum of its points `(groups, c, d)` and their count `(groups, c)` (fp32)."""
    per_cluster = jax.vmap(lambda values, lab: jax.ops.segment_sum(values, lab, num_segments=clusters))
    return per_cluster(x, labels), per_cluster(jnp.ones(x.shape[:2], jnp.float32), labels)


def _update(x: jax.Array, labels: jax.Array, cent: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each centroid moved to its points' mean (an empty cluster keeps its centroid), and the sizes."""
    sums, counts = _cluster_sums(x, labels, cent.shape[1])
    return jnp.where(counts[..., None] > 0, sums / jnp.maximum(counts, 1.0)[..., None], cent), counts


def kmeans(x: jax.Array, centroids: jax.Array, iters: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lloyd iterations of Euclidean k-means.

    x fp32 `(groups, n, d)`, centroids `(groups, c, d)`. Each iteration assigns every point
    to its nearest centroid (lowest index on ties) and moves each centroid to its points'
    mean (an empty cluster keeps its centroid). Returns (labels int32 `(groups, n)` of the
    final centroids, centroids `(groups, c, d)`, sizes int32 `(groups, c)`).
    """
    x = x.astype(jnp.float32)
    centroids = jax.lax.fori_loop(0, iters, lambda _, cent: _update(x, _assign(x, cent), cent)[0],
                                  centroids.astype(jnp.float32))
    labels = _assign(x, centroids)
    sizes = _cluster_sums(x, labels, centroids.shape[1])[1].astype(jnp.int32)
    return labels, centroids, sizes


def kmeans_upstream(x: jax.Array, centroids: jax.Array, max_iters: int, tol: float = 1e-4
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sparse VideoGen2's `batch_kmeans_Euclid`: at most `max_iters` (>= 1) assign-and-update
    iterations, stopping when the largest centroid move over all groups is below `tol`.

    The labels and sizes are those of the last assignment, made with the centroids from before
    the last update; the centroids returned are the pre-update ones when it stopped on `tol`
    and the updated ones when it ran out of iterations. Same shapes as `kmeans`.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1 (Sparse VideoGen2 fails at 0); got {max_iters}")
    x = x.astype(jnp.float32)
    cent = centroids.astype(jnp.float32)

    def body(state):
        it, cent, _, _, _ = state
        labels = _assign(x, cent)
        new, counts = _update(x, labels, cent)
        converged = jnp.max(jnp.linalg.norm(new - cent, axis=-1)) < tol
        return it + 1, jnp.where(converged, cent, new), labels, counts.astype(jnp.int32), converged

    start = (0, cent, jnp.zeros(x.shape[:2], jnp.int32), jnp.zeros(cent.shape[:2], jnp.int32), False)
    _, cent, labels, sizes, _ = jax.lax.while_loop(lambda s: (s[0] < max_iters) & ~s[4], body, start)
    return labels, cent, sizes


def initial_centroids(x: jax.Array, clusters: int, key: jax.Array) -> jax.Array:
    """`clusters` distinct tokens of each (batch, head), drawn at random: x `(batch, seq, heads, d)`
    -> fp32 `(batch, heads, clusters, d)`."""
    b, s, h, d = x.shape
    if clusters > s:
        raise ValueError(f"clusters ({clusters}) must not exceed the sequence length ({s})")
    picks = jax.vmap(lambda kk: jax.random.permutation(kk, s)[:clusters])(jax.random.split(key, b * h))
    xt = x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * h, s, d)
    return jnp.take_along_axis(xt, picks[..., None], axis=1).reshape(b, h, clusters, d)


def cluster_topp(q_centroids, k_centroids, k_sizes, *, topp: float, min_k_ratio: float,
                 sm_scale: float | None = None) -> jax.Array:
    """Bool `(batch, heads, q_clusters, k_clusters)`: per q cluster, the k clusters whose
    size-weighted softmax mass before them (in descending order) is <= topp, plus the
    first floor(min_k_ratio * k_clusters); empty k clusters carry no mass."""
    d = q_centroids.shape[-1]
    scale = default_sm_scale(d) if sm_scale is None else sm_scale
    logits = jnp.einsum("bhid,bhjd->bhij", q_centroids, k_centroids) * scale
    weights = k_sizes.astype(jnp.float32)[..., None, :]
    logits = logits - jnp.max(jnp.where(weights > 0, logits, -jnp.inf), axis=-1, keepdims=True)
    mass = weights * jnp.exp(logits)
    probs = mass / jnp.sum(mass, axis=-1, keepdims=True)
    order = jnp.argsort(-probs, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (before <= topp) | (jnp.arange(probs.shape[-1]) < int(min_k_ratio * probs.shape[-1]))
    return jnp.take_along_axis(keep_sorted, ranks, axis=-1)


def _clusters_per_block(sorted_labels: jax.Array, block: int, clusters: int) -> jax.Array:
    """Float `(batch, heads, n_blocks, clusters)`: 1 where the block holds a token of the cluster."""
    b, h, s = sorted_labels.shape
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    blocks = (jnp.arange(s) // block)[None, None, :]
    return jnp.zeros((b, h, num_blocks(s, block), clusters), jnp.float32).at[bi, hi, blocks, sorted_labels].set(1.0)


def initial_centroids_upstream(x: jax.Array, clusters: int, key: jax.Array) -> jax.Array:
    """Sparse VideoGen2's start: `clusters` tokens of each (batch, head) drawn with replacement.
    x `(batch, seq, heads, d)` -> fp32 `(batch, heads, clusters, d)`."""
    b, s, h, d = x.shape
    picks = jax.random.randint(key, (b * h, clusters), 0, s)
    xt = x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * h, s, d)
    return jnp.take_along_axis(xt, picks[..., None], axis=1).reshape(b, h, clusters, d)


def svg2_clusters(q, k, *, q_clusters: int, k_clusters: int, topp: float, min_k_ratio: float, iters: int,
                  centroids: Centroids, sm_scale: float | None = None, upstream: bool = False):
    """The k-means clusters of q and k and the cluster pairs Sparse VideoGen2 keeps.

    q, k: `(batch, seq, heads, d)`. Returns (q_labels int32 `(batch, heads, seq_q)`, k_labels
    int32 `(batch, heads, seq_k)`, links bool `(batch, heads, q_clusters, k_clusters)`
    (`cluster_topp`), the updated Centroids). upstream: cluster with `kmeans_upstream`."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    groups = lambda x: x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d)
    cluster = kmeans_upstream if upstream else kmeans
    q_labels, q_cent, _ = cluster(groups(q), centroids.q.reshape(b * h, q_clusters, d), iters)
    k_labels, k_cent, k_sizes = cluster(groups(k), centroids.k.reshape(b * h, k_clusters, d), iters)
    q_cent, k_cent = q_cent.reshape(b, h, q_clusters, d), k_cent.reshape(b, h, k_clusters, d)
    links = cluster_topp(q_cent, k_cent, k_sizes.reshape(b, h, k_clusters), topp=topp,
                         min_k_ratio=min_k_ratio, sm_scale=sm_scale)
    return q_labels.reshape(b, h, sq), k_labels.reshape(b, h, sk), links, Centroids(q_cent, k_cent)


def svg2_plan(q, k, *, block_q: int, block_k: int, q_clusters: int, k_clusters: int, topp: float,
              min_k_ratio: float, iters: int, centroids: Centroids, sm_scale: float | None = None,
              upstream: bool = False):
    """Block mask in the permuted order, the q and k orders, and the updated centroids.

    q, k: `(batch, seq, heads, d)`. Returns (mask bool `(batch, heads, q_blocks, k_blocks)`,
    q_order int32 `(batch, heads, seq_q)`, k_order int32 `(batch, heads, seq_k)`, Centroids).
    The clusters and their links are `svg2_clusters`'; a block pair of the sorted order is kept
    when any of its q clusters links to any of its k clusters.
    """
    q_labels, k_labels, links, centroids = svg2_clusters(
        q, k, q_clusters=q_clusters, k_clusters=k_clusters, topp=topp, min_k_ratio=min_k_ratio, iters=iters,
        centroids=centroids, sm_scale=sm_scale, upstream=upstream)
    q_order = jnp.argsort(q_labels, axis=-1, stable=True).astype(jnp.int32)
    k_order = jnp.argsort(k_labels, axis=-1, stable=True).astype(jnp.int32)
    q_hits = _clusters_per_block(jnp.take_along_axis(q_labels, q_order, -1), block_q, q_clusters)
    k_hits = _clusters_per_block(jnp.take_along_axis(k_labels, k_order, -1), block_k, k_clusters)
    mask = jnp.einsum("bhic,bhcj,bhkj->bhik", q_hits, links.astype(jnp.float32), k_hits) > 0
    return mask, q_order, k_order, centroids
