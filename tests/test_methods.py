"""Peer mask providers against float64 NumPy models of their rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracles import numpy_block_attention, rel_l2
from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.config_builder import build_config
from sparge_jax.masks import AttentionPlan, make_plan
from sparge_jax.masks.radial import radial_mask, radial_window
from sparge_jax.masks.sla import sla_block_split
from sparge_jax.masks.spargeattn import spargeattn_mask
from sparge_jax.masks.svg import band_block_mask, position_major_order, profile_heads, svg_plan
from sparge_jax.masks.svg2 import Centroids, cluster_topp, kmeans
from sparge_jax.method_config import (
    Method,
    HeadMix,
    LayerMethods,
    RadialMethod,
    SLAMethod,
    SpargeAttnMethod,
    SVG2Method,
    SVGMethod,
)
from sparge_jax.methods import attend_plan, method_attention
from sparge_jax.sla_linear import SLAProjection, feature_map, linear_block_attention

KERNEL = KernelConfig(block_q=16, block_k=8, backend="xla")


def blocks_of(n, block):
    return [(lo, min(lo + block, n)) for lo in range(0, n, block)]


def to_np(*xs):
    return [np.asarray(x, np.float64) for x in xs]


# ---------------------------------------------------------------- SpargeAttn

def numpy_spargeattn(q, k, bq, bk, cdf, sim, scale):
    q, k = to_np(q, k)
    b, sq, h, d = q.shape
    qb, kb = blocks_of(sq, bq), blocks_of(k.shape[1], bk)

    def pairwise(x, lo, hi):
        u = x[lo:hi] / np.linalg.norm(x[lo:hi], axis=-1, keepdims=True)
        return np.mean([u[i] @ u[j] for i in range(hi - lo) for j in range(hi - lo)])

    out = np.zeros((b, h, len(qb), len(kb)), bool)
    for bi in range(b):
        for hi in range(h):
            smooth_q = [pairwise(q[bi, :, hi], lo, up) > sim for lo, up in qb]
            smooth_k = [pairwise(k[bi, :, hi], lo, up) > sim for lo, up in kb]
            pk = np.stack([k[bi, lo:up, hi].mean(0) for lo, up in kb])
            for i, (lo, up) in enumerate(qb):
                logits = pk @ q[bi, lo:up, hi].mean(0) * scale
                logits[~np.asarray(smooth_k)] = -np.inf
                p = np.exp(logits - logits.max())
                p /= p.sum()
                order = np.argsort(-p, kind="stable")
                count = max(1, int(np.sum(np.cumsum(p[order]) <= cdf)))
                out[bi, hi, i, order[:count]] = True
                if not smooth_q[i]:
                    out[bi, hi, i] = True
            out[bi, hi][:, ~np.asarray(smooth_k)] = True
    return out


def test_spargeattn_matches_numpy(rng):
    b, s, h, d = 1, 75, 2, 8
    q = rng.standard_normal((b, s, h, d))
    k = rng.standard_normal((b, s, h, d))
    # make some blocks self-similar with a shared direction
    q[:, :32] += 3 * rng.standard_normal((1, 1, h, d))
    k[:, 8:40] += 3 * rng.standard_normal((1, 1, h, d))
    q, k = q.astype(np.float32), k.astype(np.float32)
    got = np.asarray(spargeattn_mask(jnp.asarray(q), jnp.asarray(k), block_q=16, block_k=8,
                                     cdf_threshold=0.6, sim_threshold=0.3, sm_scale=0.5))
    want = numpy_spargeattn(q, k, 16, 8, 0.6, 0.3, 0.5)
    np.testing.assert_array_equal(got, want)
    assert 0 < want.mean() < 1


# ---------------------------------------------------------------- SLA

def test_sla_split_matches_numpy(rng):
    b, s, h, d = 2, 90, 2, 8
    q, k = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(2))
    crit, marg = map(np.asarray, sla_block_split(jnp.asarray(q), jnp.asarray(k), block_q=16, block_k=8,
                                                 critical=0.2, negligible=0.3))
    qd, kd = to_np(q, k)
    kd = kd - kd.mean(axis=1, keepdims=True)
    kb = blocks_of(s, 8)
    nk = len(kb)
    n_crit, n_negl = math.floor(0.2 * nk), math.floor(0.3 * nk)
    for bi in range(b):
        for hi in range(h):
            pk = np.stack([kd[bi, lo:up, hi].mean(0) for lo, up in kb])
            for i, (lo, up) in enumerate(blocks_of(s, 16)):
                order = np.argsort(-(pk @ qd[bi, lo:up, hi].mean(0)), kind="stable")
                assert set(np.flatnonzero(crit[bi, hi, i])) == set(order[:n_crit])
                assert set(np.flatnonzero(marg[bi, hi, i])) == set(order[n_crit:nk - n_negl])


def dense_linear(q, k, v, marginal, bq, bk, name):
    """Token-level linear attention restricted to the marginal blocks (jnp, differentiable)."""
    fq, fk = feature_map(q, name), feature_map(k, name)
    rows, cols = jnp.arange(q.shape[1]) // bq, jnp.arange(k.shape[1]) // bk
    allowed = marginal[:, :, rows][:, :, :, cols].astype(jnp.float32)
    a = jnp.einsum("bqhd,bkhd->bhqk", fq, fk) * allowed
    num = jnp.einsum("bhqk,bkhd->bqhd", a, v.astype(jnp.float32))
    return num / (jnp.einsum("bhqk->bqh", a)[..., None] + 1e-5)


@pytest.mark.matmul_precision("highest")
@pytest.mark.parametrize("name", ["softmax", "elu", "relu"])
def test_linear_branch_forward_and_grad_match_dense(rng, name):
    b, s, h, d = 1, 45, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3))
    marginal = jnp.asarray(rng.random((b, h, 3, 6)) < 0.5)
    marginal = marginal.at[0, 0, 1].set(False)  # a row with no marginal block
    got = linear_block_attention(q, k, v, marginal, block_q=16, block_k=8, feature_map_name=name)
    want = dense_linear(q, k, v, marginal, 16, 8, name)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert np.all(np.asarray(got)[0, 16:32, 0] == 0)
    w = jnp.asarray(rng.standard_normal(got.shape), jnp.float32)
    loss = lambda f: lambda *x: jnp.sum(f(*x) * w)
    g_got = jax.grad(loss(lambda *x: linear_block_attention(*x, marginal, block_q=16, block_k=8,
                                                            feature_map_name=name)), argnums=(0, 1, 2))(q, k, v)
    g_want = jax.grad(loss(lambda *x: dense_linear(*x, marginal, 16, 8, name)), argnums=(0, 1, 2))(q, k, v)
    for a, e in zip(g_got, g_want):
        assert rel_l2(a, e) < 1e-5


@pytest.mark.matmul_precision("highest")
def test_sla_attention_is_sparse_plus_projected_linear(rng):
    b, s, h, d = 1, 40, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3))
    proj = SLAProjection(d, rngs=__import__("flax").nnx.Rngs(0))
    method = SLAMethod(critical=0.2, negligible=0.2, feature_map="elu")
    out0, _ = method_attention(q, k, v, config=SparseConfig(method, KERNEL), linear_projection=proj)
    plan, _ = make_plan(q, k, v, method, KERNEL)
    sparse_np, _ = numpy_block_attention(q, k, v, plan.mask, 16, 8)
    np.testing.assert_allclose(out0, sparse_np, rtol=1e-4, atol=1e-5)  # zero-initialised projection
    w = rng.standard_normal((d, d)).astype(np.float32)
    proj.linear.kernel.value = jnp.asarray(w)
    proj.linear.bias.value = jnp.asarray(rng.standard_normal(d), jnp.float32)
    out, _ = method_attention(q, k, v, config=SparseConfig(method, KERNEL), linear_projection=proj)
    fq, fk = (np.asarray(feature_map(x, "elu"), np.float64) for x in (q, k))
    allowed = np.asarray(plan.linear_mask)[:, :, np.arange(s) // 16][:, :, :, np.arange(s) // 8]
    a = np.einsum("bqhd,bkhd->bhqk", fq, fk) * allowed
    lin = np.einsum("bhqk,bkhd->bqhd", a, np.asarray(v, np.float64)) / (a.sum(-1).transpose(0, 2, 1)[..., None] + 1e-5)
    want = sparse_np + lin @ w + np.asarray(proj.linear.bias.value)
    assert rel_l2(out, want) < 1e-5


# ---------------------------------------------------------------- Sparse VideoGen

def test_band_block_mask_matches_token_rule():
    s, width, sink = 70, 11, 9
    t = np.arange(s)
    tok = (np.abs(t[:, None] - t[None, :]) <= width) | (t[None, :] < sink)
    want = np.pad(tok, ((0, 10), (0, 2))).reshape(5, 16, 9, 8).any(axis=(1, 3))
    np.testing.assert_array_equal(band_block_mask(s, 16, 8, width=width, sink=sink), want)


def test_position_major_order_groups_each_position():
    grid = (3, 2, 5)
    order = position_major_order(grid)
    assert sorted(order) == list(range(30))
    np.testing.assert_array_equal(order.reshape(10, 3) % 10, np.repeat(np.arange(10), 3).reshape(10, 3))
    np.testing.assert_array_equal(order.reshape(10, 3) // 10, np.tile(np.arange(3), (10, 1)))


@pytest.mark.matmul_precision("highest")
def test_svg_profiling_picks_the_matching_head_pattern(rng):
    frames, hgt, wid, d = 6, 4, 5, 16
    grid, s = (frames, hgt, wid), frames * hgt * wid
    f, p = np.divmod(np.arange(s), hgt * wid)
    frame_code = rng.standard_normal((frames, d)) * 3
    pos_code = rng.standard_normal((hgt * wid, d)) * 3
    # head 0 attends within its frame (spatial), head 1 along its position (temporal)
    qk = np.stack([frame_code[f], pos_code[p]], axis=1)[None] + 0.1 * rng.standard_normal((1, s, 2, d))
    q = k = jnp.asarray(qk, jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, s, 2, d)), jnp.float32)
    mask, order, temporal = svg_plan(q, k, v, grid, block_q=16, block_k=8, band_frames=0.5, sink=False,
                                     sampled_rows=24, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(temporal), [[False, True]])
    np.testing.assert_array_equal(order[0, 1], position_major_order(grid))
    # the profile errors against a float64 model of the sampled rows
    rows = jnp.asarray(rng.choice(s, 10, replace=False))
    orders = jnp.stack([jnp.arange(s), jnp.asarray(position_major_order(grid))])
    errs = np.asarray(profile_heads(q, k, v, mask[0, 0], orders, block_q=16, block_k=8, rows=rows))
    qd, kd, vd = to_np(q, k, v)
    m = np.asarray(mask[0, 0])
    for c, o in enumerate(np.asarray(orders)):
        slot = np.argsort(o)
        for hi in range(2):
            logits = qd[0, np.asarray(rows), hi] @ kd[0, :, hi].T / 4
            dense = np.exp(logits - logits.max(1, keepdims=True))
            allowed = m[slot[np.asarray(rows)] // 16][:, slot // 8]
            sparse = np.where(allowed, dense, 0)
            err = np.mean((sparse / sparse.sum(1, keepdims=True) @ vd[0, :, hi]
                           - dense / dense.sum(1, keepdims=True) @ vd[0, :, hi]) ** 2)
            np.testing.assert_allclose(errs[c, 0, hi], err, rtol=1e-3, atol=1e-9)


@pytest.mark.matmul_precision("highest")
def test_attend_plan_with_per_head_orders_matches_numpy(rng):
    b, s, h, d = 2, 50, 3, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3))
    q_order = np.stack([[rng.permutation(s) for _ in range(h)] for _ in range(b)]).astype(np.int32)
    k_order = np.stack([[rng.permutation(s) for _ in range(h)] for _ in range(b)]).astype(np.int32)
    mask = rng.random((b, h, 4, 7)) < 0.4
    mask[..., 0] = True
    out = attend_plan(q, k, v, AttentionPlan(jnp.asarray(mask), jnp.asarray(q_order), jnp.asarray(k_order)), KERNEL)
    qd, kd, vd = to_np(q, k, v)
    want = np.zeros_like(qd)
    for bi in range(b):
        for hi in range(h):
            qs, ks = np.argsort(q_order[bi, hi]), np.argsort(k_order[bi, hi])
            allowed = mask[bi, hi][qs[:, None] // 16, ks[None, :] // 8]
            logits = np.where(allowed, qd[bi, :, hi] @ kd[bi, :, hi].T / np.sqrt(d), -np.inf)
            p = np.exp(logits - logits.max(1, keepdims=True))
            want[bi, :, hi] = p / p.sum(1, keepdims=True) @ vd[bi, :, hi]
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    # gradients through the permutations match a token-masked dense jnp formulation
    slot_q, slot_k = np.argsort(q_order, -1), np.argsort(k_order, -1)
    allowed = np.stack([[mask[bi, hi][slot_q[bi, hi][:, None] // 16, slot_k[bi, hi][None, :] // 8]
                         for hi in range(h)] for bi in range(b)])

    def dense_masked(q, k, v):
        logits = jnp.where(allowed, jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d), -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)

    w = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    plan = AttentionPlan(jnp.asarray(mask), jnp.asarray(q_order), jnp.asarray(k_order))
    got = jax.grad(lambda *x: jnp.sum(attend_plan(*x, plan, KERNEL) * w), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *x: jnp.sum(dense_masked(*x) * w), argnums=(0, 1, 2))(q, k, v)
    for a, e in zip(got, ref):
        assert rel_l2(a, e) < 1e-4


# ---------------------------------------------------------------- Radial

def numpy_radial_visible(grid, decay, dense_distance, min_window, sink):
    frames, hgt, wid = grid
    n = hgt * wid
    s = frames * n
    vis = np.zeros((s, s), bool)
    for fq in range(frames):
        for fk in range(frames):
            dist = abs(fq - fk)
            if dist <= dense_distance or (sink and fk == 0):
                vis[fq * n:(fq + 1) * n, fk * n:(fk + 1) * n] = True
                continue
            window = decay * 2 ** math.ceil(math.log2(n)) / 2 ** int(math.log2(dist))
            if window < min_window:
                if dist % int(min_window // window):
                    continue
                window = min_window
            for a in range(n):
                for c in range(n):
                    vis[fq * n + a, fk * n + c] = abs(a - c) <= window
    return vis


@pytest.mark.parametrize("grid,bq,bk,min_window,sink", [((12, 4, 8), 16, 8, 2, True), ((10, 3, 10), 8, 4, 4, False)])
def test_radial_mask_matches_numpy(grid, bq, bk, min_window, sink):
    vis = numpy_radial_visible(grid, 1.0, 1, min_window, sink)
    s = vis.shape[0]
    nq, nk = -(-s // bq), -(-s // bk)
    want = np.pad(vis, ((0, nq * bq - s), (0, nk * bk - s))).reshape(nq, bq, nk, bk).any(axis=(1, 3))
    got = radial_mask(grid, bq, bk, min_window=min_window, sink_first_frame=sink)
    np.testing.assert_array_equal(got, want)
    assert 0 < want.mean() < 1


def test_radial_density_halves_as_distance_doubles():
    n = 1024
    window, kept = radial_window(np.array([2, 3, 4, 8, 16, 32, 64, 128, 129]), n, decay=1.0, dense_distance=1, min_window=16)
    np.testing.assert_array_equal(window, [512, 512, 256, 128, 64, 32, 16, 16, 16])
    assert kept.tolist() == [True] * 8 + [False]  # window 8 < 16 at d >= 128: stride 2, odd d dropped
    # token density of a frame pair (window w in a frame of n tokens): ratio -> 1/2 as w << n
    dens = lambda w: (n * (2 * w + 1) - w * (w + 1)) / n ** 2
    ratios = [dens(w / 2) / dens(w) for w in (128, 64, 32)]
    assert all(0.5 <= r < 0.56 for r in ratios)
    # below min_window, only every stride-th distance survives: density halves by frame subsampling
    dist = np.arange(256, 1024)
    _, kept = radial_window(dist, n, decay=1.0, dense_distance=1, min_window=16)
    by_octave = [kept[(dist >= lo) & (dist < 2 * lo)].mean() for lo in (256, 512)]
    assert by_octave[1] == pytest.approx(by_octave[0] / 2)


# ---------------------------------------------------------------- Sparse VideoGen2

def numpy_kmeans(x, cent, iters):
    x, cent = to_np(x, cent)
    for _ in range(iters + 1):
        labels = np.argmin(((x[:, None] - cent[None]) ** 2).sum(-1), axis=1)
        if _ == iters:
            break
        for c in range(len(cent)):
            if np.any(labels == c):
                cent[c] = x[labels == c].mean(0)
    return labels, cent


@pytest.mark.matmul_precision("highest")
def test_kmeans_matches_numpy_lloyd(rng):
    x = rng.standard_normal((2, 60, 4)).astype(np.float32) + np.repeat(rng.standard_normal((2, 6, 4)) * 4, 10, 1)
    init = x[:, :5].copy()
    labels, cent, sizes = map(np.asarray, kmeans(jnp.asarray(x), jnp.asarray(init), 6))
    for g in range(2):
        l_want, c_want = numpy_kmeans(x[g], init[g], 6)
        np.testing.assert_array_equal(labels[g], l_want)
        np.testing.assert_allclose(cent[g], c_want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(sizes[g], np.bincount(l_want, minlength=5))


def test_cluster_topp_matches_numpy(rng):
    qc, kc = rng.standard_normal((1, 2, 4, 8)), rng.standard_normal((1, 2, 7, 8)) * 2
    sizes = rng.integers(0, 20, (1, 2, 7))
    got = np.asarray(cluster_topp(jnp.asarray(qc, jnp.float32), jnp.asarray(kc, jnp.float32), jnp.asarray(sizes),
                                  topp=0.7, min_k_ratio=0.3))
    for h in range(2):
        for i in range(4):
            logits = kc[0, h] @ qc[0, h, i] / np.sqrt(8)
            w = sizes[0, h] * np.exp(logits - logits.max())
            p = w / w.sum()
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]
            keep = (before <= 0.7) | (np.arange(7) < 2)
            want = np.zeros(7, bool)
            want[order[keep]] = True
            np.testing.assert_array_equal(got[0, h, i], want)


def test_svg2_block_mask_and_centroid_reuse(rng):
    b, s, h, d = 1, 70, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3))
    method = SVG2Method(q_clusters=5, k_clusters=9, topp=0.6, init_iters=4, step_iters=0)
    plan, state = make_plan(q, k, v, method, KERNEL, key=jax.random.key(3))
    cent = np.asarray(state.q)
    # rebuild the block mask from the returned centroids with NumPy
    qd, kd = to_np(q, k)
    for hi in range(h):
        ql = np.argmin(((qd[0, :, hi, None] - np.asarray(state.q)[0, hi][None]) ** 2).sum(-1), 1)
        kl = np.argmin(((kd[0, :, hi, None] - np.asarray(state.k)[0, hi][None]) ** 2).sum(-1), 1)
        qo, ko = np.argsort(ql, kind="stable"), np.argsort(kl, kind="stable")
        np.testing.assert_array_equal(plan.q_order[0, hi], qo)
        np.testing.assert_array_equal(plan.k_order[0, hi], ko)
        links = np.asarray(cluster_topp(state.q, state.k, jnp.asarray(np.bincount(kl, minlength=9)[None, None]
                                                                      .repeat(h, 1)), topp=0.6, min_k_ratio=0.0))
        tok = links[0, hi][ql[qo][:, None], kl[ko][None, :]]
        want = np.pad(tok, ((0, 10), (0, 2))).reshape(5, 16, 9, 8).any(axis=(1, 3))
        np.testing.assert_array_equal(plan.mask[0, hi], want)
    # reuse: with step_iters=0 the passed centroids are kept and give the same plan
    plan2, state2 = make_plan(q, k, v, method, KERNEL, state=state)
    np.testing.assert_array_equal(np.asarray(state2.q), cent)
    np.testing.assert_array_equal(plan2.mask, plan.mask)
    out, _ = method_attention(q, k, v, config=SparseConfig(method, KERNEL), state=state)
    want_out = attend_plan(q, k, v, plan, KERNEL)
    np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
    assert isinstance(state, Centroids)


# ---------------------------------------------------------------- interface

def test_head_mix_takes_each_heads_plan(rng):
    b, s, h, d = 1, 60, 3, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3))
    grid = (3, 4, 5)
    methods = (RadialMethod(min_window=2), SLAMethod(critical=0.25), SpargeAttnMethod(cdf_threshold=0.5))
    plan, _ = make_plan(q, k, v, HeadMix(methods), KERNEL, grid=grid)
    for hi, m in enumerate(methods):
        single, _ = make_plan(q, k, v, m, KERNEL, grid=grid)
        np.testing.assert_array_equal(plan.mask[:, hi], single.mask[:, hi])
    np.testing.assert_array_equal(plan.linear_mask[:, 1], make_plan(q, k, v, methods[1], KERNEL)[0].linear_mask[:, 1])
    assert not np.asarray(plan.linear_mask[:, [0, 2]]).any()
    layered = LayerMethods(default=methods[0], layers=((2, methods[2]),))
    np.testing.assert_array_equal(make_plan(q, k, v, layered, KERNEL, grid=grid, layer=2)[0].mask,
                                  make_plan(q, k, v, methods[2], KERNEL)[0].mask)


def test_bad_configs_and_inputs_raise(rng):
    with pytest.raises(ValueError, match="critical"):
        SLAMethod(critical=0.0)
    with pytest.raises(ValueError, match="feature_map"):
        SLAMethod(feature_map="tanh")
    with pytest.raises(ValueError, match="method"):
        SparseConfig(method="svg")
    with pytest.raises(ValueError, match="methods"):
        HeadMix(methods=("radial",))
    q = jnp.asarray(rng.standard_normal((1, 30, 2, 8)), jnp.float32)
    with pytest.raises(ValueError, match="grid"):
        make_plan(q, q, q, RadialMethod(), KERNEL, grid=(2, 4, 4))
    with pytest.raises(ValueError, match="one entry per head"):
        make_plan(q, q, q, HeadMix((RadialMethod(),)), KERNEL, grid=(2, 3, 5))
    with pytest.raises(ValueError, match="layer"):
        make_plan(q, q, q, LayerMethods(), KERNEL)


def test_method_configs_round_trip_through_wan_config_json():
    import json

    from sparge_jax.models import WanConfig

    method = LayerMethods(default=HeadMix((SVGMethod(band_frames=2.0), SLAMethod(feature_map="elu"))),
                          layers=((1, RadialMethod(decay=0.5)), (0, SVG2Method(topp=0.8))))
    config = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, sparse=SparseConfig(method=method))
    back = WanConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and back.sparse.method.for_layer(1) == RadialMethod(decay=0.5)
    with pytest.raises(ValueError, match="must carry kind"):
        build_config(Method, {"band_frames": 1.0})
    with pytest.raises(ValueError, match=r"unknown SVGMethod field\(s\) \['bogus'\]"):
        build_config(Method, {"kind": "svg", "bogus": 1})
