"""sparse_attention: outputs and custom-VJP gradients against the dense masked oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracles import rel_l2
from pallas_kernels import num_blocks, reference_attention
from pallas_kernels import xla
from sparge_jax import SparseConfig, mask_shape, predict_mask, sparse_attention

GRAD_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def qkv(rng, b, sq, sk, h, d, dtype):
    return [jnp.asarray(rng.standard_normal((b, s, h, d)), dtype) for s in (sq, sk, sk)]


def random_mask(rng, shape, density):
    mask = rng.random(shape) < density
    mask[0, 0, 0] = False  # an empty row
    mask[-1, -1, -1] = True  # a full row
    return jnp.asarray(mask)


@pytest.mark.matmul_precision("highest")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("sq,sk", [(150, 150), (70, 133)])
def test_values_and_gradients_match_reference(rng, dtype, sq, sk):
    cfg = SparseConfig(block_q=32, block_k=16)
    q, k, v = qkv(rng, 2, sq, sk, 2, 16, dtype)
    mask = random_mask(rng, mask_shape(q, k, cfg), 0.4)
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    ours = lambda q, k, v: sparse_attention(q, k, v, mask=mask, config=cfg)
    ref = lambda q, k, v: reference_attention(q, k, v, mask, block_q=32, block_k=16)
    out = jax.jit(ours)(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_l2(out, ref(q, k, v)) < GRAD_TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out[0, :32, 0]), 0.0)
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    if dtype == jnp.float32:
        want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    else:  # the oracle's gradient in fp32 on the same (rounded) inputs
        up = [x.astype(jnp.float32) for x in (q, k, v)]
        want = jax.grad(loss(ref), argnums=(0, 1, 2))(*up)
    for name, g, w in zip("qkv", grads, want):
        assert g.dtype == dtype, name
        assert not np.isnan(np.asarray(g, np.float32)).any(), name
        assert rel_l2(g, w) < GRAD_TOL[dtype], name


def test_backward_touches_only_kept_blocks(rng):
    cfg = SparseConfig(block_q=16, block_k=16)
    q, k, v = qkv(rng, 1, 64, 64, 1, 8, jnp.float32)
    mask = np.ones((1, 1, 4, 4), bool)
    mask[..., 2] = False  # no row keeps k block 2
    _, dk, dv = jax.grad(lambda q, k, v: jnp.sum(sparse_attention(q, k, v, mask=jnp.asarray(mask), config=cfg) ** 2),
                         argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_array_equal(np.asarray(dk[0, 32:48]), 0.0)
    np.testing.assert_array_equal(np.asarray(dv[0, 32:48]), 0.0)
    assert np.abs(np.asarray(dk[0, :32])).min() > 0.0


@pytest.mark.matmul_precision("highest")
def test_predicted_mask_is_constant_for_gradients(rng):
    cfg = SparseConfig(block_q=32, block_k=16, topk=0.3, topp=0.6)
    q, k, v = qkv(rng, 1, 96, 80, 2, 16, jnp.float32)
    mask = predict_mask(q, k, cfg)
    got = jax.grad(lambda q, k: jnp.sum(jnp.tanh(sparse_attention(q, k, v, config=cfg))), argnums=(0, 1))(q, k)
    want = jax.grad(lambda q, k: jnp.sum(jnp.tanh(reference_attention(q, k, v, mask, block_q=32, block_k=16))),
                    argnums=(0, 1))(q, k)
    for g, w in zip(got, want):
        assert rel_l2(g, w) < 1e-5


@pytest.mark.matmul_precision("highest")
def test_xla_backend_lse_matches_reference(rng):
    from pallas_kernels import mask_to_block_index, reference_attention_with_lse

    q, k, v = qkv(rng, 1, 77, 45, 2, 8, jnp.float32)
    mask = random_mask(rng, (1, 2, num_blocks(77, 32), num_blocks(45, 16)), 0.5)
    out, lse = xla.forward(q, k, v, mask_to_block_index(mask), block_q=32, block_k=16, sm_scale=0.3)
    want_out, want_lse = reference_attention_with_lse(q, k, v, mask, block_q=32, block_k=16, sm_scale=0.3)
    assert rel_l2(out, want_out) < 1e-5
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
    np.testing.assert_allclose(np.asarray(lse)[np.isfinite(lse)], np.asarray(want_lse)[np.isfinite(lse)], rtol=1e-5)


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((2, 10, 2, 8), (2, 10, 2, 8), (2, 10, 2)), "v must have rank 4"),
        (((2, 10, 2, 8), (2, 12, 2, 4), (2, 12, 2, 4)), r"k must have shape .*\(2, 12, 2, 8\)"),
        (((2, 10, 2, 8), (2, 12, 3, 8), (2, 12, 3, 8)), "k must have shape"),
        (((10, 2, 8), (2, 12, 2, 8), (2, 12, 2, 8)), "q must have rank 4"),
    ],
)
def test_bad_shapes_raise(rng, shapes, match):
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, v)


def test_bad_mask_and_dtype_raise(rng):
    cfg = SparseConfig(block_q=32, block_k=16)
    q, k, v = qkv(rng, 1, 40, 40, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match=r"mask must have shape .*\(1, 2, 2, 3\)"):
        sparse_attention(q, k, v, mask=jnp.ones((1, 2, 2, 2), bool), config=cfg)
    with pytest.raises(ValueError, match="mask must be bool"):
        sparse_attention(q, k, v, mask=jnp.ones((1, 2, 2, 3), jnp.int32), config=cfg)
    with pytest.raises(ValueError, match="k must have the dtype of q"):
        sparse_attention(q, k.astype(jnp.bfloat16), v, config=cfg)
    with pytest.raises(ValueError, match="q must be bfloat16, float16 or float32"):
        sparse_attention(q.astype(jnp.int32), k, v, config=cfg)
    with pytest.raises(ValueError, match="backend"):
        SparseConfig(backend="cuda")
