"""Mosaic GPU block-sparse backward kernels against `jax.vjp` of the jnp reference.

CPU: the kernels run through Mosaic GPU interpret mode on small ragged shapes.
GPU (`gpu` marker): the compiled kernels at real sizes.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.extend.core import jaxprs_in_params

import pallas_kernels
from pallas_kernels import xla
from pallas_kernels.block_index import mask_to_block_index
from pallas_kernels.mosaic_gpu import backward
from pallas_kernels.mosaic_gpu.common import unsupported_reason
from pallas_kernels.mosaic_gpu.flash_backward import (FUSED_DQ_SLICE_BYTES, FUSED_MIN_DENSITY, auto_fused, dq_slice_fits,
                                                      uses_fused)
from pallas_kernels.blocks import default_sm_scale, num_blocks
from pallas_kernels.reference import reference_attention, reference_attention_with_lse
from sparge_jax.attention import sparse_attention
from sparge_jax.config import KernelConfig, SparseConfig
from tests.oracles import rel_l2

TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float16: 3e-3}

# Interpret mode emulates the kernels on the host: a CPU test. On a GPU machine it would run
# the emulation as GPU ops (slow); the real kernels are the `gpu` tests below.
on_cpu = pytest.mark.cpu("Pallas interpret mode")


def _inputs(rng, batch, seq_q, seq_k, heads, head_dim, dtype):
    shapes = [(batch, seq_q, heads, head_dim), (batch, seq_k, heads, head_dim), (batch, seq_k, heads, head_dim)]
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)
    dout = jnp.asarray(rng.standard_normal(shapes[0]), dtype)
    return q, k, v, dout


def _mask_with_edge_cases(rng, batch, heads, nq, nk, density):
    """Random block mask with an empty q row, a full q row and an empty k column."""
    mask = rng.random((batch, heads, nq, nk)) < density
    mask[:, :, 0, :] = False
    mask[:, :, -1, :] = True
    if nk > 2:
        mask[:, :, :, 1] = False
    return jnp.asarray(mask)


def _reference_grads(q, k, v, dout, mask, block_q, block_k):
    """fp32 (dq, dk, dv) from `jax.vjp` of the dense masked reference."""
    f32 = lambda x: x.astype(jnp.float32)
    fn = lambda q, k, v: reference_attention(q, k, v, mask, block_q=block_q, block_k=block_k)
    return jax.vjp(fn, f32(q), f32(k), f32(v))[1](f32(dout))


def _check_against_reference(rng, batch, seq_q, seq_k, heads, head_dim, dtype, block_q, block_k, density,
                             interpret, poison_empty_column=False, fused=False):
    q, k, v, dout = _inputs(rng, batch, seq_q, seq_k, heads, head_dim, dtype)
    mask = _mask_with_edge_cases(rng, batch, heads, num_blocks(seq_q, block_q), num_blocks(seq_k, block_k), density)
    out, lse = reference_attention_with_lse(q, k, v, mask, block_q=block_q, block_k=block_k)
    ref = _reference_grads(q, k, v, dout, mask, block_q, block_k)
    if poison_empty_column:  # k block 1 is kept by no q block: the kernels must never read it
        rows = slice(block_k, 2 * block_k)
        k, v = k.at[:, rows].set(jnp.nan), v.at[:, rows].set(jnp.nan)
    got = backward(
        q, k, v, out, lse, dout, mask_to_block_index(mask),
        block_q=block_q, block_k=block_k, sm_scale=default_sm_scale(head_dim), interpret=interpret, fused=fused,
    )
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert g.shape == r.shape and g.dtype == q.dtype, name
        assert bool(jnp.all(jnp.isfinite(g))), f"{name} has non-finite entries"
        err = rel_l2(g, r)
        assert err < TOLERANCE[dtype], f"{name}: relative L2 error {err:.2e}"
    # Rows of the empty q block get no dq; the empty k block gets no dk/dv.
    assert float(jnp.abs(got[0][:, :block_q].astype(jnp.float32)).max()) == 0.0
    if mask.shape[-1] > 2:
        assert float(jnp.abs(got[1][:, block_k:2 * block_k].astype(jnp.float32)).max()) == 0.0
        assert float(jnp.abs(got[2][:, block_k:2 * block_k].astype(jnp.float32)).max()) == 0.0


@pytest.mark.parametrize(
    "batch, seq_q, seq_k, heads, head_dim, dtype, block_q",
    [
        (1, 197, 453, 1, 64, jnp.bfloat16, 128),  # neither length a multiple of 8 (side buffers), long k
        (2, 320, 131, 2, 128, jnp.float16, 128),  # batch > 1, seq_k not a multiple of 8, fp16, d=128
        (1, 261, 200, 2, 128, jnp.bfloat16, 128),  # seq_q not a multiple of 8
        (1, 176, 200, 1, 64, jnp.float16, 64),  # multiples of 8 (TMA tails); one compute warpgroup
    ],
)
@on_cpu
def test_interpret_matches_reference(rng, batch, seq_q, seq_k, heads, head_dim, dtype, block_q):
    _check_against_reference(rng, batch, seq_q, seq_k, heads, head_dim, dtype, block_q, 64, 0.5, interpret=True)


@pytest.mark.parametrize(
    "batch, seq_q, seq_k, heads, head_dim, dtype, block_q",
    [
        (2, 197, 131, 2, 128, jnp.bfloat16, 128),  # batch and heads > 1, both lengths ragged (side buffers)
        (1, 176, 200, 1, 64, jnp.float16, 64),  # multiples of 8 (TMA tails), keys past seq_k; one compute warpgroup
    ],
)
@on_cpu
def test_interpret_fused_matches_reference(rng, batch, seq_q, seq_k, heads, head_dim, dtype, block_q):
    """The fused dQ/dK/dV kernel. Interpret mode has no TMA reduce store: the kernel's dQ
    sums go through its read-add-store stand-in there (`flash_backward._reduce_add`)."""
    _check_against_reference(rng, batch, seq_q, seq_k, heads, head_dim, dtype, block_q, 64, 0.5, interpret=True,
                             poison_empty_column=True, fused=True)


@on_cpu
def test_interpret_never_reads_unkept_blocks(rng):
    """NaN in K/V rows of a k block no q block keeps must not reach any gradient."""
    _check_against_reference(rng, 1, 256, 328, 1, 64, jnp.bfloat16, 128, 64, 0.6, interpret=True,
                             poison_empty_column=True)


@on_cpu
def test_interpret_matches_xla_backend_on_dense_mask(rng):
    """All blocks kept: the same numbers as the jnp block-sparse backward."""
    q, k, v, dout = _inputs(rng, 1, 192, 192, 1, 64, jnp.bfloat16)
    mask = jnp.ones((1, 1, 2, 3), bool)
    index = mask_to_block_index(mask)
    scale = default_sm_scale(64)
    out, lse = xla.forward(q, k, v, index, block_q=128, block_k=64, sm_scale=scale)
    want = xla.backward(q, k, v, out, lse, dout, index, block_q=128, block_k=64, sm_scale=scale)
    got = backward(q, k, v, out, lse, dout, index, block_q=128, block_k=64, sm_scale=scale, interpret=True)
    for g, w in zip(got, want):
        assert rel_l2(g, w) < 1e-2


def test_auto_rule_counts_kept_pairs_over_batch_heads_and_vmap():
    """`uses_fused` compares the kept fraction of all (q block, k block) pairs with
    FUSED_MIN_DENSITY; under vmap it takes one decision over all the masks (unbatched)."""
    nq, nk = 4, 25
    at_threshold = round(FUSED_MIN_DENSITY * nq * nk)  # kept pairs per (batch, head)

    def mask(kept_pairs):  # (2, 3, nq, nk): the first kept_pairs of every (batch, head)
        return (jnp.arange(nq * nk) < kept_pairs).reshape(1, 1, nq, nk).repeat(2, 0).repeat(3, 1)

    assert bool(uses_fused(mask_to_block_index(mask(at_threshold))))
    assert not bool(uses_fused(mask_to_block_index(mask(at_threshold - 1))))
    # alone: split, fused; together (their mean density at the threshold or above) fused
    sparse, dense = mask(max(0, 2 * at_threshold - nq * nk)), mask(nq * nk)
    picks = jax.vmap(lambda m: uses_fused(mask_to_block_index(m)))(jnp.stack([sparse, dense]))
    assert picks.tolist() == [True, True]


def _sparse_attention_grads(q, k, v, dout, mask, kernel: KernelConfig):
    """jit of sparse_attention's vjp: (dq, dk, dv)."""
    config = SparseConfig(kernel=kernel)
    fn = lambda q, k, v: sparse_attention(q, k, v, mask=mask, config=config)
    return jax.jit(lambda q, k, v, dout: jax.vjp(fn, q, k, v)[1](dout))(q, k, v, dout)


