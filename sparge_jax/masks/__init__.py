"""Block-mask providers.

`sparge_jax.masks.sparge` holds SpargeAttention2's rules (pooled scores, Top-k, Top-p,
hybrid, self-similarity guard); `spargeattn`, `sla`, `svg`, `radial` and `svg2` hold the
peer methods' rules and `providers` puts them behind one interface (`make_plan`).
Every mask is bool `(batch, heads, q_blocks, k_blocks)`, the format `sparse_attention`
consumes.
"""

from sparge_jax.masks.sparge import (
    block_self_similarity,
    diagonal_blocks,
    hybrid_mask,
    pool_blocks,
    pooled_scores,
    predict_block_index,
    predict_mask,
    similarity_guard,
    sparsity,
    topk_mask,
    topp_mask,
)
from sparge_jax.masks.providers import PROVIDERS, AttentionPlan, make_plan

__all__ = [
    "PROVIDERS",
    "AttentionPlan",
    "make_plan",
    "block_self_similarity",
    "diagonal_blocks",
    "hybrid_mask",
    "pool_blocks",
    "pooled_scores",
    "predict_block_index",
    "predict_mask",
    "similarity_guard",
    "sparsity",
    "topk_mask",
    "topp_mask",
]
