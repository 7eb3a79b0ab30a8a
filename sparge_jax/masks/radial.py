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


def radial_token_rows(rows: np.ndarray, grid, *, decay: float, dense_distance: int, min_window: int,
                      sink_first_frame: bool) -> np.ndarray:
    """Bool `(len(rows), seq)` token visibility of the query tokens `rows` (frame-major indices)."""
    frames, height, width = grid
    frame_tokens = height * width
    keys = np.arange(frames * frame_tokens)
    fq, sq = np.divmod(np.asarray(rows)[:, None], frame_tokens)
    fk, sk = np.divmod(keys[None, :], frame_tokens)
    window, kept = radial_window(np.abs(fq - fk), frame_tokens, decay=decay,
                                 dense_distance=dense_distance, min_window=min_window)
    visible = kept & (np.abs(sq - sk) <= window)
    if sink_first_frame:
        visible |= fk == 0
    return visible


@functools.lru_cache(maxsize=16)
def radial_mask(grid: tuple[int, int, int], block_q: int, block_k: int, *, decay: float = 1.0,
                dense_distance: int = 1, min_window: int | None = None, sink_first_frame: bool = True) -> np.ndarray:
    """Static bool `(q_blocks, k_blocks)` block mask (cached; built one q block at a time)."""
    frames, height, width = grid
    seq = frames * height * width
    min_window = block_k if min_window is None else min_window
    nq, nk = num_blocks(seq, block_q), num_blocks(seq, block_k)
    out = np.zeros((nq, nk), bool)
    pad = nk * block_k - seq
    for i in range(nq):
        rows = np.arange(i * block_q, min((i + 1) * block_q, seq))
        visible = radial_token_rows(rows, grid, decay=decay, dense_distance=dense_distance,
                                    min_window=min_window, sink_first_frame=sink_first_frame).any(axis=0)
        out[i] = np.pad(visible, (0, pad)).reshape(nk, block_k).any(axis=1)
    out.setflags(write=False)
    return out
