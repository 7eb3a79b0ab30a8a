"""Wan2.1's 3D rotary position embedding over a (frames, height, width) token grid."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to the frame, height and width axes.

    Height and width get `2 * (head_dim // 6)` each and frames the rest
    (head_dim 128 -> (44, 42, 42)); each is rotated as `dim // 2` complex pairs.
    """
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6 for 3D RoPE; got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


@functools.lru_cache(maxsize=32)
def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """Rotation angles float64 `(frames*height*width, head_dim // 2)` of a row-major token grid.

    Each axis of `dim` channels uses frequencies `theta ** (-2j / dim)`, j < dim/2, times the
    token's position on that axis; the three blocks are concatenated (frame, height, width).
    """
    blocks = []
    for axis, dim in enumerate(rope_axis_dims(head_dim)):
        freqs = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.arange(grid[axis], dtype=np.float64)[:, None] * freqs
        shape = [1, 1, 1, dim // 2]
        shape[axis] = grid[axis]
        blocks.append(np.broadcast_to(angles.reshape(shape), (*grid, dim // 2)))
    return np.concatenate(blocks, axis=-1).reshape(-1, head_dim // 2)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of x `(batch, seq, heads, head_dim)` by
    angles given as cos/sin float32 `(seq, head_dim // 2)`. Computed in float32, returned in x.dtype."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def grid_rope(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0):
    """A `rope` hook `(q, k) -> (q, k)` for `SparseAttention` over a token grid
    `(frames, height, width)`; q, k `(batch, frames*height*width, heads, head_dim)`."""
    angles = rope_angles(tuple(int(n) for n in grid), head_dim, float(theta))
    cos = jnp.asarray(np.cos(angles), jnp.float32)
    sin = jnp.asarray(np.sin(angles), jnp.float32)

    def rope(q, k):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    return rope
