"""`WanModel(residual_dtype=bfloat16)`: the residual stream stored in bf16 (diffusers' bf16
pipeline) instead of float32 (Wan2.1), norms, modulation and adds still computed in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparge_jax.models import WAN_CONFIGS, WanModel
from sparge_jax.models.remat import checkpoint_block

BF16 = jnp.dtype(jnp.bfloat16)
# Tiny model, 2 blocks (layer 0 dense, layer 1 sparse: two scanned runs), 2 x 3 x 5 = 30 tokens.
CONFIG = WAN_CONFIGS["tiny"].replace(dense_layers=(0,))
VIDEO = (2, 6, 10)


def _inputs(seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (1, *VIDEO, CONFIG.in_dim)),
            jax.random.uniform(keys[1], (1,), minval=0, maxval=1000),
            jax.random.normal(keys[2], (1, 9, CONFIG.text_dim)))


def _graphdef(scan: bool, residual_dtype, **kwargs):
    return nnx.graphdef(nnx.eval_shape(lambda: WanModel(CONFIG.replace(scan_layers=scan), rngs=nnx.Rngs(0),
                                                        residual_dtype=residual_dtype, **kwargs)))


def _relative(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.matmul_precision("highest")
def test_bf16_residual_stays_near_the_float32_velocity_scanned_or_not():
    """Float32 params and compute: the bf16 residual's velocity is within 1e-2 (relative L2) of
    the float32 residual's. It rounds the stream 1 + 3 per block times (7 here), each a relative
    error of at most 2^-8 (~1e-3 RMS, independent): 3.7e-3 here, 3.3e-3 .. 4.3e-3 over 4 params x
    2 inputs seeds, ~5.5e-3 with 4 blocks. Above 1e-3: the rounding really happens (float32
    round-off alone is ~1e-7). Scanned and unrolled bf16 models agree to float32 round-off; the
    scans carry bf16."""
    params = nnx.state(WanModel(CONFIG, rngs=nnx.Rngs(0)))
    inputs = _inputs(1)
    velocity = lambda graphdef: jax.jit(  # noqa: E731
        lambda params, *x: nnx.merge(graphdef, params)(*x, attention_mode="sparse")[0])(params, *inputs)
    exact = velocity(_graphdef(False, jnp.float32))
    rounded = velocity(_graphdef(False, BF16))
    assert exact.dtype == rounded.dtype == jnp.float32
    assert 1e-3 < _relative(rounded, exact) < 1e-2
    scanned = _graphdef(True, BF16)
    np.testing.assert_allclose(velocity(scanned), rounded, rtol=1e-5, atol=1e-6)

    jaxpr = jax.make_jaxpr(lambda params, *x: nnx.merge(scanned, params)(*x, attention_mode="sparse")[0])(
        params, *inputs)
    scans = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    assert len(scans) == 2  # the dense run and the sparse run
    assert all(eqn.outvars[0].aval.dtype == BF16 for eqn in scans)  # the carry: x (batch, seq, dim)


@pytest.mark.matmul_precision("highest")
def test_bf16_residual_gradients_scanned_with_remat_match_the_loop():
    """Remat with a bf16 residual (and the default float32 `remat_input_dtype`, moot here: the
    scanned blocks save their bf16 inputs as they are, see below): gradients match the
    unscanned loop's (`nnx.remat`) within 1e-2 per leaf (relative L2): the residual's
    cotangent is bf16 too (the transpose of its rounding), so the programs' float32 round-off
    differences flip some of its roundings; most leaves are equal, the patch embedding's (the
    cotangent after every block) is off by 1.5e-3."""
    params = nnx.state(WanModel(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
    inputs = _inputs(2)

    def grads(graphdef):
        def loss(params):
            out, _ = nnx.merge(graphdef, params)(*inputs)
            return jnp.mean(out**2 * jnp.arange(out.shape[-1]))
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    want = grads(_graphdef(False, BF16, remat=True))
    got = grads(_graphdef(True, BF16, remat=True))
    assert max(_relative(g, w) for g, w in zip(got, want, strict=True)) < 1e-2


def test_a_saved_dtype_that_holds_the_input_is_plain_checkpointing():
    """`checkpoint_block` with a bf16 input and a float32 `saved_dtype` keeps the input as it is
    (`jax.checkpoint`), rather than a float32 copy; a narrower one rounds (custom VJP)."""
    fn = lambda x, w, fixed: x * w  # noqa: E731
    primitives = lambda x, saved: {eqn.primitive.name for eqn in jax.make_jaxpr(  # noqa: E731
        checkpoint_block(fn, saved))(x, jnp.float32(2.0), 0).eqns}
    assert primitives(jnp.ones(4, BF16), jnp.float32) == {"remat2"}  # jax.checkpoint
    assert primitives(jnp.ones(4, BF16), BF16) == {"remat2"}
    assert primitives(jnp.ones(4, jnp.float32), jnp.float32) == {"remat2"}
    assert primitives(jnp.ones(4, jnp.float32), BF16) == {"custom_vjp_call"}


def test_residual_dtype_must_be_floating():
    with pytest.raises(ValueError, match="residual_dtype must be a floating dtype"):
        WanModel(CONFIG, rngs=nnx.Rngs(0), residual_dtype=jnp.int32)
