"""WanConfig.scan_layers: scanning runs of alike DiT blocks gives the per-block loop's velocity,
SVG2 state and gradients (dense first layers, per-layer methods, remat), with unchanged params."""

import functools

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


@pytest.mark.slow
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


@pytest.mark.matmul_precision("highest")
def test_params_left_out_of_the_stack_give_the_same_velocity_and_gradients():
    """`scan_stacked`: a param left out of the scan's stack is read from its own layer's array
    (`jax.lax.switch`); values and gradients are those of the stacked scan, differentiated or not."""
    model = WanModel(WAN_CONFIGS["tiny"].replace(num_layers=3, scan_layers=True), rngs=nnx.Rngs(0), remat=True)
    graphdef, params = nnx.split(model)
    inputs = _inputs(model.config, 1)

    def loss(params, stacked):
        out, _ = nnx.merge(graphdef, params)(*inputs, scan_stacked=stacked)
        return jnp.mean(out**2 * jnp.arange(out.shape[-1]))

    want_loss, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, None)))(params)
    got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, frozenset({"self_attn/q/kernel"}))))(params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(want))))


def _temp_bytes(fn, *abstract_args) -> int:
    return jax.jit(fn).lower(*abstract_args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_the_scan_stacks_only_the_params_a_call_differentiates():
    """Compiled memory: a forward with no param differentiated (the teacher's) copies no stack of
    the block params, and a gradient of the self-attention params stacks only those; stacking
    every param costs a copy of the rest of the block params."""
    config = WAN_CONFIGS["tiny"].replace(dim=256, ffn_dim=512, num_layers=6, scan_layers=True)
    model = nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                            remat=True))
    in_attention = lambda path, _: "self_attn" in path  # noqa: E731
    graphdef, attention, rest = nnx.split(model, in_attention, ...)
    inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _inputs(config, 0)]
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    block_attention = nbytes(nnx.to_pure_dict(attention)["blocks"])
    block_rest = nbytes(nnx.to_pure_dict(rest)["blocks"])
    assert block_rest > block_attention

    def velocity(attention, rest, *x, stacked):
        return nnx.merge(graphdef, attention, rest)(*x, scan_stacked=stacked)[0].astype(jnp.float32)

    forward = lambda stacked: functools.partial(velocity, stacked=stacked)  # noqa: E731
    saved = (_temp_bytes(forward(None), attention, rest, *inputs)
             - _temp_bytes(forward(frozenset()), attention, rest, *inputs))
    assert saved > 0.9 * (block_attention + block_rest)

    paths = frozenset("/".join(map(str, path[2:])) for path, _ in nnx.to_flat_state(attention))
    assert "self_attn/q/kernel" in paths
    gradient = lambda stacked: jax.grad(lambda a, r, *x: jnp.mean(forward(stacked)(a, r, *x) ** 2))  # noqa: E731
    saved = (_temp_bytes(gradient(None), attention, rest, *inputs)
             - _temp_bytes(gradient(paths), attention, rest, *inputs))
    assert saved > 0.9 * block_rest


@pytest.mark.slow
@pytest.mark.matmul_precision("highest")
def test_block_inputs_saved_in_bf16_keep_the_forward_and_halve_the_saved_bytes():
    """`remat_input_dtype=bfloat16`: the scanned backward recomputes each block from its float32
    input rounded to bf16 and keeps only that: the loss is the exact one, the gradients those at
    the rounded inputs (each leaf within 3 % in norm), and the compiled
    program holds 2 bytes less per saved input value."""
    config = WAN_CONFIGS["tiny"].replace(num_layers=4, scan_layers=True)
    video = (1, 4, 32, 32, config.in_dim)  # 4 x 16 x 16 = 1024 tokens
    keys = jax.random.split(jax.random.key(3), 3)
    inputs = (jax.random.normal(keys[0], video), jax.random.uniform(keys[1], (1,), minval=0, maxval=1000),
              jax.random.normal(keys[2], (1, 9, config.text_dim)))
    graphdef, params = nnx.split(WanModel(config, rngs=nnx.Rngs(0), remat=True))
    rounded_graphdef = nnx.graphdef(WanModel(config, rngs=nnx.Rngs(0), remat=True, remat_input_dtype=jnp.bfloat16))

    def loss(graphdef, params, *x):
        out, _ = nnx.merge(graphdef, params)(*x)
        return jnp.mean(out**2 * jnp.arange(out.shape[-1]))

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, *inputs))
    exact, rounded = (jax.jit(jax.value_and_grad(functools.partial(loss, g))).lower(*abstract).compile()
                      for g in (graphdef, rounded_graphdef))
    want_loss, want_grads = exact(params, *inputs)
    got_loss, got_grads = rounded(params, *inputs)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    errors = [float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
              for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True)]
    assert max(errors) < 3e-2  # 0.8 % at most here
    assert max(errors) > 0  # the rounding shows

    temp = lambda compiled: compiled.memory_analysis().temp_size_in_bytes  # noqa: E731
    saved = temp(exact) - temp(rounded)
    assert saved > 0.8 * config.num_layers * 1024 * config.dim * 2


@pytest.mark.matmul_precision("highest")
def test_finer_scan_runs_give_the_same_velocity_and_others_are_refused():
    """`scan_runs`: runs inside `layer_runs` (as `train.block_stacks` asks for) give the same
    velocity; a run across unlike blocks, or runs that skip a block, are refused by name."""
    model = WanModel(_config(True), rngs=nnx.Rngs(0))
    inputs = _inputs(model.config, 1)
    call = lambda runs: model(*inputs, attention_mode="sparse", scan_runs=runs)[0]  # noqa: E731
    finer = (range(0, 1), range(1, 2), range(2, 3), range(3, 5))
    np.testing.assert_allclose(call(finer), call(None), rtol=1e-5, atol=1e-6)
    for runs in ((range(0, 2), range(2, 3), range(3, 5)), (range(0, 1), range(3, 5))):
        with pytest.raises(ValueError, match=r"scan_runs must cover blocks 0..4 in order, each run inside one of "
                                             r"layer_runs\('sparse'\)"):
            call(runs)
