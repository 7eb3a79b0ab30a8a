"""Fused block selection (`pallas_kernels.triton`, via `predict_block_index`) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracles import check_lists, near_p_boundary, numpy_rule_mask, repeated_blocks
from pallas_kernels import block_index_to_mask, block_index_to_mask_transposed, mask_to_block_index, xla
from pallas_kernels.triton.block_select import padded_blocks
from pallas_kernels.dispatch import resolve_backend
from sparge_jax import SparseConfig, predict_mask
from sparge_jax.masks import diagonal_blocks, pooled_scores, predict_block_index
from sparge_jax.masks.sparge import _fused_selection

predict = jax.jit(predict_block_index, static_argnums=2)
# The fused kernels run interpreted (`fused`): a CPU test. On a GPU machine the emulation would
# run as GPU ops; the real kernels are the `gpu` tests below.
on_cpu = pytest.mark.cpu("Pallas interpret mode")


def fused(**fields) -> SparseConfig:
    """A config whose masks go through the fused kernels in interpret mode."""
    return SparseConfig(backend="mosaic_gpu", interpret=True, **fields)


def check_index(index, mask):
    """All four lists of `index` are those of the bool mask `(batch, heads, nq, nk)`."""
    check_lists(mask, np.asarray(index.kv_indices), np.asarray(index.kv_counts))
    check_lists(np.swapaxes(mask, -1, -2), np.asarray(index.q_indices), np.asarray(index.q_counts))


def with_forced_blocks(rule_mask, cfg: SparseConfig, seq: int):
    """A copy of the bool rule mask with the config's forced blocks (first k block, diagonal) added."""
    want = rule_mask.copy()
    if cfg.method.keep_first:
        want[..., 0] = True
    if cfg.method.keep_diagonal:
        want |= diagonal_blocks(seq, cfg.kernel.block_q, cfg.kernel.block_k)
    return want


def expected_mask(q, k, cfg: SparseConfig):
    """NumPy model of the config's mask on the library's pooled scores, and whether a Top-p
    prefix mass lies within float rounding of p (then a row may keep one block more or less)."""
    scores = np.asarray(pooled_scores(q, k, block_q=cfg.kernel.block_q, block_k=cfg.kernel.block_k, sm_scale=cfg.kernel.sm_scale))
    heads = q.shape[2]
    topk = cfg.method.topk if cfg.method.rule != "topp" else None
    topp = cfg.method.topp if cfg.method.rule != "topk" else None
    want = with_forced_blocks(numpy_rule_mask(scores, k=topk, p=topp), cfg, q.shape[1])
    boundary = topp is not None and near_p_boundary(scores, np.broadcast_to(topp, (heads,)))
    return want, boundary


@pytest.mark.parametrize("seq_q,seq_k,head_dim,fields", [
    (1000, 1000, 16, dict(rule="hybrid", topk=0.2, topp=0.7)),
    (300, 300, 64, dict(rule="topk", topk=(0.1, 0.45), keep_first=True, keep_diagonal=True)),
    (97, 1000, 16, dict(rule="topp", topp=(0.3, 0.85), block_k=32)),
    (1025, 63, 32, dict(rule="hybrid", topk=0.5, topp=0.9, keep_first=True, sm_scale=0.3)),
    (700, 700, 16, dict(rule="hybrid", topk=0.05, topp=0.5, block_q=64, block_k=8, keep_diagonal=True)),
])
@on_cpu
def test_fused_lists_match_numpy(rng, seq_q, seq_k, head_dim, fields):
    """Ragged lengths (tail blocks, padded block counts), per-head fractions, every rule and
    the forced blocks: the four lists equal the NumPy model's."""
    q = jnp.asarray(rng.standard_normal((2, seq_q, 2, head_dim)) * 2.0, jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, seq_k, 2, head_dim)) * 2.0, jnp.bfloat16)
    cfg = fused(**fields)
    assert _fused_selection(q, k, cfg) is not None
    index = predict(q, k, cfg)
    want, boundary = expected_mask(q, k, cfg)
    if boundary:
        pytest.skip("a Top-p prefix mass within float rounding of p for this draw")
    assert want.any()
    check_index(index, want)


