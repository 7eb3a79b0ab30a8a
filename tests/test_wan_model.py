"""The Flax Wan2.1 DiT: RoPE and timestep features against float64 NumPy oracles, dense/sparse
switching, per-layer dense settings, shapes, dtypes and input validation."""

import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.keys import flax_shape, param_table
from convert.original import flatten_params
from sparge_jax.config import SparseConfig
from sparge_jax.models import WAN_CONFIGS, WanConfig, WanModel
from sparge_jax.models.rope import apply_rope, axis_angles, broadcast_axes, grid_rope, rope_angles, rope_axis_dims
from sparge_jax.models.wan import timestep_features

# 3 x 5 x 7 = 105 tokens: not a multiple of the tiny config's blocks (q 32, k 16).
VIDEO = (3, 10, 14)


def rope_oracle(x: np.ndarray, grid, theta=10000.0) -> np.ndarray:
    """Wan2.1's RoPE in float64 complex arithmetic: head_dim/2 complex channels split
    [c - 2*(c//3), c//3, c//3] over (frames, height, width)."""
    c = x.shape[-1] // 2
    split = [c - 2 * (c // 3), c // 3, c // 3]
    per_axis = []
    for axis, n in enumerate(split):
        dim = 2 * n
        angles = np.outer(np.arange(grid[axis]), 1.0 / theta ** (np.arange(0, dim, 2) / dim))
        shape = [1, 1, 1, n]
        shape[axis] = grid[axis]
        per_axis.append(np.broadcast_to(angles.reshape(shape), (*grid, n)))
    phase = np.exp(1j * np.concatenate(per_axis, -1).reshape(-1, c))
    rotated = (x[..., 0::2] + 1j * x[..., 1::2]) * phase[None, :, None, :]
    return np.stack([rotated.real, rotated.imag], -1).reshape(x.shape)


@pytest.mark.parametrize("head_dim,grid", [(128, (4, 3, 5)), (20, (3, 3, 5)), (16, (2, 7, 1))])
def test_rope_matches_complex_oracle(head_dim, grid):
    x = np.random.default_rng(head_dim).standard_normal((2, int(np.prod(grid)), 3, head_dim)).astype(np.float32)
    rope = grid_rope(grid, head_dim)
    q, k = rope(jnp.asarray(x), jnp.asarray(2 * x))
    expected = rope_oracle(x.astype(np.float64), grid)
    np.testing.assert_allclose(np.asarray(q), expected, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(k), 2 * expected, atol=4e-6, rtol=1e-5)


def test_rope_program_holds_per_axis_tables_not_per_token_ones():
    """The hook's program carries each axis's cos/sin (here 40 + 30 + 52 rows) and broadcasts them
    to the 62,400 tokens inside: its lowered text stays small (the per-token tables were 62,400 x
    64 x 2 float32 constants, ~60 MB of text), and the tables are the per-token ones exactly."""
    grid, head_dim = (40, 30, 52), 128
    x = jax.ShapeDtypeStruct((1, int(np.prod(grid)), 2, head_dim), jnp.bfloat16)
    assert len(jax.jit(grid_rope(grid, head_dim)).lower(x, x).as_text()) < 200_000
    cos = [jnp.asarray(np.cos(a), jnp.float32) for a in axis_angles(grid, head_dim)]
    np.testing.assert_array_equal(np.asarray(broadcast_axes(jnp, cos, grid)),
                                  np.cos(rope_angles(grid, head_dim)).astype(np.float32))


def test_rope_axis_split_matches_wan():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(20) == (8, 6, 6)
    assert rope_angles((2, 3, 4), 128).shape == (24, 64)
    with pytest.raises(ValueError, match="head_dim"):
        rope_axis_dims(7)


def test_apply_rope_keeps_dtype():
    x = jax.random.normal(jax.random.key(0), (1, 6, 2, 20), jnp.bfloat16)
    angles = rope_angles((1, 2, 3), 20)
    out = apply_rope(x, jnp.cos(angles).astype(jnp.float32), jnp.sin(angles).astype(jnp.float32))
    assert out.dtype == jnp.bfloat16
    expected = rope_oracle(np.asarray(x, np.float64), (1, 2, 3))
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=0.05)


def test_apply_rope_swaps_pairs_without_slicing_them():
    """The rotation is elementwise plus one reverse of the pair axis: no slice, stack or
    concatenate of the pairs, which XLA's loop fusions read and write poorly."""
    x = jax.ShapeDtypeStruct((1, 6, 2, 20), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((6, 10), jnp.float32)
    ops = {eqn.primitive.name for eqn in jax.make_jaxpr(apply_rope)(x, table, table).eqns}
    assert "rev" in ops and not ops & {"slice", "stack", "concatenate", "gather", "dynamic_slice"}, ops


def test_timestep_features_match_float64():
    t = np.concatenate([[0.0, 1.0, 999.0, 1000.0, 417.25], np.random.default_rng(1).uniform(0, 1000, 64)])
    t = t.astype(np.float32)
    angles = t.astype(np.float64)[:, None] * 10000.0 ** (-np.arange(128) / 128)
    expected = np.concatenate([np.cos(angles), np.sin(angles)], -1)  # cos first, as in Wan2.1
    for fn in (timestep_features, jax.jit(timestep_features, static_argnums=1)):
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(t), 256)), expected, atol=5e-7, rtol=0)