# Long enough that a head's fp32 dQ slice does not fit FUSED_DQ_SLICE_BYTES at head_dim 64: the
# auto backward then holds both paths under a `lax.cond` (abstract shapes only: never run here).
LONG_SEQ = FUSED_DQ_SLICE_BYTES // (64 * 4) + 64


def test_auto_rule_fuses_while_a_head_dq_slice_fits():
    """`dq_slice_fits` compares one head's fp32 dQ slice (seq_q * head_dim * 4 bytes) with
    FUSED_DQ_SLICE_BYTES: t2v-1.3B 480p's (32760 x 128) fits, 720p's (75600 x 128) does not;
    `auto_fused` is then True at trace time, else the mask's run-time `uses_fused`."""
    assert dq_slice_fits(32760, 128) and not dq_slice_fits(75600, 128)
    assert dq_slice_fits(FUSED_DQ_SLICE_BYTES // 256, 64) and not dq_slice_fits(FUSED_DQ_SLICE_BYTES // 256 + 1, 64)
    assert not dq_slice_fits(LONG_SEQ, 64)
    index = mask_to_block_index(jnp.ones((1, 1, 2, 4), bool))  # density 1
    assert auto_fused(256, 64, index) is True  # decided at trace time: no cond
    picked = auto_fused(LONG_SEQ, 64, index)
    assert not isinstance(picked, bool) and bool(picked)  # a run-time value: uses_fused(index)


@pytest.mark.parametrize("density", [0.9, 0.05])
@on_cpu
def test_interpret_auto_matches_reference(rng, density):
    """The default `fused_backward=None` under jit and the custom VJP of `sparse_attention`: at
    this length the fused kernel whatever the density; a dense-ish and a very sparse mask
    both match the oracle."""
    batch, seq_q, seq_k, heads, head_dim, dtype = 1, 448, 200, 1, 64, jnp.float16
    q, k, v, dout = _inputs(rng, batch, seq_q, seq_k, heads, head_dim, dtype)
    mask = _mask_with_edge_cases(rng, batch, heads, num_blocks(seq_q, 64), num_blocks(seq_k, 64), density)
    assert dq_slice_fits(seq_q, head_dim)
    kernel = KernelConfig(block_q=64, block_k=64, backend="mosaic_gpu", interpret=True)
    got = _sparse_attention_grads(q, k, v, dout, mask, kernel)
    for name, g, r in zip(("dq", "dk", "dv"), got, _reference_grads(q, k, v, dout, mask, 64, 64)):
        assert g.dtype == dtype, name
        assert rel_l2(g, r) < TOLERANCE[dtype], name


def _count_primitive(jaxpr, name: str) -> int:
    """Equations of primitive `name` in `jaxpr` and every jaxpr nested in its equations."""
    return sum((e.primitive.name == name) + sum(_count_primitive(sub, name) for sub in jaxprs_in_params(e.params))
               for e in jaxpr.eqns)


@pytest.mark.parametrize("fused_backward, seq, kernels",
                         [(None, 256, 1), (None, LONG_SEQ, 3), (True, LONG_SEQ, 1), (False, 256, 2)])
def test_fused_backward_reaches_the_kernels(fused_backward, seq, kernels):
    """KernelConfig.fused_backward travels through sparse_attention's custom VJP and dispatch to
    the Mosaic GPU backward: Mosaic GPU kernels (`mpmd_map`) in the traced vjp, the forward's one
    plus the fused kernel (None where a head's dQ slice fits, and True), both paths (a cond:
    None on a longer sequence) or the dQ and dK/dV ones (False)."""
    q = jax.ShapeDtypeStruct((1, seq, 1, 64), jnp.bfloat16)
    mask = jnp.ones((1, 1, num_blocks(seq, 128), num_blocks(seq, 64)), bool)
    config = SparseConfig(block_q=128, block_k=64, backend="mosaic_gpu", interpret=True, fused_backward=fused_backward)
    grads = lambda q: jax.vjp(lambda q: sparse_attention(q, q, q, mask=mask, config=config), q)[1](q)
    assert _count_primitive(jax.make_jaxpr(grads)(q).jaxpr, "mpmd_map") == 1 + kernels


def test_fused_backward_rejects_bad_values_and_other_backends_ignore_it(rng):
    with pytest.raises(ValueError, match="fused_backward must be True .* False .* or None"):
        KernelConfig(fused_backward="yes")
    with pytest.raises(ValueError, match="fused_backward"):
        SparseConfig(fused_backward=1)
    q, k, v, dout = _inputs(rng, 1, 128, 128, 1, 64, jnp.bfloat16)
    mask = jnp.ones((1, 1, 1, 2), bool)
    index = mask_to_block_index(mask)
    out, lse = reference_attention_with_lse(q, k, v, mask)
    kw = dict(block_q=128, block_k=64, sm_scale=0.125)
    with pytest.raises(ValueError, match="fused must be True"):
        backward(q, k, v, out, lse, dout, index, interpret=True, fused="auto", **kw)
    with pytest.raises(ValueError, match="fused must be True"):
        pallas_kernels.backward(q, k, v, out, lse, dout, index, backend="xla", fused=0, **kw)
    want = xla.backward(q, k, v, out, lse, dout, index, **kw)
    got = pallas_kernels.backward(q, k, v, out, lse, dout, index, backend="xla", fused=True, **kw)
    assert all(bool(jnp.array_equal(g, w)) for g, w in zip(got, want))


def test_auto_under_vmap_keeps_one_cond_for_cuda():
    """vmap of the auto backward on a long sequence (lowered for the GPU, no GPU needed) keeps
    its `lax.cond` (one `case`) instead of a select that would run both paths. Interpret mode cannot run
    this: jax refuses vmap of a cond whose branches make callbacks, as the interpreter does."""
    q = jax.ShapeDtypeStruct((3, 1, LONG_SEQ, 2, 64), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((3, 1, 2, LONG_SEQ), jnp.float32)
    mask = jax.ShapeDtypeStruct((3, 1, 2, num_blocks(LONG_SEQ, 128), num_blocks(LONG_SEQ, 64)), bool)

    def grads(q, k, v, o, l, do, m):
        return backward(q, k, v, o, l, do, mask_to_block_index(m), block_q=128, block_k=64, sm_scale=0.125)

    text = jax.jit(jax.vmap(grads)).trace(q, q, q, q, lse, q, mask).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.case") == 1 and "mosaic_gpu" in text


def test_rejects_bad_inputs(rng):
    q, k, v, dout = _inputs(rng, 1, 128, 128, 1, 64, jnp.bfloat16)
    mask = jnp.ones((1, 1, 1, 2), bool)
    index = mask_to_block_index(mask)
    out, lse = reference_attention_with_lse(q, k, v, mask)
    kw = dict(block_q=128, block_k=64, sm_scale=0.125, interpret=True)
    with pytest.raises(ValueError, match="lse"):
        backward(q, k, v, out, lse.astype(jnp.bfloat16), dout, index, **kw)
    with pytest.raises(ValueError, match="dout"):
        backward(q, k, v, out, lse, dout[:, :64], index, **kw)
    with pytest.raises(ValueError, match="index"):
        backward(q, k, v, out, lse, dout, mask_to_block_index(jnp.ones((1, 1, 2, 2), bool)), **kw)
    with pytest.raises(ValueError, match="float32"):
        backward(*(x.astype(jnp.float32) for x in (q, k, v, out)), lse, dout.astype(jnp.float32), index, **kw)


@pytest.mark.parametrize("seq_q, seq_k, head_dim", [(1027, 1001, 128), (1024, 1000, 64)])
def test_fused_kernel_lowers_for_cuda(seq_q, seq_k, head_dim):
    """The real Mosaic GPU lowering (no GPU needed) of the fused kernel, whose TMA reduce
    stores interpret mode cannot run; it also checks the shared memory against the 227 KB
    of a Hopper CTA (head_dim 128 needs 226 KB)."""
    q = jax.ShapeDtypeStruct((1, seq_q, 2, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, seq_k, 2, head_dim), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((1, 2, seq_q), jnp.float32)
    index = mask_to_block_index(jnp.ones((1, 2, num_blocks(seq_q, 128), num_blocks(seq_k, 64)), bool))
    fn = lambda q, k, v, o, l, do, i: backward(q, k, v, o, l, do, i, block_q=128, block_k=64, sm_scale=0.125,
                                               fused=True)
    text = jax.jit(fn).trace(q, k, k, q, lse, q, index).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_unsupported_reason_names_the_problem():
    q = jnp.zeros((1, 100, 1, 64), jnp.bfloat16)
    k = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    assert unsupported_reason(q, k, 128, 64) is None  # any length
    assert "head_dim" in unsupported_reason(jnp.zeros((1, 128, 1, 96), jnp.bfloat16), k, 128, 64)
    assert "mask blocks" in unsupported_reason(k, k, 256, 64)
    assert unsupported_reason(k, k, 128, 64) is None


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, dtype", [(128, jnp.bfloat16), (64, jnp.float16)])
def test_gpu_matches_reference_n8192(rng, head_dim, dtype):
    _check_against_reference(rng, 1, 8192, 8192, 12, head_dim, dtype, 128, 64, 0.3, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True, None])
def test_gpu_ragged_matches_reference(rng, fused):
    _check_against_reference(rng, 2, 1001, 773, 4, 128, jnp.bfloat16, 128, 64, 0.5, interpret=False,
                             poison_empty_column=True, fused=fused)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_matches_xla_backend_n32760_sparse(rng, fused):
    """N=32760 (ragged: 255.9 q blocks), 95% sparse: against the jnp block-sparse backward."""
    q, k, v, dout = _inputs(rng, 1, 32760, 32760, 12, 128, jnp.bfloat16)
    nq, nk = num_blocks(32760, 128), num_blocks(32760, 64)
    mask = jnp.asarray(rng.random((1, 12, nq, nk)) < 0.05)
    index = mask_to_block_index(mask)
    scale = default_sm_scale(128)
    out, lse = xla.forward(q, k, v, index, block_q=128, block_k=64, sm_scale=scale)
    want = xla.backward(q, k, v, out, lse, dout, index, block_q=128, block_k=64, sm_scale=scale)
    got = backward(q, k, v, out, lse, dout, index, block_q=128, block_k=64, sm_scale=scale, fused=fused)
    for g, w in zip(got, want):
        assert rel_l2(g, w) < 1e-2


@pytest.mark.gpu
def test_gpu_auto_under_vmap_matches_each_mask(rng):
    """vmap over a dense and a sparse mask (a length whose dQ slice fits: the fused kernel for
    both), each result as the split path gives it alone."""
    q, k, v, dout = (jnp.stack([x, x]) for x in _inputs(rng, 1, 1024, 1024, 2, 128, jnp.bfloat16))
    masks = jnp.stack([_mask_with_edge_cases(rng, 1, 2, 8, 16, d) for d in (0.9, 0.05)])
    kw = dict(block_q=128, block_k=64, sm_scale=default_sm_scale(128))

    def grads(q, k, v, dout, mask, fused=None):
        out, lse = reference_attention_with_lse(q, k, v, mask)
        return backward(q, k, v, out, lse, dout, mask_to_block_index(mask), fused=fused, **kw)

    got = jax.jit(jax.vmap(grads))(q, k, v, dout, masks)
    for i in range(2):
        want = grads(q[i], k[i], v[i], dout[i], masks[i], fused=False)
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert rel_l2(g[i], w) < 1e-2, (i, name)
