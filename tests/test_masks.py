"""Mask rules against NumPy models, and their properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from oracles import near_p_boundary, numpy_rule_mask, repeated_blocks
from pallas_kernels import num_blocks
from sparge_jax import SparseConfig, predict_mask, sparsity
from sparge_jax.masks import (
    block_self_similarity,
    diagonal_blocks,
    hybrid_mask,
    pool_blocks,
    pooled_scores,
    topk_mask,
    topp_mask,
)


def random_scores(rng, b=2, h=3, nq=4, nk=9, temperature=1.0):
    logits = rng.standard_normal((b, h, nq, nk)) * temperature
    return jnp.asarray(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), jnp.float32)


def test_pool_blocks_averages_tail_over_real_tokens(rng):
    x = rng.standard_normal((2, 70, 3, 5)).astype(np.float32)
    pooled = np.asarray(pool_blocks(jnp.asarray(x), 32))
    assert pooled.shape == (2, 3, 3, 5)
    for j, (lo, hi) in enumerate([(0, 32), (32, 64), (64, 70)]):
        np.testing.assert_allclose(pooled[:, :, j], x[:, lo:hi].mean(axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seq", [64, 192, 200, 31, 1])
def test_pool_blocks_matches_float64_means_whole_ragged_and_short(rng, seq):
    """Whole blocks only, whole blocks + a ragged tail, a tail only: each block's mean of the bf16
    tokens (a float64 oracle), the tail over its real tokens."""
    x = jnp.asarray(rng.standard_normal((2, seq, 3, 8)), jnp.bfloat16)
    xb, block = np.asarray(x, np.float64), 64
    want = np.stack([xb[:, i:i + block].mean(1) for i in range(0, seq, block)], 2)
    got = jax.jit(pool_blocks, static_argnums=1)(x, block)
    assert got.dtype == jnp.float32 and got.shape == (2, 3, num_blocks(seq, block), 8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_pooled_scores_match_numpy(rng):
    q = rng.standard_normal((1, 100, 2, 8)).astype(np.float32)
    k = rng.standard_normal((1, 90, 2, 8)).astype(np.float32)
    got = np.asarray(pooled_scores(jnp.asarray(q), jnp.asarray(k), block_q=32, block_k=16, sm_scale=0.5))
    pq = np.stack([q[:, i:i + 32].mean(1) for i in range(0, 100, 32)], 1)
    pk = np.stack([k[:, i:i + 16].mean(1) for i in range(0, 90, 16)], 1)
    logits = np.einsum("bihd,bjhd->bhij", pq, pk) * 0.5
    want = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got, want / want.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_topk_keeps_the_ceil_k_largest(rng):
    scores = random_scores(rng, nk=10)
    mask = np.asarray(topk_mask(scores, 0.25))
    assert (mask.sum(-1) == 3).all()
    s = np.asarray(scores)
    third = np.sort(s, -1)[..., -3]
    np.testing.assert_array_equal(mask, s >= third[..., None])


def test_topk_fraction_is_not_rounded_up_by_float_error(rng):
    assert (np.asarray(topk_mask(random_scores(rng, nk=50), 0.1)).sum(-1) == 5).all()


def test_topp_is_the_smallest_prefix_reaching_p(rng):
    scores = np.asarray(random_scores(rng, nk=12, temperature=2.0))
    mask = np.asarray(topp_mask(jnp.asarray(scores), 0.7))
    for pos in np.ndindex(scores.shape[:-1]):
        row = scores[pos]
        order = np.argsort(-row, kind="stable")
        n = np.searchsorted(np.cumsum(row[order]), 0.7) + 1
        want = np.zeros_like(mask[pos])
        want[order[:n]] = True
        np.testing.assert_array_equal(mask[pos], want)


def test_per_head_parameters(rng):
    scores = random_scores(rng, h=3, nk=10)
    mask = np.asarray(topk_mask(scores, jnp.asarray([0.1, 0.5, 1.0])))
    assert (mask[:, 0].sum(-1) == 1).all() and (mask[:, 1].sum(-1) == 5).all() and mask[:, 2].all()
    per_head_p = np.asarray(topp_mask(scores, (0.3, 0.6, 0.9)))
    for head, p in enumerate((0.3, 0.6, 0.9)):
        np.testing.assert_array_equal(per_head_p[:, head], np.asarray(topp_mask(scores, p))[:, head])


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    temperature=st.sampled_from([0.1, 1.0, 4.0]),
    k1=st.floats(0.01, 1.0), k2=st.floats(0.01, 1.0),
    p1=st.floats(0.01, 1.0), p2=st.floats(0.01, 1.0),
)
def test_mask_properties(seed, temperature, k1, k2, p1, p2):
    scores = random_scores(np.random.default_rng(seed), b=1, h=2, nq=5, nk=13, temperature=temperature)
    (k_lo, k_hi), (p_lo, p_hi) = sorted((k1, k2)), sorted((p1, p2))
    tk, tp = np.asarray(topk_mask(scores, k_lo)), np.asarray(topp_mask(scores, p_lo))
    hyb = np.asarray(hybrid_mask(scores, k_lo, p_lo))
    assert (hyb >= tk).all() and (hyb >= tp).all() and (hyb == (tk | tp)).all()
    kept_mass = np.where(tp, np.asarray(scores), 0.0).sum(-1)
    assert (kept_mass >= p_lo - 1e-5).all()
    for m in (tk, tp, hyb):
        assert m.any(-1).all()
    assert (np.asarray(topk_mask(scores, k_hi)) >= tk).all()
    assert (np.asarray(topp_mask(scores, p_hi)) >= tp).all()
    s_lo = float(sparsity(jnp.asarray(hyb)))
    s_hi = float(sparsity(hybrid_mask(scores, k_hi, p_hi)))
    assert s_hi <= s_lo


def test_self_similarity_matches_numpy(rng):
    x = rng.standard_normal((1, 50, 2, 6)).astype(np.float32)
    x[:, :16] = rng.standard_normal((1, 1, 2, 6)) + 0.05 * x[:, :16]
    got = np.asarray(block_self_similarity(jnp.asarray(x), 16))
    for j, (lo, hi) in enumerate([(0, 16), (16, 32), (32, 48), (48, 50)]):
        blk = x[0, lo:hi]
        mean = blk.mean(0)
        cos = (blk * mean).sum(-1) / (np.linalg.norm(blk, axis=-1) * np.linalg.norm(mean, axis=-1))
        np.testing.assert_allclose(got[0, :, j], cos.mean(0), rtol=1e-4, atol=1e-5)
    assert (got[0, :, 0] > 0.95).all()


def test_similarity_guard_keeps_rough_rows_and_columns(rng):
    q = rng.standard_normal((1, 64, 1, 8)).astype(np.float32)
    q[:, :32] = rng.standard_normal((1, 1, 1, 8)) + 0.01 * q[:, :32]
    k = rng.standard_normal((1, 64, 1, 8)).astype(np.float32)
    k[:, 16:] = rng.standard_normal((1, 1, 1, 8)) + 0.01 * k[:, 16:]
    cfg = SparseConfig(rule="topk", topk=0.25, block_q=32, block_k=16, sim_threshold=0.5)
    mask = np.asarray(predict_mask(jnp.asarray(q), jnp.asarray(k), cfg))
    assert mask[0, 0, 1].all(), "rough q block 1 must keep its whole row"
    assert mask[0, 0, :, 0].all(), "rough k block 0 must be kept by every row"
    base = np.asarray(topk_mask(pooled_scores(jnp.asarray(q), jnp.asarray(k), block_q=32, block_k=16), 0.25))
    expected = base.copy()
    expected[0, 0, 1, :] = True
    expected[0, 0, :, 0] = True
    np.testing.assert_array_equal(mask, expected)


def test_keep_first_and_diagonal(rng):
    q, k = (jnp.asarray(rng.standard_normal((1, 200, 2, 8)), jnp.float32) for _ in range(2))
    cfg = SparseConfig(rule="topk", topk=0.01, block_q=64, block_k=32, keep_first=True, keep_diagonal=True)
    mask = np.asarray(predict_mask(q, k, cfg))
    assert mask[..., 0].all()
    diag = diagonal_blocks(200, 64, 32)
    assert diag.shape == (4, 7) and diag[3].tolist() == [False] * 6 + [True]
    assert diag[0].tolist() == [True, True] + [False] * 5
    assert (mask >= diag).all()


def test_predict_mask_jits_and_sparsity_counts_real_blocks(rng):
    q = jnp.asarray(rng.standard_normal((2, 300, 2, 16)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 300, 2, 16)), jnp.bfloat16)
    cfg = SparseConfig(block_q=128, block_k=64, topk=0.2, topp=0.5)
    mask = jax.jit(predict_mask, static_argnums=2)(q, k, cfg)
    assert mask.shape == (2, 2, num_blocks(300, 128), num_blocks(300, 64)) and mask.dtype == jnp.bool_
    padded = jnp.pad(mask, ((0, 0), (0, 0), (0, 2), (0, 3)))
    want = 1.0 - float(np.asarray(mask).mean())
    assert abs(float(sparsity(padded, seq_q=300, seq_k=300, block_q=128, block_k=64)) - want) < 1e-6
    assert abs(float(sparsity(mask)) - want) < 1e-6


@pytest.mark.parametrize("field,value", [("topk", 0.0), ("topk", 1.5), ("topp", -0.1), ("topp", (0.5, 2.0))])
def test_bad_fractions_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SparseConfig(**{field: value})


def test_bad_per_head_shape_raises(rng):
    with pytest.raises(ValueError, match=r"topk.*\(heads,\) = \(3,\)"):
        topk_mask(random_scores(rng, h=3), jnp.asarray([0.1, 0.2]))
    with pytest.raises(ValueError, match="topp"):
        topp_mask(random_scores(rng, h=2), [0.5, 0.0])


# --- One-sort rules: ties, ragged lengths, structure ------------------------------------


def tied_scores(rng, b=1, h=3, nq=6, nk=11, levels=3):
    """Rows of few distinct values (many exact ties), normalised to sum to 1."""
    counts = rng.integers(0, levels, (b, h, nq, nk)).astype(np.float32)
    counts[..., 0] += counts.sum(-1) == 0  # no all-zero row
    counts[:, :, 0] = 1.0  # one row of exactly equal scores per head
    return jnp.asarray(counts / counts.sum(-1, keepdims=True), jnp.float32)


@pytest.mark.parametrize("levels", [2, 3, 5])
def test_tied_scores_match_numpy_model(rng, levels):
    scores = tied_scores(rng, levels=levels)
    assert (np.asarray(topk_mask(scores, 0.2))[:, :, 0, :3] == [True, True, True]).all()  # equal row: lowest indices
    for k in (0.05, 0.2, 0.5, 0.99, (0.1, 0.3, 1.0)):
        np.testing.assert_array_equal(np.asarray(topk_mask(scores, k)), numpy_rule_mask(scores, k=k), err_msg=f"k={k}")
    for p in (0.051, 0.317, 0.623, 0.853, (0.213, 0.507, 0.931)):
        if near_p_boundary(scores, p if isinstance(p, tuple) else (p,) * 3):
            continue
        np.testing.assert_array_equal(np.asarray(topp_mask(scores, p)), numpy_rule_mask(scores, p=p), err_msg=f"p={p}")
        for k in (0.05, 0.3, (0.1, 0.3, 1.0)):
            np.testing.assert_array_equal(np.asarray(hybrid_mask(scores, k, p)), numpy_rule_mask(scores, k=k, p=p),
                                          err_msg=f"k={k} p={p}")


def test_tie_at_the_cut_keeps_lower_indices():
    row = np.asarray([0.1, 0.2, 0.3, 0.2, 0.2], np.float32)
    scores = jnp.asarray(np.broadcast_to(row, (1, 1, 2, 5)))
    # 2 of 5: the 0.3, then the first of the three 0.2s.
    np.testing.assert_array_equal(np.asarray(topk_mask(scores, 0.4))[0, 0, 0], [False, True, True, False, False])
    # mass before: 0, 0.3, 0.5, 0.7, 0.9 in order (2, 1, 3, 4, 0): p = 0.6 keeps 3.
    np.testing.assert_array_equal(np.asarray(topp_mask(scores, 0.6))[0, 0, 0], [False, True, True, True, False])
    np.testing.assert_array_equal(np.asarray(hybrid_mask(scores, 0.8, 0.1))[0, 0, 0], [False, True, True, True, True])


@pytest.mark.parametrize("rule", ["topk", "topp", "hybrid"])
def test_identical_blocks_tie_in_predict_mask(rng, rule):
    q = repeated_blocks(rng, 8 * 32, 32, [(1, 0), (5, 0), (6, 3)])
    k = repeated_blocks(rng, 16 * 16, 16, [(2, 0), (5, 0), (9, 0), (7, 3), (12, 3), (13, 4)])
    q, k = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    scores = np.asarray(pooled_scores(q, k, block_q=32, block_k=16))
    # The test is about exact ties: identical k blocks give equal scores in a row,
    # identical q blocks equal rows.
    assert (scores[..., 2] == scores[..., 0]).all() and (scores[..., 12] == scores[..., 3]).all()
    assert (scores[:, :, 5] == scores[:, :, 0]).all()
    for topk, topp in [(0.1, 0.3), (0.2, 0.6), (0.35, 0.9)]:
        cfg = SparseConfig(rule=rule, topk=topk, topp=topp, block_q=32, block_k=16)
        if rule != "topk" and near_p_boundary(scores, (topp,) * 2):
            continue
        mask = np.asarray(jax.jit(predict_mask, static_argnums=2)(q, k, cfg))
        want = numpy_rule_mask(scores, k=topk if rule != "topp" else None, p=topp if rule != "topk" else None)
        np.testing.assert_array_equal(mask, want, err_msg=f"{rule} k={topk} p={topp}")


@pytest.mark.parametrize("seq_q,seq_k", [(300, 300), (97, 1000), (1025, 63)])
def test_ragged_lengths_match_numpy(rng, seq_q, seq_k):
    q = rng.standard_normal((2, seq_q, 2, 16)).astype(np.float32)
    k = rng.standard_normal((2, seq_k, 2, 16)).astype(np.float32)
    for x, block in ((q, 128), (k, 64)):
        xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
        want = np.stack([xb[:, i:i + block].mean(1) for i in range(0, x.shape[1], block)], 1).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(pool_blocks(jnp.asarray(x, jnp.bfloat16), block), want, rtol=1e-5, atol=1e-6)
    qj, kj = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    scores = np.asarray(pooled_scores(qj, kj, block_q=128, block_k=64))
    assert scores.shape == (2, 2, num_blocks(seq_q, 128), num_blocks(seq_k, 64))
    cfg = SparseConfig(topk=0.2, topp=0.7, keep_first=True)
    mask = np.asarray(jax.jit(predict_mask, static_argnums=2)(qj, kj, cfg))
    boundary = near_p_boundary(scores, (0.7, 0.7))
    want = numpy_rule_mask(scores, k=0.2, p=None if boundary else 0.7)
    want[..., 0] = True
    if boundary:
        assert (mask >= want).all()
    else:
        np.testing.assert_array_equal(mask, want)


def test_rules_share_one_sort():
    scores = jnp.zeros((1, 2, 4, 16), jnp.float32)
    for fn in (lambda s: topk_mask(s, 0.1), lambda s: topp_mask(s, 0.9), lambda s: hybrid_mask(s, 0.1, 0.9)):
        hlo = jax.jit(fn).lower(scores).compile().as_text()
        assert hlo.count(" sort(") == 1 and " gather(" not in hlo and " scatter(" not in hlo
