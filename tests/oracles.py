"""Independent NumPy oracles (float64 where it matters) and input builders shared by the tests."""

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


def numpy_rule_mask(scores, k=None, p=None):
    """NumPy model of Top-k / Top-p / their union: a prefix of the stable descending order.

    Top-k keeps ceil(k * k_blocks) entries (the count taken in float32 with the same
    1e-5 slack as the library); Top-p keeps as many entries as have their mass before
    them (float64 prefix sums of the sorted row) below p; the union keeps the longer
    prefix, and at least one entry. Ties go to the lower index.
    """
    s = np.asarray(scores, np.float32)
    b, h, nq, nk = s.shape
    ks = np.broadcast_to(np.asarray(k if k is not None else 0.0, np.float32), (h,))
    ps = np.broadcast_to(np.asarray(p if p is not None else 0.0, np.float64), (h,))
    out = np.zeros(s.shape, bool)
    for bi, hi, i in np.ndindex(b, h, nq):
        row = s[bi, hi, i]
        order = np.argsort(-row, kind="stable")
        n = 1
        if k is not None:
            n = max(n, int(np.clip(np.ceil(ks[hi] * np.float32(nk) - np.float32(1e-5)), 1, nk)))
        if p is not None:
            sorted_row = row[order].astype(np.float64)
            mass_before = np.cumsum(sorted_row) - sorted_row
            n = max(n, int((mass_before < ps[hi]).sum()))
        out[bi, hi, i, order[:n]] = True
    return out


def near_p_boundary(scores, p, tol=1e-5) -> bool:
    """Whether some row's sorted prefix mass lies within `tol` of p (float32 vs float64 sums may disagree there)."""
    s = -np.sort(-np.asarray(scores, np.float64), axis=-1)
    mass_before = np.cumsum(s, axis=-1) - s
    return bool((np.abs(mass_before - np.asarray(p, np.float64).reshape(1, -1, 1, 1)) < tol).any())


def check_lists(mask, indices, counts):
    """Against a plain-Python model: ascending kept indices, then the last one repeated."""
    for pos in np.ndindex(mask.shape[:-1]):
        kept = np.flatnonzero(mask[pos])
        assert counts[pos] == len(kept)
        pad = kept[-1] if len(kept) else 0
        expected = np.concatenate([kept, np.full(mask.shape[-1] - len(kept), pad)])
        np.testing.assert_array_equal(indices[pos], expected)


def repeated_blocks(rng, seq, block, repeats, heads=2, d=16):
    """Random `(1, seq, heads, d)` with block `dst` a copy of block `src` for each (dst, src)."""
    x = rng.standard_normal((1, seq, heads, d)).astype(np.float32)
    for dst, src in repeats:
        x[:, dst * block:(dst + 1) * block] = x[:, src * block:(src + 1) * block]
    return x