@pytest.mark.parametrize("rule", ["topk", "topp", "hybrid"])
@on_cpu
def test_identical_blocks_tie_like_a_stable_sort(rng, rule):
    """Copies of a k block score exactly equal; the lower index wins, as in `predict_mask`."""
    q = jnp.asarray(repeated_blocks(rng, 8 * 32, 32, [(1, 0), (5, 0), (6, 3)]), jnp.bfloat16)
    k = jnp.asarray(repeated_blocks(rng, 16 * 16, 16, [(2, 0), (5, 0), (9, 0), (7, 3), (12, 3), (13, 4)]),
                    jnp.bfloat16)
    for topk, topp in [(0.1, 0.3), (0.2, 0.6), (0.35, 0.9)]:
        cfg = fused(rule=rule, topk=topk, topp=topp, block_q=32, block_k=16)
        want, boundary = expected_mask(q, k, cfg)
        if boundary:
            continue
        check_index(predict(q, k, cfg), want)


@on_cpu
def test_fused_equals_the_xla_path(rng):
    q = jnp.asarray(rng.standard_normal((1, 2000, 3, 32)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((1, 2000, 3, 32)), jnp.bfloat16)
    cfg = fused(topk=0.15, topp=0.6, keep_first=True)
    _, boundary = expected_mask(q, k, cfg)
    if boundary:
        pytest.skip("a Top-p prefix mass within float rounding of p for this draw")
    got = predict(q, k, cfg)
    want = mask_to_block_index(predict_mask(q, k, SparseConfig(topk=0.15, topp=0.6, keep_first=True)))
    for name, a, b in zip(got._fields, got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_xla_path_where_the_kernels_do_not_apply(rng):
    """Configs the kernels do not take go through the XLA path and give its lists."""
    x = lambda seq, d=16: jnp.asarray(rng.standard_normal((1, seq, 2, d)), jnp.bfloat16)
    q = x(256)
    assert padded_blocks(300) == 512 and padded_blocks(1) == 16 and padded_blocks(17) == 32
    assert _fused_selection(q, q, fused()) is not None
    assert _fused_selection(q, x(64 * 129), fused()) is None  # 129 k blocks: longer than MAX_K_BLOCKS
    assert _fused_selection(x(128 * 257), q, fused()) is None  # 257 q blocks: longer than MAX_Q_BLOCKS
    assert _fused_selection(q, q, fused(sim_threshold=0.5)) is None  # the guard reads q, k again
    assert _fused_selection(q, q, fused(block_k=48)) is None  # not a power of two
    assert _fused_selection(q, q, SparseConfig(backend="xla", interpret=True)) is None
    on_gpu = jax.default_backend() == "gpu"  # "auto": the fused kernels on a GPU, xla elsewhere
    assert (_fused_selection(q, q, SparseConfig(interpret=True)) is not None) == on_gpu
    with jax.default_device(jax.devices("cpu")[0]):  # "auto" follows a device pinned to the CPU
        assert _fused_selection(q, q, SparseConfig()) is None
        assert resolve_backend("auto", q, q, 128, 64, False) is xla.BACKEND
    q24 = x(300, d=24)
    assert _fused_selection(q24, q24, fused()) is None  # head_dim not a power of two
    cfg = fused(topk=0.2, topp=0.6)
    got = predict(q24, q24, cfg)
    want = mask_to_block_index(predict_mask(q24, q24, cfg))
    for name, a, b in zip(got._fields, got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("predict_fn", [predict_block_index, predict_mask])
@pytest.mark.parametrize("make_k,message", [
    (lambda q: q[:, :, :1], "k must have shape"),  # heads differ: would broadcast silently
    (lambda q: q[..., :8], "k must have shape"),  # head_dim differs
    (lambda q: jnp.concatenate([q, q]), "k must have shape"),  # batch differs
    (lambda q: q.astype(jnp.float16), "k must have the dtype of q"),
    (lambda q: q[0], "k must have rank 4"),
])
def test_bad_qk_raise_naming_the_argument(rng, predict_fn, make_k, message):
    q = jnp.asarray(rng.standard_normal((1, 256, 2, 16)), jnp.bfloat16)
    with pytest.raises(ValueError, match=message):
        predict_fn(q, make_k(q), fused())
    with pytest.raises(ValueError, match="q must be bfloat16, float16 or float32"):
        predict_fn(q.astype(jnp.int32), q.astype(jnp.int32), fused())


def test_keep_diagonal_needs_self_attention(rng):
    q = jnp.asarray(rng.standard_normal((1, 256, 1, 16)), jnp.bfloat16)
    with pytest.raises(ValueError, match="seq_q == seq_k"):
        predict_block_index(q, q[:, :200], fused(keep_diagonal=True))


def float64_scores(q, k, block_q: int, block_k: int) -> np.ndarray:
    """float64 `softmax(pool(q) pool(k)^T / sqrt(d))` for lengths that are whole blocks: `(batch, heads, nq, nk)`."""
    pool = lambda x, blk: np.asarray(x, np.float64).reshape(x.shape[0], -1, blk, *x.shape[2:]).mean(2)
    logits = np.einsum("bihd,bjhd->bhij", pool(q, block_q), pool(k, block_k)) / np.sqrt(q.shape[-1])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ambiguous_rows(scores, mask_rule, p, rel_gap=1e-5, mass_tol=1e-5) -> np.ndarray:
    """Rows whose selection float32 rounding may change: the last kept and the first dropped
    score of the sorted row within `rel_gap`, or a prefix mass within `mass_tol` of p."""
    s = -np.sort(-scores, axis=-1)
    n = mask_rule.sum(-1)
    at = lambda i: np.take_along_axis(s, np.minimum(i, s.shape[-1] - 1)[..., None], -1)[..., 0]
    close_cut = (at(n - 1) - at(n)) < rel_gap * at(n - 1)
    mass_before = np.cumsum(s, -1) - s
    return close_cut | (np.abs(mass_before - p) < mass_tol).any(-1)


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [dict(), dict(topk=0.05, topp=0.5, keep_first=True, keep_diagonal=True)])
def test_gpu_fused_lists_at_8192_tokens(fields):
    """On the GPU at N=8192 (64 x 128 blocks): the fused kernels' four lists agree with each
    other and with the NumPy model on float64 scores, except in rows where float32 rounding
    may move the cut (near-equal scores at the cut, or a prefix mass at p)."""
    kq, kk = jax.random.split(jax.random.key(7))
    q = jax.random.normal(kq, (1, 8192, 12, 128), jnp.bfloat16)
    k = jax.random.normal(kk, (1, 8192, 12, 128), jnp.bfloat16)
    cfg = SparseConfig(**fields)
    assert _fused_selection(q, k, cfg) is not None
    index = predict(q, k, cfg)
    mask = np.asarray(block_index_to_mask(index))
    np.testing.assert_array_equal(np.asarray(block_index_to_mask_transposed(index)), mask)
    check_index(index, mask)
    scores = float64_scores(q, k, cfg.kernel.block_q, cfg.kernel.block_k)
    rule = numpy_rule_mask(scores, k=cfg.method.topk, p=cfg.method.topp)
    want = with_forced_blocks(rule, cfg, 8192)
    unclear = ambiguous_rows(scores, rule, cfg.method.topp)
    differ = (mask != want).any(-1)
    assert not (differ & ~unclear).any(), f"{(differ & ~unclear).sum()} rows differ with a clear cut"
    assert unclear.mean() < 0.5 and 0.05 < mask.mean() < 0.95
