"""Sparse VideoGen: spatial / temporal heads chosen per head by online profiling.

Tokens come frame-major: token t = f * frame_tokens + s (s the spatial position). A
spatial head keeps a diagonal band in this order (same and adjacent frames). A temporal
head keeps the same band after permuting the tokens position-major (t' = s * frames + f),
so the tokens of one spatial position across all frames are contiguous and its mask is
block-dense. Both heads thus share one block mask; only their token order differs.
The band is |t_q - t_k| <= width tokens; the block mask keeps every block touching it, and
`svg_band` gives the token-level band itself (a `pallas_kernels.TokenBand` for the plan).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.blocks import default_sm_scale, num_blocks


def check_grid(grid, seq: int) -> tuple[int, int, int]:
    """Validate a latent token grid `(frames, height, width)` against a sequence length."""
    if grid is None or len(grid) != 3 or not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid):
        raise ValueError(f"grid must be (frames, height, width) of positive ints; got {grid!r}")
    frames, height, width = (int(g) for g in grid)
    if frames * height * width != seq:
        raise ValueError(f"grid {tuple(grid)} holds {frames * height * width} tokens but the sequence has {seq}")
    return frames, height, width


def position_major_order(grid) -> np.ndarray:
    """int32 `(seq,)`: entry i is the frame-major token placed at position-major slot i."""
    frames, height, width = grid
    return np.arange(frames * height * width, dtype=np.int32).reshape(frames, height * width).T.reshape(-1)


def band_block_mask(seq: int, block_q: int, block_k: int, *, width: int, sink: int) -> np.ndarray:
    """Bool `(q_blocks, k_blocks)`: blocks holding a token pair with |t_q - t_k| <= width,
    or holding keys among the first `sink` tokens."""
    nq, nk = num_blocks(seq, block_q), num_blocks(seq, block_k)
    q_lo = np.arange(nq) * block_q
    q_hi = np.minimum(q_lo + block_q, seq) - 1
    k_lo = np.arange(nk) * block_k
    k_hi = np.minimum(k_lo + block_k, seq) - 1
    gap = np.maximum(0, np.maximum(k_lo[None, :] - q_hi[:, None], q_lo[:, None] - k_hi[None, :]))
    return (gap <= width) | (k_lo[None, :] < sink)


def svg_band(grid, *, band_frames: float, sink: bool, upstream_sparsity: float | None = None) -> tuple[int, int]:
    """(width, sink) in tokens of the band shared by spatial and temporal heads: keys with
    |t_q - t_k| <= width or among the first `sink` slots. `upstream_sparsity`: Sparse VideoGen's
    band (`upstream_band_tokens`, first frame kept) instead of band_frames / sink."""
    frame_tokens = grid[1] * grid[2]
    if upstream_sparsity is not None:
        return upstream_band_tokens(grid, upstream_sparsity), frame_tokens
    return int(round(band_frames * frame_tokens)), frame_tokens if sink else 0


def svg_mask(grid, block_q: int, block_k: int, *, band_frames: float, sink: bool) -> np.ndarray:
    """The block mask shared by spatial and temporal heads (each in its own token order)."""
    width, sink_tokens = svg_band(grid, band_frames=band_frames, sink=sink)
    return band_block_mask(grid[0] * grid[1] * grid[2], block_q, block_k, width=width, sink=sink_tokens)


def upstream_band_tokens(grid, sparsity: float) -> int:
    """Sparse VideoGen's execution band for Wan: `ceil(mul * frame_tokens / 128) * 128` tokens,
    `mul = seq * (1 - sqrt(1 - sparsity)) / frame_tokens` (its `sparsity_to_width`, no text tokens)."""
    frames, height, width = grid
    frame_tokens = height * width
    mul = frames * frame_tokens * (1 - math.sqrt(1 - sparsity)) / frame_tokens
    return math.ceil(mul * frame_tokens / 128) * 128


def upstream_profile_pattern(frame_tokens: int):
    """Sparse VideoGen's profiling mask as a function of (query slots, key slots) -> bool:
    the first frame_tokens keys, or 128-token blocks less than 2 * frame_tokens // 128 apart."""
    def allowed(rows, cols):
        band = jnp.abs(rows[:, None] // 128 - cols[None, :] // 128) < (2 * frame_tokens) // 128
        return band | (cols[None, :] < frame_tokens)
    return allowed


def profile_heads(q, k, v, mask: jax.Array | None, orders: jax.Array, *, block_q: int, block_k: int,
                  rows: jax.Array, sm_scale: float | None = None, pattern=None) -> jax.Array:
    """Mean squared error against dense attention of each candidate token order, on sampled rows.

    q, k, v: `(batch, seq, heads, d)`; mask bool `(q_blocks, k_blocks)` applied in each
    candidate order, or `pattern(query_slots, key_slots) -> bool (n, seq)` instead; orders
    int32 `(candidates, seq)`; rows int32 `(n,)` sampled query tokens (frame-major).
    Returns fp32 `(candidates, batch, heads)`.
    """
    d = q.shape[-1]
    scale = default_sm_scale(d) if sm_scale is None else sm_scale
    s = jnp.einsum("bnhd,bkhd->bhnk", q[:, rows].astype(jnp.float32), k.astype(jnp.float32)) * scale
    vf = v.astype(jnp.float32)
    dense = jnp.einsum("bhnk,bkhd->bhnd", jax.nn.softmax(s, axis=-1), vf)
    errors = []
    for order in orders:
        slot = jnp.argsort(order)
        if pattern is None:
            allowed = mask[slot[rows] // block_q][:, slot // block_k]
        else:
            allowed = pattern(slot[rows], slot)
        out = jnp.einsum("bhnk,bkhd->bhnd", jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1), vf)
        errors.append(jnp.mean((out - dense) ** 2, axis=(2, 3)))
    return jnp.stack(errors)


def svg_plan(q, k, v, grid, *, block_q: int, block_k: int, band_frames: float, sink: bool,
             sampled_rows: int, key: jax.Array, sm_scale: float | None = None, upstream_sparsity: float | None = None,
             max_row: int | None = None, rows: jax.Array | None = None):
    """Block mask and per-head token order of Sparse VideoGen.

    Returns (mask bool `(batch, heads, q_blocks, k_blocks)`, order int32 `(batch, heads, seq)`,
    temporal bool `(batch, heads)`): each head takes the order (frame-major for spatial,
    position-major for temporal heads) whose sampled-row error against dense is smaller.
    With `upstream_sparsity`, Sparse VideoGen's release: heads profiled with its profiling
    mask (`upstream_profile_pattern`) on `min(sampled_rows, seq)` rows drawn with replacement
    from the first `min(max_row, seq)` tokens, and the blocks of its execution band
    `upstream_band_tokens` (plus the first frame) run (the band itself: `svg_band`). rows:
    int32 `(n,)` to use instead of drawing them.
    """
    b, seq, h, _ = q.shape
    grid = check_grid(grid, seq)
    frame_tokens = grid[1] * grid[2]
    orders = jnp.stack([jnp.arange(seq, dtype=jnp.int32), jnp.asarray(position_major_order(grid))])
    width, sink_tokens = svg_band(grid, band_frames=band_frames, sink=sink, upstream_sparsity=upstream_sparsity)
    mask = jnp.asarray(band_block_mask(seq, block_q, block_k, width=width, sink=sink_tokens))
    if upstream_sparsity is None:
        pattern = None
        if rows is None:
            rows = jax.random.choice(key, seq, (min(sampled_rows, seq),), replace=False)
    else:
        pattern = upstream_profile_pattern(frame_tokens)
        if rows is None:
            rows = jax.random.randint(key, (min(sampled_rows, seq),), 0, min(max_row, seq))
    errors = profile_heads(q, k, v, mask, orders, block_q=block_q, block_k=block_k, rows=rows, sm_scale=sm_scale,
                           pattern=pattern)
    temporal = errors[1] < errors[0]
    order = jnp.where(temporal[..., None], orders[1], orders[0])
    return jnp.broadcast_to(mask, (b, h) + mask.shape), order, temporal
