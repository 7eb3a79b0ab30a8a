"""sparse_attention on bad numbers and bad inputs: NaN/inf reach the rows that attend to them
(as in dense attention, float64 NumPy oracle), empty dimensions and non-integer or boolean
parameters are ValueErrors, block sizes far above the sequence are clamped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracles import numpy_block_attention
from pallas_kernels.block_index import mask_to_block_index
from sparge_jax import SparseConfig, predict_mask, sparse_attention
from sparge_jax.masks import predict_block_index

B, S, H, D = 1, 100, 2, 16
CFG = SparseConfig(block_q=32, block_k=16, topk=0.3, topp=0.5)


def qkv(seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((B, S, H, D)), jnp.float32) for _ in range(3)]


def dense64(q, k, v):
    """float64 dense attention (every block kept)."""
    return numpy_block_attention(q, k, v, np.ones((B, H, 1, 1), bool), S, S)[0]


def test_nan_in_a_key_reaches_every_row_that_attends_to_it():
    q, k, v = qkv()
    clean = np.asarray(sparse_attention(q, k, v, config=CFG))
    bad_k = k.at[0, 37, 1, 3].set(jnp.nan)
    out = np.asarray(sparse_attention(q, bad_k, v, config=CFG))
    want = dense64(q, bad_k, v)
    assert np.isnan(want[:, :, 1]).all() and np.isnan(out[:, :, 1]).all(), "head 1: NaN like dense attention"
    np.testing.assert_array_equal(out[:, :, 0], clean[:, :, 0])  # head 0 untouched
    mask = np.asarray(predict_mask(q, bad_k, CFG))
    assert mask[0, 1, :, 37 // 16].all() and not mask[0, 1].all(), "the NaN block is kept, the others still chosen"
    dq = np.asarray(jax.grad(lambda q: sparse_attention(q, bad_k, v, config=CFG).sum())(q))
    assert np.isnan(dq[:, :, 1]).all() and np.isfinite(dq[:, :, 0]).all()


@pytest.mark.matmul_precision("highest")
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_a_query_stays_in_its_row(value):
    q, k, v = qkv()
    clean = np.asarray(sparse_attention(q, k, v, config=CFG))
    bad_q = q.at[0, 37, 1, 3].set(value)
    out = np.asarray(sparse_attention(q=bad_q, k=k, v=v, config=CFG))
    want = dense64(bad_q, k, v)
    rows_nan = np.isnan(out).any(-1)
    np.testing.assert_array_equal(rows_nan, np.isnan(want).any(-1))
    assert rows_nan.sum() == 1 and rows_nan[0, 37, 1]
    # The other rows of the q block (32-63) see every k block, as its pooled row is not finite.
    others = [r for r in range(32, 64) if r != 37]
    np.testing.assert_allclose(out[0, others, 1], want[0, others, 1], rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.delete(out, np.arange(32, 64), axis=1), np.delete(clean, np.arange(32, 64), axis=1))


@pytest.mark.cpu("Pallas interpret mode of the fused selection")
def test_fused_selection_keeps_nonfinite_blocks_like_the_xla_path():
    q, k, _ = qkv()
    bad_q, bad_k = q.at[0, 37, 0, 3].set(jnp.inf), k.at[0, 70, 1, 3].set(jnp.nan)  # head 0: a q row; head 1: a key
    fused = predict_block_index(bad_q, bad_k, CFG.replace(backend="mosaic_gpu", interpret=True))
    xla = mask_to_block_index(predict_mask(bad_q, bad_k, CFG))
    np.testing.assert_array_equal(np.asarray(fused.kv_counts), np.asarray(xla.kv_counts))
    assert np.asarray(xla.kv_counts)[0, 0, 1] == 7 and np.asarray(predict_mask(bad_q, bad_k, CFG))[0, 1, :, 70 // 16].all()
    for h, qb in np.ndindex(H, fused.kv_counts.shape[2]):
        n = int(fused.kv_counts[0, h, qb])
        assert sorted(np.asarray(fused.kv_indices[0, h, qb, :n])) == sorted(np.asarray(xla.kv_indices[0, h, qb, :n]))


@pytest.mark.gpu
def test_gpu_kernels_propagate_a_nan_key_like_dense_attention():
    """The compiled fused selection and Mosaic GPU kernels (bf16, head_dim 64, ragged N): a NaN
    in one key of head 1 makes every row of head 1 NaN; head 0 equals its clean output."""
    rng = np.random.default_rng(7)
    n = 1000
    q, k, v = [jnp.asarray(rng.standard_normal((1, n, 2, 64)), jnp.bfloat16) for _ in range(3)]
    config = SparseConfig(topk=0.2, topp=0.5)
    clean = np.asarray(sparse_attention(q, k, v, config=config), np.float32)
    bad_k = k.at[0, 537, 1, 5].set(jnp.nan)
    out = np.asarray(sparse_attention(q, bad_k, v, config=config), np.float32)
    assert np.isnan(out[:, :, 1]).all()
    np.testing.assert_array_equal(out[:, :, 0], clean[:, :, 0])
    dq = np.asarray(jax.grad(lambda q: sparse_attention(q, bad_k, v, config=config).astype(jnp.float32).sum())(q),
                    np.float32)
    assert np.isnan(dq[:, :, 1]).all() and np.isfinite(dq[:, :, 0]).all()


@pytest.mark.parametrize("shape, name", [
    ((0, S, H, D), "q"), ((B, 0, H, D), "q"), ((B, S, 0, D), "q"), ((B, S, H, 0), "q"),
])
def test_empty_dimensions_are_refused(shape, name):
    q = jnp.zeros(shape, jnp.float32)
    k = jnp.zeros((shape[0], S, shape[2], shape[3]), jnp.float32)
    with pytest.raises(ValueError, match=f"{name} must have no empty dimension"):
        sparse_attention(q, k, k, config=CFG)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k must have no empty dimension"):
        sparse_attention(q, k[:, :0], v[:, :0], config=CFG)


@pytest.mark.parametrize("fields, message", [
    ({"topk": True}, "topk must lie in"), ({"topp": False}, "topp must lie in"), ({"topk": (0.5, True)}, "topk must lie in"),
    ({"block_q": True}, "block_q must be a positive int"), ({"block_k": 16.0}, "block_k must be a positive int"),
    ({"block_k": 0}, "block_k must be a positive int"),
])
def test_boolean_and_non_integer_parameters_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SparseConfig(**fields)


@pytest.mark.matmul_precision("highest")
def test_block_sizes_far_above_the_sequence_are_clamped():
    q, k, v = qkv()
    huge = CFG.replace(block_q=1 << 40, block_k=1 << 40)  # once padded to 2**40 tokens
    out = np.asarray(sparse_attention(q, k, v, config=huge))
    np.testing.assert_allclose(out, dense64(q, k, v), rtol=2e-5, atol=2e-6)  # one block: all kept
    given = np.asarray(sparse_attention(q, k, v, mask=jnp.ones((B, H, 1, 1), bool), config=huge))
    np.testing.assert_array_equal(given, out)


HEAD_SHARDED = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sparge_jax import SparseConfig, sparse_attention

sharding = NamedSharding(Mesh(np.array(jax.devices()), ("tensor",)), P(None, None, "tensor", None))
config = SparseConfig(block_q=32, block_k=16, topk=0.3, topp=0.5)
loss = lambda q, k, v: sparse_attention(q, k, v, config=config).sum()
step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(sharding,) * 3, out_shardings=(sharding,) * 3)
x = jax.ShapeDtypeStruct((1, 100, 4, 16), jnp.float32, sharding=sharding)
text = step.lower(x, x, x).compile().as_text()
bodies, name = {}, None
for line in text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
        name = line.split(" ")[0].lstrip("%")
        bodies[name] = []
    elif name is not None:
        bodies[name].append(line)
loops = re.findall(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)", text)
inside = sum(bool(re.search(r"= \S+ all-(reduce|gather)\(", line))
             for pair in loops for computation in pair for line in bodies[computation])
print(json.dumps({"loops": len(loops), "collectives_in_loops": inside,
                  "collectives": len(re.findall(r"all-(?:reduce|gather)\(", text))}))
"""


def test_head_sharded_xla_kernel_runs_no_collective_inside_its_loops():
    """With heads split over 2 CPU devices, a collective inside a while loop could be scheduled
    against another collective in a different order on each device: XLA:CPU then deadlocked
    and aborted after 40 s ("Termination timeout for all reduce"). The loops stay local."""
    import json
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", HEAD_SHARDED], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         env={**os.environ, "JAX_PLATFORMS": "cpu",
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["loops"] >= 3 and found["collectives"] > 0, found
    assert found["collectives_in_loops"] == 0, found
