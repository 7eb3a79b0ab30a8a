"""Independent float64 NumPy oracles shared by the tests."""

import numpy as np


def numpy_block_attention(q, k, v, block_mask, block_q, block_k, sm_scale=None):
    """float64 softmax attention restricted to kept blocks; rows with nothing kept are 0.

    q `(batch, seq_q, heads, d)`, k/v `(batch, seq_k, heads, d)`, block_mask
    `(batch, heads, q_blocks, k_blocks)`. Returns (out `(batch, seq_q, heads, d)`, lse `(batch, heads, seq_q)`).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    block_mask = np.asarray(block_mask, bool)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    out = np.zeros((b, sq, h, v.shape[-1]))
    lse = np.full((b, h, sq), -np.inf)
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ k[bi, :, hi].T * scale
            allowed = block_mask[bi, hi][np.arange(sq)[:, None] // block_q, np.arange(sk)[None, :] // block_k]
            row = np.where(allowed, s, -np.inf)
            kept = allowed.any(axis=1)
            m = np.where(kept, row.max(axis=1), 0.0)
            p = np.exp(row - m[:, None])
            l = p.sum(axis=1)
            out[bi, :, hi] = (p @ v[bi, :, hi]) / np.where(kept, l, 1.0)[:, None]
            lse[bi, hi] = np.where(kept, m + np.log(np.where(kept, l, 1.0)), -np.inf)
    return out, lse


def rel_l2(a, b) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
