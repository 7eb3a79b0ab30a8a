"""sparge_jax.tools.capture.skipped_fraction: the fraction of block pairs a rule skips, against counts made by
hand (float64)."""

import jax
import jax.numpy as jnp
import numpy as np

from sparge_jax.config import SparseConfig
from sparge_jax.tools.capture import skipped_fraction


def test_skipped_fraction_is_exactly_zero_when_every_block_is_kept_and_the_share_of_the_rest_otherwise():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 160, 5, 32)), jnp.float32) for _ in range(3))  # 5 x 10 blocks

    def skipped(topk):
        config = SparseConfig(block_q=32, block_k=16, rule="topk", topk=topk)
        return float(jax.jit(lambda q, k, v: skipped_fraction(q, k, v, config, (1, 10, 16), layer=0))(q, k, v))

    assert skipped(1.0) == 0.0  # not a round-off below it (1 - 500 x (1 / 500) in float32 is -4.7e-8)
    assert abs(skipped(0.1) - (1 - 1 / 10)) < 1e-7  # one k block of 10 kept in every q row
