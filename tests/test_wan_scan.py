"""WanConfig.scan_layers: scanning runs of alike DiT blocks gives the per-block loop's velocity,
SVG2 state and gradients (dense first layers, per-layer methods, remat), with unchanged params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparge_jax.masks.svg2 import Centroids
from sparge_jax.method_config import LayerMethods, Sparge2Method, SVG2Method
from sparge_jax.models import WAN_CONFIGS, WanModel

# 2 x 3 x 5 = 30 tokens: not a multiple of the tiny config's blocks (q 32, k 16).
VIDEO = (2, 6, 10)


def _config(scan: bool):
    tiny = WAN_CONFIGS["tiny"]
    # Layer 0 dense, layers 1-2 Sparge2, layers 3-4 SVG2 (per-layer centroids carried as state).
    method = LayerMethods(default=Sparge2Method(topk=0.25, topp=0.5),
                          layers=tuple((i, SVG2Method(q_clusters=4, k_clusters=8, init_iters=2, step_iters=1))
                                       for i in (3, 4)))
    return tiny.replace(num_layers=5, dense_layers=(0,), sparse=tiny.sparse.replace(method=method), scan_layers=scan)


def _inputs(config, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (1, *VIDEO, config.in_dim)),
            jax.random.uniform(keys[1], (1,), minval=0, maxval=1000),
            jax.random.normal(keys[2], (1, 9, config.text_dim)))


def test_layer_runs_group_alike_blocks():
    model = nnx.eval_shape(lambda: WanModel(_config(True), rngs=nnx.Rngs(0)))
    assert model.layer_runs("sparse") == [range(0, 1), range(1, 3), range(3, 5)]
    assert model.layer_runs("dense") == [range(0, 5)]


@pytest.mark.matmul_precision("highest")
def test_scanned_blocks_match_the_loop():
    """Velocity, per-layer state (the SVG2 layers start from given centroids) and gradients of
    all params (remat on) equal the unscanned model's; the param tree is the same."""
    plain = WanModel(_config(False), rngs=nnx.Rngs(0), remat=True)
    scanned = WanModel(_config(True), rngs=nnx.Rngs(0), remat=True)
    graphdef, params = nnx.split(plain)
    scan_graphdef, scan_params = nnx.split(scanned)
    assert jax.tree.structure(scan_params) == jax.tree.structure(params)
    inputs = _inputs(plain.config, 1)
    # Centroids from a previous step (random ones: any state of the right shape will do).
    keys = jax.random.split(jax.random.key(2), 4)
    centroids = lambda i, clusters: jax.random.normal(keys[i], (1, 4, clusters, 16))
    state = (None, None, None, Centroids(centroids(0, 4), centroids(1, 8)),
             Centroids(centroids(2, 4), centroids(3, 8)))

    def loss(graphdef, params):
        model = nnx.merge(graphdef, params)
        out, new_state = model(*inputs, state, attention_mode="sparse")
        return jnp.mean(out**2 * jnp.arange(out.shape[-1])), (out, new_state)

    (want_loss, (want_out, want_state)), want_grads = jax.jit(
        jax.value_and_grad(lambda p: loss(graphdef, p), has_aux=True))(params)
    (got_loss, (got_out, got_state)), got_grads = jax.jit(
        jax.value_and_grad(lambda p: loss(scan_graphdef, p), has_aux=True))(params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-6)
    assert got_state[:3] == (None, None, None)  # dense and Sparge2 layers keep no state
    for got, want in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(jax.tree.leaves(want_state)) > 0
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        # atol relative to the leaf's scale: the two programs sum in other orders (an H200 put one
        # element of a leaf of max ~0.25 at 1.5e-7 from the loop's).
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_scan_layers_must_be_bool():
    with pytest.raises(ValueError, match="scan_layers must be a bool"):
        WAN_CONFIGS["tiny"].replace(scan_layers=1)
