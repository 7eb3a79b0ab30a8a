"""Pallas TPU kernels (`pallas_kernels.tpu`) against the dense masked oracle.

CPU runs use the Pallas TPU interpreter, which fills memory past an array's end with
NaN, so a missing tail mask shows up as NaN. Tests marked `tpu` rerun them at real
sizes on a TPU.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracles import rel_l2
from pallas_kernels import (
    BlockIndex,
    mask_to_block_index,
    num_blocks,
    reference_attention,
    reference_attention_with_lse,
    resolve_backend,
    tpu,
    xla,
)
from sparge_jax import SparseConfig, sparse_attention

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}
# fp32 gradients: a row that sees a single key (a 1-token tail block kept alone) has an
# exact-zero dS = P (dP - delta) that fp32 rounding leaves at ~1e-6 relative to dP.
GRAD_TOL = {**TOL, jnp.float32: 1e-4}

# Interpret mode emulates the TPU kernels on the host: it is a CPU test. On a GPU machine it
# would run the emulation on the GPU (20-47 s a test) and the oracle in TF32.
on_cpu = pytest.mark.cpu("Pallas TPU interpret mode")


def qkv(rng, b, sq, sk, h, d, dtype):
    return [jnp.asarray(rng.standard_normal((b, s, h, d)), dtype) for s in (sq, sk, sk)]


def random_mask(rng, b, h, nq, nk, density=0.4):
    """Random block mask with an empty row, a full row and an empty column."""
    mask = rng.random((b, h, nq, nk)) < density
    mask[0, 0, 0] = False  # empty row
    mask[0, 0, :, min(1, nk - 1)] = False  # empty column
    mask[-1, -1, -1] = True  # full row (another head or batch entry when there are several)
    return mask


def run_kernels(q, k, v, mask, dout, block_q, block_k, interpret):
    index = mask_to_block_index(jnp.asarray(mask))
    kw = dict(block_q=block_q, block_k=block_k, sm_scale=q.shape[-1] ** -0.5, interpret=interpret)
    out, lse = tpu.forward(q, k, v, index, **kw)
    return (out, lse), tpu.backward(q, k, v, out, lse, dout, index, **kw)


def oracle(q, k, v, mask, dout, block_q, block_k):
    """fp32 oracle on the (rounded) inputs: (out, lse) and the vjp (dq, dk, dv)."""
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    mask = jnp.asarray(mask)
    out, lse = reference_attention_with_lse(*up, mask, block_q=block_q, block_k=block_k)
    _, vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, mask, block_q=block_q, block_k=block_k), *up)
    return (out, lse), vjp(dout.astype(jnp.float32))


def check_against_oracle(rng, b, sq, sk, h, d, dtype, block_q, block_k, interpret):
    q, k, v = qkv(rng, b, sq, sk, h, d, dtype)
    dout = jnp.asarray(rng.standard_normal(q.shape), dtype)
    mask = random_mask(rng, b, h, num_blocks(sq, block_q), num_blocks(sk, block_k))
    (out, lse), grads = run_kernels(q, k, v, mask, dout, block_q, block_k, interpret)
    (want_out, want_lse), want_grads = oracle(q, k, v, mask, dout, block_q, block_k)

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (b, h, sq)
    assert rel_l2(out, want_out) < TOL[dtype]
    lse, want_lse = np.asarray(lse), np.asarray(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
    assert np.isneginf(lse[0, 0, :block_q]).all()  # the empty row
    kept = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[kept], want_lse[kept], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out[0, :block_q, 0], np.float32), 0.0)
    for name, g, w, x in zip("qkv", grads, want_grads, (q, k, v)):
        assert g.dtype == dtype and g.shape == x.shape, name
        assert not np.isnan(np.asarray(g, np.float32)).any(), name
        assert rel_l2(g, w) < GRAD_TOL[dtype], name
    empty_col = slice(min(1, mask.shape[-1] - 1) * block_k, min(2, mask.shape[-1]) * block_k)
    np.testing.assert_array_equal(np.asarray(grads[1][0, empty_col, 0], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[2][0, empty_col, 0], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0][0, :block_q, 0], np.float32), 0.0)


@pytest.mark.parametrize(
    "dtype,sq,sk,block_k",
    [
        (jnp.float32, 300, 200, 64),  # cross-attention, both tails ragged
        (jnp.bfloat16, 300, 200, 64),
        (jnp.float32, 257, 257, 128),  # self-attention, a 1-token tail block
        (jnp.float16, 140, 333, 64),
    ],
)
@on_cpu
def test_interpret_matches_oracle(rng, dtype, sq, sk, block_k):
    check_against_oracle(rng, 1, sq, sk, 2, 128, dtype, 128, block_k, interpret=True)


@on_cpu
def test_interpret_head_dim_64_single_head(rng):
    check_against_oracle(rng, 2, 190, 150, 1, 64, jnp.float32, 128, 32, interpret=True)


@on_cpu
def test_unlisted_blocks_are_never_computed(rng):
    """NaN in k/v blocks no row keeps, and in q/dout blocks that keep nothing, leaves all results finite."""
    sq, sk, bq, bk = 300, 200, 128, 64
    q, k, v = qkv(rng, 1, sq, sk, 2, 128, jnp.float32)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    mask = random_mask(rng, 1, 2, num_blocks(sq, bq), num_blocks(sk, bk), density=0.6)
    mask[:, :, 1] = False  # q block 1 keeps nothing
    mask[:, :, :, 2] = False  # k block 2 is kept by no row
    (want_out, _), want_grads = oracle(q, k, v, mask, dout, bq, bk)
    poison = lambda x, sl: x.at[:, sl].set(jnp.nan)
    q, dout = poison(q, slice(bq, 2 * bq)), poison(dout, slice(bq, 2 * bq))
    k, v = poison(k, slice(2 * bk, 3 * bk)), poison(v, slice(2 * bk, 3 * bk))
    (out, _), grads = run_kernels(q, k, v, mask, dout, bq, bk, interpret=True)
    assert rel_l2(out, want_out) < 1e-5
    for name, g, w in zip("qkv", grads, want_grads):
        assert rel_l2(g, w) < 1e-5, name


@on_cpu
def test_rows_split_over_several_calls(rng, monkeypatch):
    """A tiny SMEM list budget forces one row per pallas_call, outputs aliased in place.

    Sequence lengths are block multiples here: the interpreter cannot store a partial
    tail block into an aliased output (tails are covered by the single-call tests)."""
    monkeypatch.setattr(tpu.tiles, "SMEM_LIST_ENTRIES", 2)  # lists of 2 slots: one row per call
    check_against_oracle(rng, 1, 256, 256, 2, 128, jnp.float32, 128, 128, interpret=True)


@on_cpu
def test_all_empty_mask_gives_zeros_under_jit(rng):
    """No kept block anywhere: the slot axis still runs once, writing zeros and -inf."""
    q, k, v = qkv(rng, 1, 150, 100, 2, 128, jnp.float32)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    mask = np.zeros((1, 2, 2, 2), bool)
    (out, lse), grads = jax.jit(run_kernels, static_argnums=(5, 6, 7))(q, k, v, mask, dout, 128, 64, True)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert np.isneginf(np.asarray(lse)).all()
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)


@on_cpu
def test_end_to_end_sparse_attention_gradients(rng):
    cfg = SparseConfig(block_q=128, block_k=64, backend="tpu", interpret=True)
    q, k, v = qkv(rng, 1, 200, 150, 2, 128, jnp.bfloat16)
    mask = jnp.asarray(random_mask(rng, 1, 2, 2, 3, density=0.5))
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    attend = lambda q, k, v: sparse_attention(q, k, v, mask=mask, config=cfg)
    out = jax.jit(attend)(q, k, v)
    grads = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2)))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    oracle_fn = lambda q, k, v: reference_attention(q, k, v, mask, block_q=128, block_k=64)
    assert rel_l2(out, oracle_fn(*up)) < TOL[jnp.bfloat16]
    want = jax.grad(loss(oracle_fn), argnums=(0, 1, 2))(*up)
    for name, g, w in zip("qkv", grads, want):
        assert g.dtype == jnp.bfloat16, name
        assert rel_l2(g, w) < TOL[jnp.bfloat16], name


def test_supports_reports_tiling_and_device(rng):
    q, k, _ = qkv(rng, 1, 40, 40, 2, 128, jnp.bfloat16)
    assert tpu.supports(q, k, 128, 64, True) is None
    assert "head_dim 64" in tpu.supports(q[..., :64], k[..., :64], 128, 64, True)
    assert tpu.supports(q[:, :, :1, :64], k[:, :, :1, :64], 128, 64, True) is None
    assert "block_q 64" in tpu.supports(q, k, 64, 64, True)
    assert "block_k 8" in tpu.supports(q, k, 128, 8, True)
    assert tpu.supports(q.astype(jnp.float32), k.astype(jnp.float32), 128, 8, True) is None
    if jax.default_backend() != "tpu":
        assert "no TPU" in tpu.supports(q, k, 128, 64, False)
        with pytest.raises(ValueError, match="no TPU"):
            resolve_backend("tpu", q, k, 128, 64, False)
    assert resolve_backend("tpu", q, k, 128, 64, True) is tpu.BACKEND


def test_auto_falls_back_to_xla_with_one_warning():
    """"auto" takes the backend of the device's platform; a call it cannot run goes to xla,
    warning once. Resolving reads only the platform, so a TPU is not needed."""
    q = jnp.zeros((1, 40, 2, 64), jnp.bfloat16)
    with jax.default_device("tpu"):
        warning = r"backend 'tpu' unavailable \(head_dim 64 is not a multiple of 128.*\); falling back to 'xla'"
        with pytest.warns(RuntimeWarning, match=warning):
            assert resolve_backend("auto", q, q, 128, 64, False) is xla.BACKEND
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert resolve_backend("auto", q, q, 128, 64, False) is xla.BACKEND


def test_bad_inputs_raise(rng):
    q, k, v = qkv(rng, 1, 200, 150, 2, 128, jnp.float32)
    index = mask_to_block_index(jnp.ones((1, 2, 2, 3), bool))
    kw = dict(block_q=128, block_k=64, sm_scale=0.1, interpret=True)
    with pytest.raises(ValueError, match=r"index must hold kv_indices .*\(1, 2, 2, 2\)"):
        tpu.forward(q, k, v, index, block_q=128, block_k=128, sm_scale=0.1, interpret=True)
    with pytest.raises(ValueError, match=r"v must have shape \(1, 150, 2, 128\)"):
        tpu.forward(q, k, v[:, :100], index, **kw)
    with pytest.raises(ValueError, match=r"lse must have shape \(1, 2, 200\)"):
        tpu.backward(q, k, v, q, jnp.zeros((1, 200, 2)), q, index, **kw)


@pytest.mark.parametrize("dtype,list_budget,calls", [
    (jnp.float32, 1 << 16, (1, 2)),
    (jnp.bfloat16, 1 << 16, (1, 2)),
    (jnp.float16, 1 << 16, (1, 2)),
    (jnp.bfloat16, 8, (3, 7)),  # fwd/dq: 6 rows of 4 slots, 2 per call; dK/dV: 8 rows of 3 slots, 2 per call
])
def test_kernels_lower_to_mosaic_tpu(monkeypatch, dtype, list_budget, calls):
    """The Pallas -> Mosaic TPU lowering (block tiling rules, ops, aliased row chunks) accepts the kernels."""
    monkeypatch.setattr(tpu.tiles, "SMEM_LIST_ENTRIES", list_budget)
    b, h, d, sq, sk, bq, bk = 1, 2, 128, 300, 200, 128, 64
    shape = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)
    ints = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    nq, nk = num_blocks(sq, bq), num_blocks(sk, bk)
    index = BlockIndex(ints(b, h, nq, nk), ints(b, h, nq), ints(b, h, nk, nq), ints(b, h, nk))
    q, kv = shape(b, sq, h, d), shape(b, sk, h, d)
    kw = dict(block_q=bq, block_k=bk, sm_scale=0.1)
    fwd = jax.export.export(jax.jit(functools.partial(tpu.forward, **kw)), platforms=["tpu"])(q, kv, kv, index)
    bwd = jax.export.export(jax.jit(functools.partial(tpu.backward, **kw)), platforms=["tpu"])(
        q, kv, kv, q, shape(b, h, sq, dt=jnp.float32), q, index
    )
    for exported, n_kernels in zip((fwd, bwd), calls):
        assert exported.mlir_module().count("tpu_custom_call") == n_kernels


@pytest.mark.tpu
@pytest.mark.parametrize(
    "dtype,sq,sk,block_k",
    [(jnp.bfloat16, 4100, 4100, 128), (jnp.bfloat16, 3000, 2050, 64), (jnp.float32, 2500, 2500, 128)],
)
def test_tpu_matches_oracle(rng, dtype, sq, sk, block_k):
    check_against_oracle(rng, 2, sq, sk, 4, 128, dtype, 128, block_k, interpret=False)


@pytest.mark.tpu
def test_tpu_end_to_end_sparse_attention(rng):
    cfg = SparseConfig(block_q=128, block_k=128, backend="tpu")
    q, k, v = qkv(rng, 1, 3000, 3000, 4, 128, jnp.bfloat16)
    mask = jnp.asarray(random_mask(rng, 1, 4, 24, 24, density=0.2))
    ours = jax.jit(jax.grad(lambda q, k, v: jnp.sum(sparse_attention(q, k, v, mask=mask, config=cfg).astype(jnp.float32) ** 2),
                            argnums=(0, 1, 2)))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(lambda q, k, v: jnp.sum(reference_attention(q, k, v, mask, block_q=128, block_k=128) ** 2),
                    argnums=(0, 1, 2))(*up)
    for name, g, w in zip("qkv", ours, want):
        assert rel_l2(g, w) < TOL[jnp.bfloat16], name
