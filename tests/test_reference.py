"""The jnp oracle against a float64 NumPy softmax attention with the same block mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from oracles import numpy_block_attention, rel_l2
from pallas_kernels import num_blocks, reference_attention, reference_attention_with_lse

# float32 against float64 at 1e-5: matmuls in full float32 (a GPU would use TF32 by default).
pytestmark = pytest.mark.matmul_precision("highest")

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}


def random_case(rng, b, sq, sk, h, d, block_q, block_k, dtype, density=0.5):
    q, k, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for s in (sq, sk, sk))
    mask = rng.random((b, h, num_blocks(sq, block_q), num_blocks(sk, block_k))) < density
    return [jnp.asarray(x, dtype) for x in (q, k, v)], mask


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("sq,sk,block_q,block_k", [(100, 77, 32, 16), (128, 128, 128, 64), (37, 200, 16, 64)])
def test_matches_float64_numpy(rng, dtype, sq, sk, block_q, block_k):
    (q, k, v), mask = random_case(rng, 2, sq, sk, 3, 16, block_q, block_k, dtype)
    out, lse = reference_attention_with_lse(q, k, v, jnp.asarray(mask), block_q=block_q, block_k=block_k)
    want_out, want_lse = numpy_block_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                               v.astype(jnp.float32), mask, block_q, block_k)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_l2(out, want_out) < TOL[dtype]
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], rtol=1e-4, atol=1e-4)


def test_fully_masked_rows_are_zero_not_nan(rng):
    (q, k, v), mask = random_case(rng, 1, 90, 70, 2, 8, 32, 16, jnp.float32, density=1.0)
    mask[0, 1, 1, :] = False
    out, lse = reference_attention_with_lse(q, k, v, jnp.asarray(mask), block_q=32, block_k=16)
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_array_equal(np.asarray(out[0, 32:64, 1]), 0.0)
    assert np.all(np.isneginf(np.asarray(lse[0, 1, 32:64])))
    assert np.abs(np.asarray(out[0, 32:64, 0])).max() > 0.0


def test_custom_sm_scale(rng):
    (q, k, v), mask = random_case(rng, 1, 50, 60, 2, 8, 16, 16, jnp.float32)
    out = reference_attention(q, k, v, jnp.asarray(mask), block_q=16, block_k=16, sm_scale=0.37)
    want, _ = numpy_block_attention(q, k, v, mask, 16, 16, sm_scale=0.37)
    assert rel_l2(out, want) < 1e-5
