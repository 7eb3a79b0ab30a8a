"""`dtype=None` means "compute in the params' dtype" for the three top-level models: bf16 params
run their projections / convolutions in bf16, as with `dtype=bfloat16`, not promoted to the
float32 of their inputs (flax's `promote_dtype` would: a loaded bf16 checkpoint then ran every
matmul in float32, and the DiT's attention in float32 outside the bf16 kernels)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparge_jax.models import UMT5_CONFIGS, WAN_CONFIGS, UMT5Encoder, WanModel, WanVAE, WanVAEConfig

rng = np.random.default_rng(0)
VAE = WanVAEConfig(base_dim=4, z_dim=4, latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.0, 0.5, 2.0, 1.5])
CASES = {
    "wan": (lambda dtype: WanModel(WAN_CONFIGS["tiny"], rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.bfloat16),
            lambda model: model(jnp.asarray(rng.standard_normal((1, 2, 8, 8, 16)), jnp.float32), jnp.float32([500.0]),
                                jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32), attention_mode="dense")[0]),
    "umt5": (lambda dtype: UMT5Encoder(UMT5_CONFIGS["tiny"], rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.bfloat16),
             lambda model: model(rng.integers(0, 300, (1, 7)), np.ones((1, 7), np.int32))),
    "vae": (lambda dtype: WanVAE(VAE, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.bfloat16),
            lambda model: model.decode(jnp.asarray(rng.standard_normal((1, 2, 4, 4, 4)), jnp.float32))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_none_computes_in_the_params_dtype(name):
    build, run = CASES[name]
    state = rng.bit_generator.state
    outputs = {}
    for dtype in (None, jnp.bfloat16, jnp.float32):
        rng.bit_generator.state = state  # the same inputs for each
        outputs[dtype] = np.asarray(run(build(dtype)), np.float32)
    np.testing.assert_array_equal(outputs[None], outputs[jnp.bfloat16])
    assert np.abs(outputs[None] - outputs[jnp.float32]).max() > 0  # float32 compute is another program
