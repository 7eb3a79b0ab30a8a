"""Block-mask providers.

`sparge_jax.masks.sparge` holds SpargeAttention2's rules (pooled scores, Top-k, Top-p,
hybrid, self-similarity guard); the other modules hold the peer methods' rules.
Every mask is bool `(batch, heads, q_blocks, k_blocks)`, the format `sparse_attention`
consumes.
"""

from sparge_jax.masks.sparge import (
    block_self_similarity,
    diagonal_blocks,
    hybrid_mask,
    pool_blocks,
    pooled_scores,
    predict_mask,
    similarity_guard,
    sparsity,
    topk_mask,
    topp_mask,
)

__all__ = [
    "block_self_similarity",
    "diagonal_blocks",
    "hybrid_mask",
    "pool_blocks",
    "pooled_scores",
    "predict_mask",
    "similarity_guard",
    "sparsity",
    "topk_mask",
    "topp_mask",
]
