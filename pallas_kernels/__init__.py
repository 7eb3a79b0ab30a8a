"""Block-sparse flash attention kernels (Mosaic GPU, Pallas TPU, jnp) and their oracle.

Public entry points: `forward` / `backward` (backend dispatch), the compact mask
format (`BlockIndex`, `mask_to_block_index`), the block arithmetic of `blocks`, and
`reference_attention` (the oracle). Each backend is a sub-package (`xla/`, `mosaic_gpu/`,
`tpu/`; `triton/` holds the fused block selection) exposing a `BACKEND`
(`pallas_kernels.backend.Backend`) that `dispatch` registers; docs/kernels.md, "Adding a
backend", says what a new one needs.
"""

from pallas_kernels.block_index import (
    BlockIndex,
    TokenBand,
    block_index_to_mask,
    block_index_to_mask_transposed,
    mask_to_block_index,
)
from pallas_kernels.blocks import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, default_sm_scale, num_blocks
from pallas_kernels.dispatch import BACKENDS, backward, forward, resolve_backend
from pallas_kernels.reference import reference_attention, reference_attention_with_lse

__all__ = [
    "BACKENDS",
    "BlockIndex",
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "TokenBand",
    "backward",
    "block_index_to_mask",
    "block_index_to_mask_transposed",
    "default_sm_scale",
    "forward",
    "mask_to_block_index",
    "num_blocks",
    "reference_attention",
    "reference_attention_with_lse",
    "resolve_backend",
]
