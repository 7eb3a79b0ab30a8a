"""`sparse_attention`: block-sparse attention with a custom VJP over kept blocks only."""

from __future__ import annotations

import functools

import jax

import pallas_kernels
from pallas_kernels.block_index import BlockIndex, TokenBand, mask_to_block_index
from pallas_kernels.blocks import clamp_block, default_sm_scale, num_blocks
from sparge_jax.config import SparseConfig
from sparge_jax.masks import predict_block_index
from sparge_jax.validation import check_block_mask, check_qkv, check_token_band


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def block_sparse_attention(q, k, v, index: BlockIndex, block_q, block_k, sm_scale, backend, interpret,
                           fused_backward: bool | None = None, band: TokenBand | None = None):
    """Attention of q `(batch, seq_q, heads, d)` over the k/v `(batch, seq_k, heads, d)`
    blocks listed in `index` (inside them only the tokens `band` allows, when given);
    returns `(batch, seq_q, heads, d)` in q.dtype. Rows with no kept block are zero.
    Differentiable in q, k, v (not in `index` or `band`); `fused_backward` picks the
    backward's kernels (`KernelConfig.fused_backward`)."""
    out, _ = pallas_kernels.forward(
        q, k, v, index, block_q=block_q, block_k=block_k, sm_scale=sm_scale, backend=backend, interpret=interpret,
        band=band,
    )
    return out


def _fwd(q, k, v, index, block_q, block_k, sm_scale, backend, interpret, fused_backward, band):
    out, lse = pallas_kernels.forward(
        q, k, v, index, block_q=block_q, block_k=block_k, sm_scale=sm_scale, backend=backend, interpret=interpret,
        band=band,
    )
    return out, (q, k, v, index, band, out, lse)


def _bwd(block_q, block_k, sm_scale, backend, interpret, fused_backward, residuals, dout):
    q, k, v, index, band, out, lse = residuals
    dq, dk, dv = pallas_kernels.backward(
        q, k, v, out, lse, dout, index,
        block_q=block_q, block_k=block_k, sm_scale=sm_scale, backend=backend, interpret=interpret, band=band,
        fused=fused_backward,
    )
    return dq, dk, dv, None, None


block_sparse_attention.defvjp(_fwd, _bwd)


def mask_shape(q, k, config: SparseConfig) -> tuple[int, int, int, int]:
    """Expected block-mask shape `(batch, heads, q_blocks, k_blocks)` for these inputs."""
    return (q.shape[0], q.shape[2], num_blocks(q.shape[1], config.kernel.block_q),
            num_blocks(k.shape[1], config.kernel.block_k))


def sparse_attention(q, k, v, *, mask=None, config: SparseConfig = SparseConfig(),
                     band: TokenBand | None = None) -> jax.Array:
    """Block-sparse attention in the `(batch, seq, heads, head_dim)` layout.

    Args:
      q: `(batch, seq_q, heads, head_dim)`, bf16/fp16/fp32.
      k, v: `(batch, seq_k, heads, head_dim)`, same dtype.
      mask: optional bool `(batch, heads, ceil(seq_q/block_q), ceil(seq_k/block_k))`.
        When None it is predicted from q and k by `config.method`, which must then be a
        `Sparge2Method` (other methods: `sparge_jax.methods.method_attention`), under stop_gradient.
      config: `SparseConfig` (method and `KernelConfig`).
      band: optional `pallas_kernels.TokenBand` (int32 `(batch, heads)` width and sink): inside
        the kept blocks, query i sees key j only when |i - j| <= width or j < sink (Sparse
        VideoGen's token-level band). Only the "xla" backend runs it; "auto" falls back to it.
    Returns:
      `(batch, seq_q, heads, head_dim)` in q.dtype. Gradients w.r.t. q, k, v are
      computed over the kept blocks only.
    NaN/inf: a predicted mask always keeps the blocks whose pooled score is not finite, so a
    NaN/inf token reaches the rows that attend to it, as in dense attention. Empty
    dimensions raise ValueError; block sizes above the sequence (rounded up to a power of
    two) are clamped to it (the mask shape is unchanged: one block).
    """
    check_qkv(q, k, v)
    kernel = config.kernel
    kernel = kernel.replace(block_q=clamp_block(kernel.block_q, q.shape[1]), block_k=clamp_block(kernel.block_k, k.shape[1]))
    config = config.replace(kernel=kernel)
    if mask is None:
        index = predict_block_index(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), config)
    else:
        check_block_mask(mask, mask_shape(q, k, config))
        index = mask_to_block_index(jax.lax.stop_gradient(mask))
    if band is not None:
        check_token_band(band, (q.shape[0], q.shape[2]))
        band = jax.lax.stop_gradient(band)
    scale = default_sm_scale(q.shape[-1]) if kernel.sm_scale is None else kernel.sm_scale
    return block_sparse_attention(q, k, v, index, kernel.block_q, kernel.block_k, scale, kernel.backend,
                                  kernel.interpret, kernel.fused_backward, band)
