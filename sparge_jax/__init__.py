"""sparge-jax: trainable block-sparse attention for video diffusion transformers."""

from sparge_jax.attention import block_sparse_attention, mask_shape, sparse_attention
from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.masks import predict_block_index, predict_mask, sparsity

__all__ = [
    "KernelConfig",
    "SparseConfig",
    "block_sparse_attention",
    "mask_shape",
    "predict_block_index",
    "predict_mask",
    "sparse_attention",
    "sparsity",
]
