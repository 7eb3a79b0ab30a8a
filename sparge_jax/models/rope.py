"""Wan2.1's 3D rotary position embedding over a (frames, height, width) token grid, and a fixed
additive sin-cos embedding of the same grid (`sincos_embedding`, `WanConfig.absolute_positions`)."""

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
def axis_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, ...]:
    """Rotation angles float64 of each axis (frames, height, width): `(grid[axis], dim // 2)` for
    the axis's `dim` channels (`rope_axis_dims`), frequencies `theta ** (-2j / dim)`, j < dim/2,
    times the position on that axis."""
    return tuple(np.arange(n, dtype=np.float64)[:, None] * theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
                 for n, dim in zip(grid, rope_axis_dims(head_dim)))


def broadcast_axes(xp, tables, grid: tuple[int, int, int]):
    """Per-axis tables `(grid[axis], n_axis)` (NumPy or jnp, `xp` the module) -> the row-major
    token grid's `(frames*height*width, sum of n_axis)`: each token gets its frame's, row's and
    column's entries, concatenated."""
    blocks = []
    for axis, table in enumerate(tables):
        shape = [1, 1, 1, table.shape[-1]]
        shape[axis] = grid[axis]
        blocks.append(xp.broadcast_to(table.reshape(shape), (*grid, table.shape[-1])))
    return xp.concatenate(blocks, axis=-1).reshape(-1, sum(table.shape[-1] for table in tables))


def axis_cos_sin(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0
                 ) -> tuple[list[jax.Array], list[jax.Array]]:
    """(cos, sin): per axis (frames, height, width) float32 `(grid[axis], dim // 2)` tables of its
    `axis_angles`, what a program holds before `broadcast_axes` spreads them over the tokens."""
    angles = axis_angles(tuple(int(n) for n in grid), head_dim, float(theta))
    return ([jnp.asarray(np.cos(a), jnp.float32) for a in angles],
            [jnp.asarray(np.sin(a), jnp.float32) for a in angles])


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """Rotation angles float64 `(frames*height*width, head_dim // 2)` of a row-major token grid:
    the `axis_angles` of its frame, height and width positions, concatenated."""
    grid = tuple(int(n) for n in grid)
    return broadcast_axes(np, axis_angles(grid, head_dim, float(theta)), grid)


def sincos_embedding(grid: tuple[int, int, int], dim: int, theta: float = 10000.0) -> jax.Array:
    """Fixed absolute position embedding float32 `(frames*height*width, dim)` of a row-major token
    grid, DiT's 2D sin-cos embedding (Peebles & Xie 2023) in 3D: the sines of each token's
    `rope_angles` for `dim` channels, then their cosines (a token's frame, row and column each
    with its `rope_axis_dims` share of the frequencies). Like `grid_rope`, the program holds the
    per-axis tables and broadcasts them to the tokens inside it."""
    grid = tuple(int(n) for n in grid)
    cos, sin = axis_cos_sin(grid, dim, theta)
    return jnp.concatenate([broadcast_axes(jnp, sin, grid), broadcast_axes(jnp, cos, grid)], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of x `(batch, seq, heads, head_dim)` by
    angles a_i given as cos/sin float32 `(seq, head_dim // 2)`, to
    (x[2i] cos a_i - x[2i+1] sin a_i, x[2i] sin a_i + x[2i+1] cos a_i). Computed in float32,
    returned in x.dtype.

    Written as `pairs * cos + swapped * (-sin, +sin)`, `swapped` each pair's two channels
    exchanged (a reverse of a size-2 axis): elementwise ops and one reverse, with no slice, stack
    or concatenate of the pairs, in the loop XLA fuses with the qk-norm that produces x."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos = cos[None, :, None, :, None]
    signed_sin = sin[None, :, None, :, None] * jnp.array([-1.0, 1.0], jnp.float32)
    return (pairs * cos + pairs[..., ::-1] * signed_sin).reshape(x.shape).astype(x.dtype)


def grid_rope(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0):
    """A `rope` hook `(q, k) -> (q, k)` for `SparseAttention` over a token grid
    `(frames, height, width)`; q, k `(batch, frames*height*width, heads, head_dim)`.

    The program holds only the per-axis cos/sin tables (float32, e.g. 5.7k values at 720p) and
    broadcasts them to the tokens inside it, not the `(tokens, head_dim // 2)` tables (38.7 MB of
    constants for Wan's 720p grid); the values are the same."""
    grid = tuple(int(n) for n in grid)
    cos, sin = axis_cos_sin(grid, head_dim, theta)

    def rope(q, k):
        full_cos, full_sin = broadcast_axes(jnp, cos, grid), broadcast_axes(jnp, sin, grid)
        return apply_rope(q, full_cos, full_sin), apply_rope(k, full_cos, full_sin)

    return rope
