"""Radial Attention: a static spatio-temporal mask whose density decays with frame distance.

Query token (frame f_q, spatial position s_q) sees key (f_k, s_k) when, with d = |f_q - f_k|:
  d <= dense_distance: always;
  otherwise: |s_q - s_k| <= window(d), window(d) = decay * 2**ceil(log2(frame_tokens)) / 2**floor(log2 d),
  so the window halves each time d doubles; once window(d) < min_window the window is
  min_window and only distances with d % (min_window / window(d)) == 0 are kept, which
  keeps halving the density. With sink_first_frame, frame 0 is always seen.
A block pair is kept when it holds at least one visible token pair.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from pallas_kernels.blocks import num_blocks


def radial_window(distance: np.ndarray, frame_tokens: int, *, decay: float, dense_distance: int,
                  min_window: int) -> tuple[np.ndarray, np.ndarray]:
    """Spatial window and whether the frame pair is kept, for integer frame distances (any shape)."""
    d = np.asarray(distance)
    full = 2.0 ** math.ceil(math.log2(frame_tokens)) * decay
    window = full / 2.0 ** np.floor(np.log2(np.maximum(d, 1)))
    stride = np.where(window < min_window, np.floor(min_window / np.maximum(window, 1e-9)), 1).astype(np.int64)
    window = np.where(d <= dense_distance, float(frame_tokens), np.maximum(window, min_window))
    kept = (d <= dense_distance) | (d % np.maximum(stride, 1) == 0)
    return window, kept


def _frame_segments(seq: int, block: int, frame_tokens: int):
    """Per block, the pieces it holds of each frame: frame, first and last spatial position, valid.

    Arrays `(n_blocks, max_pieces)`; a block of `block` tokens touches at most
    (block - 1) // frame_tokens + 2 frames.
    """
    n = num_blocks(seq, block)
    pieces = (block - 1) // frame_tokens + 2
    start = np.arange(n)[:, None] * block
    end = np.minimum(start + block, seq)
    frame = start // frame_tokens + np.arange(pieces)[None, :]
    lo = np.maximum(start, frame * frame_tokens) - frame * frame_tokens
    hi = np.minimum(end, (frame + 1) * frame_tokens) - 1 - frame * frame_tokens
    return frame, lo, hi, (frame * frame_tokens < end) & (lo <= hi)


@functools.lru_cache(maxsize=16)
def radial_mask(grid: tuple[int, int, int], block_q: int, block_k: int, *, decay: float = 1.0,
                dense_distance: int = 1, min_window: int | None = None, sink_first_frame: bool = True) -> np.ndarray:
    """Static bool `(q_blocks, k_blocks)` block mask (cached).

    Exact "any visible token pair" per block pair, computed on the frame pieces of each
    block: two pieces hold a visible pair when their frame pair is kept and their spatial
    ranges are within the window (or the key piece is in frame 0 with the sink on).
    """
    frames, height, width = grid
    frame_tokens = height * width
    seq = frames * frame_tokens
    min_window = block_k if min_window is None else min_window
    fq, aq, bq, vq = (x[:, :, None, None] for x in _frame_segments(seq, block_q, frame_tokens))
    fk, ak, bk, vk = (x[None, None] for x in _frame_segments(seq, block_k, frame_tokens))
    window, kept = radial_window(np.abs(fq - fk), frame_tokens, decay=decay, dense_distance=dense_distance,
                                 min_window=min_window)
    gap = np.maximum(0, np.maximum(ak - bq, aq - bk))
    visible = kept & (gap <= window)
    if sink_first_frame:
        visible |= fk == 0
    out = np.any(visible & vq & vk, axis=(1, 3))
    out.setflags(write=False)
    return out


def _upstream_window(distance: int, frame_tokens: int, decay: float, block_size: int) -> tuple[float, bool]:
    """Radial's release (Wan): spatial window of one frame distance and whether the distance is kept.

    Window: the whole frame at distance <= 1, else max(block_size, decay * 2**bit_length(frame_tokens)
    / 2**bit_length(distance)). Kept: the undecayed width 2**bit_length(frame_tokens) /
    2**bit_length(distance) is >= 128, or the distance is a multiple of int(128 / that width)
    (128 is hard-coded there, whatever the block size).
    """
    width = 2.0 ** frame_tokens.bit_length() / 2.0 ** distance.bit_length()
    kept = width >= 128 or distance % int(128 / width) == 0
    if distance <= 1:
        return float(frame_tokens), kept
    return max(width * decay, float(block_size)), kept


def _upstream_frame_pair_blocks(frame_tokens: int, block: int, row_offset: int, col_offset: int,
                                window: float) -> np.ndarray:
    """Radial's `shrinkMaskStrict` of one frame pair's band `|row - col| <= window`, analytically.

    The frame pair's tokens sit at `row_offset` / `col_offset` (< block) inside a grid of
    n = ceil(frame_tokens / block) blocks each way (tokens past n * block are cut, as there).
    Per block pair, a column is dense when more than a third of the block's rows see it;
    the block is kept when more than 60 % of the columns it sees at all are dense.
    Returns bool `(n, n)`.
    """
    n = -(-frame_tokens // block)
    limit = np.floor(window)
    col = np.arange(n * block) - col_offset  # spatial position of each padded column
    row_lo = np.arange(n)[:, None] * block - row_offset  # first spatial row of each block row
    lo = np.maximum(np.maximum(col - limit, row_lo), 0)
    hi = np.minimum(np.minimum(col + limit, row_lo + block - 1), frame_tokens - 1)
    count = np.where((col >= 0) & (col < frame_tokens), np.maximum(hi - lo + 1, 0), 0).reshape(n, n, block)
    seen = np.sum(count > 0, axis=-1)
    dense = np.sum(3 * count > block, axis=-1)
    return 5 * dense > 3 * seen


def _resize_square_blocks(mask: np.ndarray, block: int, block_q: int, block_k: int, seq: int) -> np.ndarray:
    """A `(n, n)` mask of `block`-token blocks -> `(q_blocks, k_blocks)` of the config's block sizes.

    A finer block inherits its coarse block's label (Radial repeats rows or columns for its
    kernels); a coarser block is kept when any coarse block inside it is.
    """
    out = mask
    for axis, size in ((0, block_q), (1, block_k)):
        n_out = num_blocks(seq, size)
        if block % size == 0:
            out = np.repeat(out, block // size, axis=axis)
        elif size % block == 0:
            ratio = size // block
            pad = [(0, 0), (0, 0)]
            pad[axis] = (0, n_out * ratio - out.shape[axis])
            out = np.pad(out, pad)
            out = out.reshape((n_out, ratio, -1) if axis == 0 else (out.shape[0], n_out, ratio)).any(axis=axis + 1)
        else:
            raise ValueError(f"block sizes must divide or be multiples of RadialMethod.block_size={block}; "
                             f"got {size}")
        out = np.take(out, np.arange(n_out), axis=axis)
    return out


@functools.lru_cache(maxsize=16)
def radial_mask_upstream(grid: tuple[int, int, int], block_q: int, block_k: int, *, decay: float = 1.0,
                         block_size: int = 128, sink_first_frame: bool = True) -> np.ndarray:
    """Static bool `(q_blocks, k_blocks)` mask of Radial Attention's release for Wan (cached).

    The `block_size` square mask of `gen_log_mask_shrinked(..., model_type="wan")`: per frame
    pair, the band of `_upstream_window` (frame 0 whole when `sink_first_frame`), cut into
    blocks at the frame's offsets and thresholded by `_upstream_frame_pair_blocks`, OR-ed
    over frame pairs; then resized to block_q x block_k. Radial's release sizes its mask
    seq // block_size, so a ragged last block has no label there: here its row and column
    are kept whole.
    """
    frames, height, width = grid
    frame_tokens = height * width
    seq = frames * frame_tokens
    n = num_blocks(seq, block_size)
    span = -(-frame_tokens // block_size)
    out = np.zeros((n + span, n + span), bool)
    cache = {}
    for i in range(frames):
        for j in range(frames):
            if j == 0 and sink_first_frame:
                window, kept = float("inf"), True
            else:
                window, kept = _upstream_window(abs(i - j), frame_tokens, decay, block_size)
            if not kept:
                continue
            r0, c0 = i * frame_tokens, j * frame_tokens
            key = (window, r0 % block_size, c0 % block_size)
            if key not in cache:
                cache[key] = _upstream_frame_pair_blocks(frame_tokens, block_size, key[1], key[2],
                                                         min(window, frame_tokens))
            rb, cb = r0 // block_size, c0 // block_size
            out[rb:rb + span, cb:cb + span] |= cache[key]
    out = out[:n, :n]
    out[seq // block_size:] = True
    out[:, seq // block_size:] = True
    out = _resize_square_blocks(out, block_size, block_q, block_k, seq)
    out.setflags(write=False)
    return out
