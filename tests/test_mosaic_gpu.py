"""Mosaic GPU block-sparse forward kernel and backend module against the jnp oracles.

CPU: the kernel runs through Mosaic GPU interpret mode on small ragged shapes.
GPU (`gpu` marker): the compiled kernel at real sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mosaic_gpu, xla
from pallas_kernels.block_index import mask_to_block_index
from pallas_kernels.blocks import default_sm_scale, num_blocks
from pallas_kernels.reference import reference_attention, reference_attention_with_lse
from sparge_jax.attention import sparse_attention
from sparge_jax.config import SparseConfig
from tests.oracles import numpy_block_attention, rel_l2

TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float16: 3e-3}

# Interpret mode emulates the kernels on the host: a CPU test. On a GPU machine it would run
# the emulation as GPU ops (slow); the real kernels are the `gpu` tests below.
on_cpu = pytest.mark.cpu("Pallas interpret mode")


def _qkv(rng, batch, seq_q, seq_k, heads, head_dim, dtype):
    shapes = [(batch, seq_q, heads, head_dim), (batch, seq_k, heads, head_dim), (batch, seq_k, heads, head_dim)]
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


def _mask(rng, batch, heads, nq, nk, density):
    """Random block mask whose first q row is empty and last q row is full."""
    mask = rng.random((batch, heads, nq, nk)) < density
    mask[:, :, 0, :] = False
    mask[:, :, -1, :] = True
    return mask


def _check_forward(got_out, got_lse, want_out, want_lse, dtype):
    assert got_out.dtype == dtype and got_lse.dtype == jnp.float32
    assert got_out.shape == want_out.shape and got_lse.shape == want_lse.shape
    assert bool(jnp.all(jnp.isfinite(got_out))), "out has non-finite entries"
    empty = ~np.isfinite(np.asarray(want_lse))
    np.testing.assert_array_equal(~np.isfinite(np.asarray(got_lse)), empty)
    assert np.all(np.isneginf(np.asarray(got_lse)[empty]))
    assert rel_l2(got_out, want_out) < TOLERANCE[dtype]
    assert rel_l2(np.asarray(got_lse)[~empty], np.asarray(want_lse)[~empty]) < 1e-4
    rows = np.broadcast_to(np.moveaxis(empty, 1, 2)[..., None], got_out.shape)  # (b, s, h, d)
    assert float(np.abs(np.asarray(got_out, np.float32)[rows]).max(initial=0.0)) == 0.0


@pytest.mark.parametrize(
    "batch, seq_q, seq_k, heads, head_dim, dtype, block_q, keys_per_step",
    [
        (1, 197, 456, 1, 64, jnp.bfloat16, 128, 128),  # seq_q not a multiple of 8 (side buffers), odd/even counts
        (1, 264, 203, 2, 128, jnp.bfloat16, 128, 64),  # seq_k not a multiple of 8; 64 keys per step
        (2, 131, 205, 1, 128, jnp.float16, 64, 128),  # both not multiples of 8; one compute warpgroup, batch > 1
        (1, 176, 328, 1, 64, jnp.float16, 128, 128),  # multiples of 8 (TMA tails); 2nd warpgroup past seq_q
    ],
)
@on_cpu
def test_interpret_matches_float64_oracle(rng, batch, seq_q, seq_k, heads, head_dim, dtype, block_q, keys_per_step):
    q, k, v = _qkv(rng, batch, seq_q, seq_k, heads, head_dim, dtype)
    mask = _mask(rng, batch, heads, num_blocks(seq_q, block_q), num_blocks(seq_k, 64), 0.5)
    out, lse = mosaic_gpu.forward(
        q, k, v, mask_to_block_index(jnp.asarray(mask)), block_q=block_q, block_k=64,
        sm_scale=default_sm_scale(head_dim), interpret=True, keys_per_step=keys_per_step,
    )
    want_out, want_lse = numpy_block_attention(q, k, v, mask, block_q, 64)
    _check_forward(out, lse, want_out, want_lse, dtype)


@on_cpu
def test_interpret_never_reads_unkept_blocks(rng):
    """NaN in every K/V block outside the kept lists must not reach out or lse."""
    q, k, v = _qkv(rng, 1, 256, 392, 1, 64, jnp.bfloat16)
    mask = np.zeros((1, 1, 2, 7), bool)
    mask[..., 1, [0, 2, 3, 6]] = True  # q block 0 keeps nothing; k block 6 is the 8-key tail
    used = mask.any(axis=(0, 1, 2))
    token_unused = jnp.asarray(np.repeat(~used, 64)[:392])[None, :, None, None]
    poisoned_k, poisoned_v = jnp.where(token_unused, jnp.nan, k), jnp.where(token_unused, jnp.nan, v)
    out, lse = mosaic_gpu.forward(
        q, poisoned_k, poisoned_v, mask_to_block_index(jnp.asarray(mask)), block_q=128, block_k=64,
        sm_scale=0.125, interpret=True,
    )
    want_out, want_lse = reference_attention_with_lse(q, k, v, jnp.asarray(mask))
    _check_forward(out, lse, want_out, want_lse, jnp.bfloat16)


@on_cpu
def test_interpret_sparse_attention_values_and_grads(rng):
    """Through `sparse_attention` (custom VJP, dispatch): output and dq/dk/dv vs the reference."""
    q, k, v = _qkv(rng, 1, 136, 200, 2, 64, jnp.bfloat16)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    mask = jnp.asarray(_mask(rng, 1, 2, 2, 4, 0.5))
    config = SparseConfig(backend="mosaic_gpu", interpret=True)
    out, vjp = jax.vjp(lambda q, k, v: sparse_attention(q, k, v, mask=mask, config=config), q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    want, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, mask), f32(q), f32(k), f32(v))
    assert rel_l2(out, want) < TOLERANCE[jnp.bfloat16]
    for name, got, ref in zip(("dq", "dk", "dv"), vjp(dout), ref_vjp(f32(dout))):
        assert got.dtype == jnp.bfloat16, name
        assert rel_l2(got, ref) < TOLERANCE[jnp.bfloat16], name


def test_supports_names_the_reason():
    q = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    assert mosaic_gpu.supports(q, q, 128, 64, interpret=True) is None
    if jax.default_backend() != "gpu":
        assert "no GPU" in mosaic_gpu.supports(q, q, 128, 64, interpret=False)
    assert "dtype" in mosaic_gpu.supports(q.astype(jnp.float32), q, 128, 64, interpret=True)
    assert "head_dim" in mosaic_gpu.supports(jnp.zeros((1, 128, 1, 96), jnp.bfloat16), q, 128, 64, interpret=True)
    assert mosaic_gpu.supports(q, jnp.zeros((1, 101, 1, 64), jnp.bfloat16), 128, 64, interpret=True) is None
    assert "mask blocks" in mosaic_gpu.supports(q, q, 128, 32, interpret=True)


def test_forward_rejects_bad_inputs(rng):
    q, k, v = _qkv(rng, 1, 128, 128, 1, 64, jnp.bfloat16)
    index = mask_to_block_index(jnp.ones((1, 1, 1, 2), bool))
    kw = dict(block_q=128, block_k=64, sm_scale=0.125, interpret=True)
    with pytest.raises(ValueError, match="v must have shape"):
        mosaic_gpu.forward(q, k, v[:, :64], index, **kw)
    with pytest.raises(ValueError, match="k must have dtype"):
        mosaic_gpu.forward(q, k.astype(jnp.float16), v, index, **kw)
    with pytest.raises(ValueError, match="index"):
        mosaic_gpu.forward(q, k, v, mask_to_block_index(jnp.ones((1, 1, 2, 2), bool)), **kw)
    with pytest.raises(ValueError, match="keys_per_step"):
        mosaic_gpu.forward(q, k, v, index, keys_per_step=256, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, dtype, keys_per_step", [(128, jnp.bfloat16, 128), (64, jnp.float16, 64)])
def test_gpu_matches_reference_n8192(rng, head_dim, dtype, keys_per_step):
    q, k, v = _qkv(rng, 1, 8192, 8192, 4, head_dim, dtype)
    mask = jnp.asarray(_mask(rng, 1, 4, 64, 128, 0.3))
    out, lse = mosaic_gpu.forward(
        q, k, v, mask_to_block_index(mask), block_q=128, block_k=64, sm_scale=default_sm_scale(head_dim),
        keys_per_step=keys_per_step,
    )
    want_out, want_lse = reference_attention_with_lse(q, k, v, mask)
    _check_forward(out, lse, want_out, want_lse, dtype)


@pytest.mark.gpu
def test_gpu_ragged_matches_float64_oracle(rng):
    q, k, v = _qkv(rng, 2, 1001, 773, 3, 128, jnp.bfloat16)
    mask = _mask(rng, 2, 3, 8, 13, 0.5)
    out, lse = mosaic_gpu.forward(q, k, v, mask_to_block_index(jnp.asarray(mask)), block_q=128, block_k=64,
                                  sm_scale=default_sm_scale(128))
    _check_forward(out, lse, *numpy_block_attention(q, k, v, mask, 128, 64), jnp.bfloat16)


@pytest.mark.gpu
def test_gpu_matches_xla_backend_n32760(rng):
    """N=32760 (255.9 q blocks), 95% sparse, against the jnp block-sparse forward."""
    q, k, v = _qkv(rng, 1, 32760, 32760, 12, 128, jnp.bfloat16)
    mask = _mask(rng, 1, 12, num_blocks(32760, 128), num_blocks(32760, 64), 0.05)
    index = mask_to_block_index(jnp.asarray(mask))
    kw = dict(block_q=128, block_k=64, sm_scale=default_sm_scale(128))
    out, lse = mosaic_gpu.forward(q, k, v, index, **kw)
    want_out, want_lse = xla.forward(q, k, v, index, **kw)
    _check_forward(out, lse, want_out, want_lse, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [2048, 2051])
def test_gpu_sparse_attention_grads(rng, seq):
    q, k, v = _qkv(rng, 1, seq, seq, 2, 128, jnp.bfloat16)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    mask = jnp.asarray(_mask(rng, 1, 2, num_blocks(seq, 128), num_blocks(seq, 64), 0.3))
    config = SparseConfig(backend="mosaic_gpu")
    out, vjp = jax.vjp(lambda q, k, v: sparse_attention(q, k, v, mask=mask, config=config), q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    want, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, mask), f32(q), f32(k), f32(v))
    assert rel_l2(out, want) < 1e-2
    for got, ref in zip(vjp(dout), ref_vjp(f32(dout))):
        assert rel_l2(got, ref) < 1e-2


@pytest.mark.parametrize("seq_q, seq_k", [(1027, 1001), (100, 37), (1024, 1000)])
def test_kernels_lower_for_cuda_at_any_length(seq_q, seq_k):
    """Mosaic GPU lowering (the real one, not interpret mode) accepts lengths that are not
    multiples of 8: jax 0.11.2 refuses them unless the TMA rounding hook is in place."""
    q = jax.ShapeDtypeStruct((1, seq_q, 2, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, seq_k, 2, 64), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((1, 2, seq_q), jnp.float32)
    index = mask_to_block_index(jnp.ones((1, 2, num_blocks(seq_q, 128), num_blocks(seq_k, 64)), bool))
    kw = dict(block_q=128, block_k=64, sm_scale=0.125)
    forward = lambda q, k, v, i: mosaic_gpu.forward(q, k, v, i, num_ctas=4, **kw)
    backward = lambda q, k, v, o, l, do, i: mosaic_gpu.backward(q, k, v, o, l, do, i, **kw)
    for fn, args in ((forward, (q, k, k, index)), (backward, (q, k, k, q, lse, q, index))):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


def test_tma_rounding_hook_leaves_other_kernels_alone():
    """A kernel not named in RAGGED_KERNELS still gets jax's own error for a ragged axis."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.mosaic_gpu import tma
    from pallas_kernels.mosaic_gpu.common import tile_smem

    assert tma.install() is None

    def copy_block(x_ref, o_ref, smem, barrier):
        plgpu.copy_gmem_to_smem(x_ref.at[0, pl.ds(64, 64), 1], smem, barrier)
        plgpu.barrier_wait(barrier)
        o_ref[...] = smem[...]

    kernel = plgpu.kernel(copy_block, out_type=jax.ShapeDtypeStruct((64, 64), jnp.bfloat16),
                          scratch_types=[tile_smem((64, 64), jnp.bfloat16), plgpu.Barrier()])
    x = jax.ShapeDtypeStruct((1, 1027, 2, 64), jnp.bfloat16)
    with pytest.raises(Exception, match="multiple of its tiling"):
        jax.jit(kernel).trace(x).lower(lowering_platforms=("cuda",))
