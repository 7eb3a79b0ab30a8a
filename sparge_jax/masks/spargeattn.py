"""SpargeAttn's training-free block mask: pooled scores, cdf threshold or Top-k, self-similarity guard."""

from __future__ import annotations

import jax

from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.method_config import Sparge2Method
from sparge_jax.masks.sparge import mean_pairwise_cosine, predict_mask

__all__ = ["mean_pairwise_cosine", "spargeattn_config", "spargeattn_mask"]


def spargeattn_config(*, block_q: int, block_k: int, cdf_threshold: float | None, sim_threshold: float,
                      topk: float | None = None, keep_first: bool = False, smooth_k: bool = False,
                      tail_block: str = "score", sm_scale: float | None = None) -> SparseConfig:
    """The `SparseConfig` whose `predict_mask` is SpargeAttn's mask (see `spargeattn_mask`)."""
    if (cdf_threshold is None) == (topk is None):
        raise ValueError(f"exactly one of cdf_threshold and topk must be given; got {cdf_threshold!r}, {topk!r}")
    rule = dict(rule="topp", topp=cdf_threshold) if topk is None else dict(rule="topk", topk=topk)
    method = Sparge2Method(**rule, topk_count="floor", topp_boundary="exclude", sim_threshold=sim_threshold,
                           similarity="pairwise", smooth_k=smooth_k, tail_block=tail_block, keep_first=keep_first)
    return SparseConfig(method, KernelConfig(block_q=block_q, block_k=block_k, sm_scale=sm_scale, backend="xla"))


def spargeattn_mask(q, k, *, block_q: int, block_k: int, cdf_threshold: float | None, sim_threshold: float,
                    keep_first: bool = False, sm_scale: float | None = None, topk: float | None = None,
                    smooth_k: bool = False, tail_block: str = "score") -> jax.Array:
    """SpargeAttn's block mask, bool `(batch, heads, q_blocks, k_blocks)`.

    q, k: `(batch, seq, heads, d)`. Blocks with mean pairwise cosine <= sim_threshold are
    rough (k tested after subtracting its sequence mean when `smooth_k`; a ragged last
    block always rough with tail_block="never_similar"): rough k blocks are excluded from
    the pooled softmax and their columns kept; rough q blocks keep their whole row. The
    rest of each row keeps the largest pooled probabilities whose cumulative sum stays
    <= cdf_threshold, or, with `topk` instead, int(topk * k_blocks) blocks (at least one).
    """
    config = spargeattn_config(block_q=block_q, block_k=block_k, cdf_threshold=cdf_threshold,
                               sim_threshold=sim_threshold, topk=topk, keep_first=keep_first,
                               smooth_k=smooth_k, tail_block=tail_block, sm_scale=sm_scale)
    return predict_mask(q, k, config)
