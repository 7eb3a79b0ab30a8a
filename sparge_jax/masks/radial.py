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

from pallas_kernels.reference import num_blocks


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