def _inputs(config: WanConfig, batch=2, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 5)
    channels = config.out_dim if config.model_type == "i2v" else config.in_dim
    inputs = dict(
        latents=jax.random.normal(keys[0], (batch, *VIDEO, channels), dtype),
        timestep=jax.random.uniform(keys[1], (batch,), minval=0, maxval=1000),
        context=jax.random.normal(keys[2], (batch, 9, config.text_dim), dtype),
    )
    if config.model_type == "i2v":
        inputs["clip_fea"] = jax.random.normal(keys[3], (batch, 257, config.image_dim), dtype)
        inputs["y"] = jax.random.normal(keys[4], (batch, *VIDEO, config.in_dim - channels), dtype)
    return inputs


def _call(model, inputs, mode=None):
    """The model's velocity, one compiled call (op by op, a forward compiles hundreds of small
    programs: minutes on a GPU box)."""
    inputs = dict(inputs)
    args = inputs.pop("latents"), inputs.pop("timestep"), inputs.pop("context")
    return _velocity(model, args, inputs, mode)


@functools.partial(nnx.jit, static_argnames="mode")
def _velocity(model, args, inputs, mode):
    return model(*args, attention_mode=mode, **inputs)[0]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def tiny():
    return WanModel(WAN_CONFIGS["tiny"], rngs=nnx.Rngs(0))


def test_params_match_the_converter_table():
    for name, config in WAN_CONFIGS.items():
        abstract = nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0)))
        shapes = {p: tuple(v.shape) for p, v in flatten_params(nnx.to_pure_dict(nnx.state(abstract))).items()}
        expected = {spec.flax_path: flax_shape(spec) for spec in param_table(config).values()}
        assert shapes == expected, name
    big = nnx.eval_shape(lambda: WanModel(WAN_CONFIGS["t2v-1.3b"], rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(big)))
    assert 1.2e9 < count < 1.5e9


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_forward_shapes_and_modes(name):
    config = WAN_CONFIGS[name]
    model = WanModel(config, rngs=nnx.Rngs(1))
    inputs = _inputs(config)
    dense = _call(model, inputs, "dense")
    sparse = _call(model, inputs, "sparse")
    assert dense.shape == (2, *VIDEO, config.out_dim) and dense.dtype == jnp.float32
    assert np.isfinite(np.asarray(sparse)).all()
    # The tiny sparse config skips blocks, so the two modes must differ, though not wildly.
    assert 1e-4 < _rel(sparse, dense) < 1.0


@pytest.mark.matmul_precision("highest")
def test_sparse_keeping_every_block_equals_dense(tiny):
    inputs = _inputs(tiny.config, seed=3)
    dense = _call(tiny, inputs, "dense")
    full = SparseConfig(rule="topk", topk=1.0, block_q=32, block_k=16)
    every_block = WanModel(tiny.config.replace(sparse=full), rngs=nnx.Rngs(0))
    nnx.update(every_block, nnx.state(tiny))
    assert _rel(_call(every_block, inputs, "sparse"), dense) < 1e-5


def test_dense_layers_stay_dense(tiny):
    inputs = _inputs(tiny.config, seed=4)
    dense = _call(tiny, inputs, "dense")
    all_dense = WanModel(tiny.config.replace(dense_layers=(0, 1)), rngs=nnx.Rngs(0))
    nnx.update(all_dense, nnx.state(tiny))
    np.testing.assert_array_equal(np.asarray(_call(all_dense, inputs, "sparse")), np.asarray(dense))
    first_dense = WanModel(tiny.config.replace(dense_layers=(0,)), rngs=nnx.Rngs(0))
    nnx.update(first_dense, nnx.state(tiny))
    sparse = _call(tiny, inputs, "sparse")
    mixed = _call(first_dense, inputs, "sparse")
    assert _rel(mixed, dense) > 1e-5 and _rel(mixed, sparse) > 1e-5


