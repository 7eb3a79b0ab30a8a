"""The NNX SparseAttention module: dense/sparse switch on shared parameters, rope hook."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oracles import rel_l2
from sparge_jax import SparseConfig
from sparge_jax.nn import SparseAttention, dense_attention


def make(rng_seed, **kw):
    return SparseAttention(32, 4, config=SparseConfig(block_q=16, block_k=16, topk=0.3, topp=0.5), rngs=nnx.Rngs(rng_seed), **kw)


def output(attn, *args, **kw):
    """The attention output of one call (the mask-provider state dropped)."""
    out, _ = attn(*args, **kw)
    return out


@pytest.mark.matmul_precision("highest")
def test_keeping_every_block_equals_dense(rng):
    attn = make(int(rng.integers(1 << 30)))
    x = jnp.asarray(rng.standard_normal((2, 45, 32)), jnp.float32)
    full = SparseConfig(block_q=16, block_k=16, rule="topk", topk=1.0)
    dense = output(attn, x, mode="dense")
    assert rel_l2(output(attn, x, mode="sparse", config=full), dense) < 1e-5
    assert rel_l2(output(attn, x), dense) > 1e-3, "the default sparse config must actually drop blocks"


@pytest.mark.matmul_precision("highest")
def test_matches_manual_projection_with_norm_and_rope(rng):
    attn = make(int(rng.integers(1 << 30)))
    x = jnp.asarray(rng.standard_normal((1, 20, 32)), jnp.float32)
    angle = jnp.asarray(rng.standard_normal((20, 1, 8)), jnp.float32)
    rope = lambda q, k: (q * jnp.cos(angle), k * jnp.sin(angle))
    got = output(attn, x, rope=rope, mode="dense")

    def rms(t, w):
        return t / np.sqrt((t**2).mean(-1, keepdims=True) + 1e-6) * w

    p = lambda lin, t: t @ np.asarray(lin.kernel.value) + np.asarray(lin.bias.value)
    xn = np.asarray(x, np.float64)
    q = rms(p(attn.q, xn), np.asarray(attn.norm_q.scale.value)).reshape(1, 20, 4, 8) * np.cos(angle)
    k = rms(p(attn.k, xn), np.asarray(attn.norm_k.scale.value)).reshape(1, 20, 4, 8) * np.sin(angle)
    v = p(attn.v, xn).reshape(1, 20, 4, 8)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(1, 20, 32)
    assert rel_l2(got, p(attn.o, o)) < 1e-5


def test_cross_attention_and_gradients(rng):
    attn = SparseAttention(32, 4, kv_dim=24, qk_norm=False, config=SparseConfig(block_q=16, block_k=16),
                           rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 33, 32)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 17, 24)), jnp.float32)

    def loss(model):
        return jnp.mean(output(model, x, ctx) ** 2)

    grads = nnx.grad(loss)(attn)
    assert float(jnp.abs(grads.q.kernel.value).sum()) > 0.0
    assert output(attn, x, ctx).shape == (2, 33, 32)


def test_bad_arguments_raise(rng):
    attn = make(0)
    with pytest.raises(ValueError, match="mode"):
        attn(jnp.ones((1, 4, 32)), mode="fast")
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, 32\)"):
        attn(jnp.ones((1, 4, 31)))
    with pytest.raises(ValueError, match="divisible"):
        SparseAttention(30, 4, rngs=nnx.Rngs(0))


@pytest.mark.matmul_precision("highest")
def test_peer_method_runs_through_method_attention_with_grid_and_layer(rng):
    """config.method = a peer provider: the module plans with the token grid it is given and the
    layer it was built for."""
    from sparge_jax.method_config import LayerMethods, RadialMethod, Sparge2Method, SVGMethod
    from sparge_jax.methods import method_attention

    attn = make(int(rng.integers(1 << 30)), layer=1)
    grid = (3, 3, 5)
    x = jnp.asarray(rng.standard_normal((1, 45, 32)), jnp.float32)
    base = SparseConfig(block_q=16, block_k=16, topk=0.3, topp=0.5)
    # A radial mask dense up to 3 frames away keeps every block: dense attention.
    keep_all = base.replace(method=RadialMethod(dense_distance=3))
    assert rel_l2(output(attn, x, config=keep_all, grid=grid), output(attn, x, mode="dense")) < 1e-5
    # Per layer: layer 1 runs SVG, which drops blocks; the output is method_attention's.
    per_layer = base.replace(method=LayerMethods(default=Sparge2Method(), layers=((1, SVGMethod(band_frames=0.3)),)))
    got = output(attn, x, config=per_layer, grid=grid)
    q, k, v = attn.project_qkv(x)
    want, _ = method_attention(q, k, v, config=per_layer, grid=grid, layer=1, key=jax.random.key(1))
    assert rel_l2(got, attn.o(want.reshape(1, 45, 32))) < 1e-6
    assert rel_l2(got, output(attn, x, mode="dense")) > 1e-3
    with pytest.raises(ValueError, match="grid"):
        attn(x, config=per_layer)
    with pytest.raises(ValueError, match="build the module with its layer index"):
        SparseAttention(32, 4, config=per_layer, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"now SparseAttention.__call__\(x, ..., state=s\)"):
        attn.attend(x)


def test_peer_method_sla_is_refused_with_a_reason(rng):
    from sparge_jax.method_config import SLAMethod

    attn = make(int(rng.integers(1 << 30)))
    x = jnp.asarray(rng.standard_normal((1, 45, 32)), jnp.float32)
    config = SparseConfig(block_q=16, block_k=16, method=SLAMethod())
    with pytest.raises(ValueError, match="SLAProjection"):
        attn(x, config=config, grid=(3, 3, 5))


@pytest.mark.gpu
@pytest.mark.matmul_precision("highest")
@pytest.mark.parametrize("seq_q,seq_k", [(18, 6), (18, 5), (17, 6)])
def test_dense_attention_takes_any_length_on_the_gpu(rng, seq_q, seq_k):
    """bf16: cuDNN where it takes the shapes (even lengths when differentiated), XLA elsewhere;
    values and gradients match a float32 softmax on the same (rounded) inputs."""
    q = jnp.asarray(rng.standard_normal((2, seq_q, 2, 16)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((2, seq_k, 2, 16)), jnp.bfloat16) for _ in range(2))
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def oracle(q, k, v):
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    out = jax.jit(dense_attention)(q, k, v)
    grads = jax.jit(jax.grad(loss(dense_attention), argnums=(0, 1, 2)))(q, k, v)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    assert out.dtype == jnp.bfloat16 and rel_l2(out, oracle(*up)) < 2e-2
    for name, g, want in zip("qkv", grads, jax.grad(loss(oracle), argnums=(0, 1, 2))(*up)):
        assert g.dtype == jnp.bfloat16 and rel_l2(g, want) < 2e-2, name


@pytest.mark.matmul_precision("highest")
def test_dense_attention_in_query_chunks_matches_a_float64_softmax(rng):
    """Off cuDNN, queries go through in chunks of rows whose logits fit `logits_limit`: here
    2 x 2 x 7 x 11 <= 330 < 2 x 2 x 8 x 11, so 13 rows take chunks of 7 (the last one padded);
    values and gradients against a float64 NumPy softmax."""
    q = rng.standard_normal((2, 13, 2, 8))
    k, v = rng.standard_normal((2, 11, 2, 8)), rng.standard_normal((2, 11, 2, 8))
    w = rng.standard_normal((2, 13, 2, 8))
    scale = 1 / np.sqrt(8)

    def oracle(q, k, v):
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return p, np.einsum("bhqk,bkhd->bqhd", p, v)

    p, want = oracle(q, k, v)
    chunked = functools.partial(dense_attention, logits_limit=330)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    got = jax.jit(chunked)(*args)
    assert got.shape == want.shape and rel_l2(got, want) < 1e-5
    loss = lambda q, k, v: jnp.sum(chunked(q, k, v) * jnp.asarray(w, jnp.float32))
    dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    dp = np.einsum("bqhd,bkhd->bhqk", w, v)  # d loss / d p, then through the softmax
    dlogits = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    assert rel_l2(dv, np.einsum("bhqk,bqhd->bkhd", p, w)) < 1e-5
    assert rel_l2(dq, np.einsum("bhqk,bkhd->bqhd", dlogits, k)) < 1e-5
    assert rel_l2(dk, np.einsum("bhqk,bqhd->bkhd", dlogits, q)) < 1e-5
