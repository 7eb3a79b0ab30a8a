"""Token-level bands inside kept blocks (`pallas_kernels.TokenBand`): the xla kernels against the
dense oracle, the dispatch rule for backends without them, and plans that carry one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import TokenBand, mask_to_block_index, reference_attention, reference_attention_with_lse, xla
from pallas_kernels.dispatch import forward, resolve_backend
from sparge_jax import SparseConfig
from sparge_jax.attention import sparse_attention
from sparge_jax.config import KernelConfig
from sparge_jax.masks import make_plan
from sparge_jax.masks.svg import svg_mask
from sparge_jax.method_config import HeadMix, RadialMethod, SVGMethod
from sparge_jax.methods import attend_plan

pytestmark = pytest.mark.matmul_precision("highest")


def numpy_band_attention(q, k, v, allowed):
    """float64 softmax attention of `(seq, d)` inputs over a bool `(seq_q, seq_k)` token mask."""
    s = np.where(allowed, q @ k.T / np.sqrt(q.shape[-1]), -np.inf)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v


def test_xla_band_matches_oracles(rng):
    """A ragged length (300 = 4 * 64 + 44 = 9 * 32 + 12), a width and sink per (batch, head), a random
    block mask: forward, lse and gradients against the jnp oracle; forward against float64 NumPy."""
    b, s, h, d = 2, 300, 3, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(3))
    mask = rng.random((b, h, 5, 10)) < 0.5
    mask[:, :, np.arange(5), 2 * np.arange(5)] = True  # every row keeps its diagonal
    mask = jnp.asarray(mask)
    width, sink = rng.integers(0, 60, (b, h)), rng.integers(0, 40, (b, h))
    band = TokenBand(jnp.asarray(width, jnp.int32), jnp.asarray(sink, jnp.int32))
    config = SparseConfig(kernel=KernelConfig(block_q=64, block_k=32, backend="xla"))

    def ours(q, k, v):
        return sparse_attention(q, k, v, mask=mask, config=config, band=band)

    def oracle(q, k, v):
        return reference_attention(q, k, v, mask, block_q=64, block_k=32, band=band)

    out, lse = forward(q, k, v, mask_to_block_index(mask), block_q=64, block_k=32, sm_scale=d ** -0.5,
                       backend="xla", band=band)
    want_out, want_lse = reference_attention_with_lse(q, k, v, mask, block_q=64, block_k=32, band=band)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-6, atol=1e-6)
    token = np.arange(s)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for i, j in ((0, 0), (1, 2)):
        blocks = np.asarray(mask)[i, j][token[:, None] // 64, token[None, :] // 32]
        allowed = blocks & ((np.abs(token[:, None] - token[None, :]) <= width[i, j]) | (token[None, :] < sink[i, j]))
        want = numpy_band_attention(qn[i, :, j], kn[i, :, j], vn[i, :, j], allowed)
        np.testing.assert_allclose(np.asarray(out)[i, :, j], want, atol=2e-6)
    grads = jax.grad(lambda *x: jnp.sum(ours(*x) * v), argnums=(0, 1, 2))(q, k, v)
    want_grads = jax.grad(lambda *x: jnp.sum(oracle(*x) * v), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_backends_without_token_band_fall_back_or_raise():
    """A band goes to a backend only when its kernels take one: "auto" falls back to xla with a
    warning naming the band, a forced backend raises."""
    q = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
    band = TokenBand(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32))
    assert resolve_backend("tpu", q, q, 128, 64, True) is not xla.BACKEND  # runs without a band
    with pytest.raises(ValueError, match="backend='tpu' cannot run this call: no token-level band"):
        resolve_backend("tpu", q, q, 128, 64, True, band)
    with jax.default_device("tpu"):
        with pytest.warns(RuntimeWarning, match=r"backend 'tpu' unavailable \(no token-level band"):
            assert resolve_backend("auto", q, q, 128, 64, False, band) is xla.BACKEND


def test_bad_band_raises(rng):
    q = jnp.zeros((2, 64, 3, 8))
    band = TokenBand(jnp.zeros((3, 2), jnp.int32), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"band.width must be an int array of shape \(batch, heads\) = \(2, 3\)"):
        sparse_attention(q, q, q, mask=jnp.ones((2, 3, 1, 1), bool), band=band)


def test_svg_token_band_plan_and_head_mix(rng):
    """`SVGMethod(token_band=True)`: its band in the plan, the blocks touching it; in a HeadMix the
    other method's head gets no band (its blocks run whole)."""
    grid = (3, 6, 10)  # N = 180, frames of 60 tokens
    q, k, v = (jnp.asarray(rng.standard_normal((1, 180, 3, 8)), jnp.float32) for _ in range(3))
    kernel = KernelConfig(block_q=64, block_k=32, backend="xla")
    svg = SVGMethod(band_frames=0.5, token_band=True)
    plan, _ = make_plan(q, k, v, svg, kernel, grid=grid)
    np.testing.assert_array_equal(np.asarray(plan.band.width), 30)
    np.testing.assert_array_equal(np.asarray(plan.band.sink), 60)
    np.testing.assert_array_equal(np.asarray(plan.mask)[0, 0], svg_mask(grid, 64, 32, band_frames=0.5, sink=True))
    mix, _ = make_plan(q, k, v, HeadMix((svg, RadialMethod(), svg)), kernel, grid=grid)
    np.testing.assert_array_equal(np.asarray(mix.band.width), [[30, 180, 30]])
    np.testing.assert_array_equal(np.asarray(mix.band.sink), [[60, 0, 60]])
    out = np.asarray(attend_plan(q, k, v, mix, kernel))
    token = np.arange(180)
    band = (np.abs(token[:, None] - token[None, :]) <= 30) | (token[None, :] < 60)
    for h, allowed in ((0, band), (1, np.asarray(mix.mask)[0, 1][token[:, None] // 64, token[None, :] // 32])):
        order = np.asarray(mix.q_order)[0, h]
        qn, kn, vn = (np.asarray(x, np.float64)[0, order, h] for x in (q, k, v))
        np.testing.assert_allclose(out[0, order, h], numpy_band_attention(qn, kn, vn, allowed), atol=2e-6)
