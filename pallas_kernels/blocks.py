"""Block arithmetic shared by the oracle, the kernels and the masks: block counts, default
block sizes and softmax scale, and the zero-padded view of a sequence as blocks.

Layout is `(batch, seq, heads, head_dim)`; a sequence of `seq` tokens is covered by
`num_blocks(seq, block)` blocks, the last one possibly partial.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64


def num_blocks(seq_len: int, block: int) -> int:
    """Number of blocks of size `block` covering `seq_len` tokens (the tail block may be partial)."""
    return -(-seq_len // block)


def clamp_block(block: int, seq_len: int) -> int:
    """`block` clamped to the sequence rounded up to a power of two: a block size far above
    the sequence (one block either way) would otherwise pad it to `block` tokens. Keeps a
    power-of-two block a power of two and leaves `num_blocks(seq_len, block)` unchanged."""
    return min(block, 1 << max(seq_len - 1, 0).bit_length())


def default_sm_scale(head_dim: int) -> float:
    """The usual softmax scale 1/sqrt(head_dim)."""
    return head_dim ** -0.5


def to_blocks(x: jax.Array, block: int) -> jax.Array:
    """`(batch, seq, heads, d)` -> `(batch, num_blocks(seq, block), block, heads, d)` in x's
    dtype, the tail zero-padded (a pad and a free reshape, which XLA fuses into a consumer)."""
    b, s, h, d = x.shape
    n = num_blocks(s, block)
    return jnp.pad(x, ((0, 0), (0, n * block - s), (0, 0), (0, 0))).reshape(b, n, block, h, d)