def test_default_mode_comes_from_config(tiny):
    inputs = _inputs(tiny.config, seed=5)
    dense_default = WanModel(tiny.config.replace(attention_mode="dense"), rngs=nnx.Rngs(0))
    nnx.update(dense_default, nnx.state(tiny))
    np.testing.assert_array_equal(np.asarray(_call(dense_default, inputs)), np.asarray(_call(tiny, inputs, "dense")))
    np.testing.assert_array_equal(np.asarray(_call(tiny, inputs)), np.asarray(_call(tiny, inputs, "sparse")))


def test_bf16_compute_close_to_fp32(tiny):
    inputs = _inputs(tiny.config, seed=6)
    bf16 = WanModel(tiny.config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(bf16, nnx.state(tiny))
    out = _call(bf16, inputs, "dense")
    assert out.dtype == jnp.float32
    assert _rel(out, _call(tiny, inputs, "dense")) < 3e-2


def test_jit_and_grad_through_sparse(tiny):
    inputs = _inputs(tiny.config, seed=7)
    graphdef, params = nnx.split(tiny)

    def loss(params):
        model = nnx.merge(graphdef, params)
        return jnp.mean(model(inputs["latents"], inputs["timestep"], inputs["context"], attention_mode="sparse")[0] ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.9 * len(norms)


def _remat_count(jaxpr) -> int:
    """Number of rematerialised (checkpoint) regions in a jaxpr, nested ones included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("checkpoint", "remat", "remat2")
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _remat_count(sub)
    return count


@pytest.mark.slow
@pytest.mark.matmul_precision("highest")
def test_remat_blocks_same_values_and_grads(tiny):
    """remat=True wraps each block in a checkpoint and changes neither output nor gradients."""
    inputs = _inputs(tiny.config, seed=11)
    graphdef, params = nnx.split(tiny)
    remat_graphdef, _ = nnx.split(WanModel(tiny.config, rngs=nnx.Rngs(0), remat=True))

    def loss(graphdef, params):
        model = nnx.merge(graphdef, params)
        out, _ = model(inputs["latents"], inputs["timestep"], inputs["context"], attention_mode="sparse")
        return jnp.mean(out**2 * jnp.arange(out.shape[-1]))

    plain = jax.jit(jax.value_and_grad(lambda p: loss(graphdef, p)))(params)
    remat = jax.jit(jax.value_and_grad(lambda p: loss(remat_graphdef, p)))(params)
    for got, want in zip(jax.tree.leaves(remat), jax.tree.leaves(plain)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    jaxpr = lambda g: jax.make_jaxpr(jax.grad(lambda p: loss(g, p)))(params).jaxpr
    assert _remat_count(jaxpr(remat_graphdef)) >= tiny.config.num_layers
    assert _remat_count(jaxpr(graphdef)) == 0


def test_input_validation(tiny):
    good = _inputs(tiny.config)
    bad_cases = {
        "latents": dict(good, latents=good["latents"][0]),
        "channels": dict(good, latents=good["latents"][..., :3]),
        "multiples of patch_size": dict(good, latents=good["latents"][:, :, :9]),
        "timestep": dict(good, timestep=good["timestep"][:1]),
        "context": dict(good, context=good["context"][..., :5]),
        "i2v models only": dict(good, clip_fea=jnp.zeros((2, 257, 48))),
    }
    for message, inputs in bad_cases.items():
        with pytest.raises(ValueError, match=message):
            _call(tiny, inputs, "dense")
    with pytest.raises(ValueError, match="mode"):
        _call(tiny, good, "fast")
    i2v = WanModel(WAN_CONFIGS["tiny-i2v"], rngs=nnx.Rngs(0))
    no_clip = {k: v for k, v in _inputs(i2v.config).items() if k != "clip_fea"}
    with pytest.raises(ValueError, match="clip_fea"):
        _call(i2v, no_clip, "dense")


def test_config_validation():
    base = WAN_CONFIGS["tiny"]
    for changes, message in [
        (dict(model_type="v2v"), "model_type"),
        (dict(dense_layers=(2,)), "dense_layers"),
        (dict(num_heads=3), "num_heads"),
        (dict(model_type="i2v"), "image_dim"),
        (dict(image_dim=8), "i2v only"),
        (dict(patch_size=(1, 2)), "patch_size"),
        (dict(attention_mode="fast"), "mode"),
    ]:
        with pytest.raises(ValueError, match=message):
            base.replace(**changes)
    assert WanConfig.from_dict(base.to_dict()) == base
    with pytest.raises(ValueError, match="unknown"):
        WanConfig.from_dict(dict(base.to_dict(), heads=3))


def test_named_configs_follow_wan21():
    c13, c14, i2v = WAN_CONFIGS["t2v-1.3b"], WAN_CONFIGS["t2v-14b"], WAN_CONFIGS["i2v-14b"]
    assert (c13.dim, c13.ffn_dim, c13.num_heads, c13.num_layers, c13.head_dim) == (1536, 8960, 12, 30, 128)
    assert (c14.dim, c14.ffn_dim, c14.num_heads, c14.num_layers) == (5120, 13824, 40, 40)
    assert dataclasses.replace(i2v, model_type="t2v", in_dim=16, image_dim=None) == c14
    assert (i2v.in_dim, i2v.out_dim, i2v.image_dim) == (36, 16, 1280)
    for c in (c13, c14, i2v):
        assert (c.patch_size, c.freq_dim, c.text_dim, c.eps, c.qk_norm, c.cross_attn_norm) == (
            (1, 2, 2), 256, 4096, 1e-6, True, True)


@pytest.mark.matmul_precision("highest")
def test_peer_methods_per_layer_get_the_token_grid(tiny):
    """config.sparse.method: per-layer peer providers run inside the model with its latent grid."""
    from sparge_jax.method_config import LayerMethods, RadialMethod, SVGMethod

    inputs = _inputs(tiny.config, seed=6)
    dense = _call(tiny, inputs, "dense")

    def run(method):
        model = WanModel(tiny.config.replace(sparse=tiny.config.sparse.replace(method=method)), rngs=nnx.Rngs(0))
        nnx.update(model, nnx.state(tiny))
        return _call(model, inputs, "sparse")

    keep_all = RadialMethod(dense_distance=64)  # dense within 64 frames: every block kept
    assert _rel(run(keep_all), dense) < 1e-5
    svg_in_layer_1 = run(LayerMethods(default=keep_all, layers=((1, SVGMethod(band_frames=0.3)),)))
    assert np.isfinite(np.asarray(svg_in_layer_1)).all()
    assert _rel(svg_in_layer_1, dense) > 1e-4


@pytest.mark.slow
@pytest.mark.matmul_precision("highest")
def test_svg2_centroids_carry_from_call_to_call(tiny):
    """WanModel.__call__ threads each layer's SVG2 centroids: layer 0's state equals make_plan's
    on that layer's q/k/v, first from scratch, then started from the previous state."""
    from sparge_jax.tools.capture import capture_qkv
    from sparge_jax.masks import make_plan
    from sparge_jax.method_config import SVG2Method

    method = SVG2Method(q_clusters=4, k_clusters=8, init_iters=3, step_iters=1)
    config = tiny.config.replace(sparse=tiny.config.sparse.replace(method=method), dense_layers=(1,))
    model = WanModel(config, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(tiny))
    first, second = _inputs(config, seed=8), _inputs(config, seed=9)
    args = lambda inputs: (inputs["latents"], inputs["timestep"], inputs["context"])
    grid = tuple(n // p for n, p in zip(VIDEO, config.patch_size))

    def layer0_state(inputs, state):
        ((q, k, v),) = capture_qkv(model, *args(inputs), layers=[0]).values()
        return make_plan(q, k, v, method, config.sparse.kernel, grid=grid, state=state, key=jax.random.key(0))[1]

    out1, state1 = model(*args(first), None, attention_mode="sparse")
    assert _rel(out1, _call(model, first, "sparse")) < 1e-6
    assert state1[1] is None  # a dense layer keeps no state
    want1 = layer0_state(first, None)
    for got, want in zip(state1[0], want1):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    _, state2 = model(*args(second), state1, attention_mode="sparse")
    want2 = layer0_state(second, want1)
    for got, want in zip(state2[0], want2):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    _, fresh = model(*args(second), None, attention_mode="sparse")
    assert not np.allclose(state2[0].k, fresh[0].k, atol=1e-3)  # the state was used, not redrawn

    with pytest.raises(ValueError, match="state must be None or a tuple of 2 per-block states"):
        model(*args(first), (None,), attention_mode="sparse")
    with pytest.raises(TypeError, match=r"now WanModel.__call__\(latents, timestep, context, state\)"):
        model.call_with_state(*args(first), None)
