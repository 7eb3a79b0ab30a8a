"""Block-mask rules: pooled scores, Top-k, Top-p, SpargeAttention2's hybrid, guards.

All functions are jit-able with static shapes. Layout of q/k: `(batch, seq, heads,
head_dim)`; pooled scores and block masks: `(batch, heads, q_blocks, k_blocks)`.
Per-head parameters are floats or arrays of shape `(heads,)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.backend import BlockSelection
from pallas_kernels.block_index import BlockIndex, mask_to_block_index
from pallas_kernels.blocks import default_sm_scale, num_blocks, to_blocks
from pallas_kernels.dispatch import resolve_selection
from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.method_config import Sparge2Method, check_fraction
from sparge_jax.validation import check_qkv

# float32 slack when turning a fraction into a block count: 0.1 * 50 must give 5, not 6.
_COUNT_SLACK = 1e-5


def _block_means(x: jax.Array, block: int) -> jax.Array:
    """Mean of each block's real tokens: `(batch, seq, heads, d)` -> fp32 `(batch, n_blocks, heads, d)`.

    The whole blocks are a free reshape of the leading `seq // block * block` tokens; a ragged
    tail block is summed apart and divided by its real token count. Both sums read x in its
    own dtype and accumulate in fp32 (`sum(..., dtype=float32)`). On GPU this beats zero-padding
    x to whole blocks first (`to_blocks`): 0.075 ms against 0.105 ms for q and k of t2v-1.3B
    480p on an H200 (`benchmarks/floor_kernels.py --pieces block_means`), the same values.
    XLA's CPU backend copies the sliced part before reducing it (1.2-1.4x slower than the pad
    there; CPU is not a target).
    """
    b, s, h, d = x.shape
    full, tail = divmod(s, block)
    means = []
    if full:
        means.append(jnp.sum(x[:, :full * block].reshape(b, full, block, h, d), axis=2, dtype=jnp.float32) / block)
    if tail:
        means.append(jnp.sum(x[:, full * block:], axis=1, keepdims=True, dtype=jnp.float32) / tail)
    return jnp.concatenate(means, axis=1)


def pool_blocks(x: jax.Array, block: int) -> jax.Array:
    """Mean of each block's real tokens: `(batch, seq, heads, d)` -> fp32 `(batch, heads, n_blocks, d)`.

    The tail block is averaged over its real tokens only.
    """
    return _block_means(x, block).transpose(0, 2, 1, 3)


def pooled_logits(q, k, *, block_q: int, block_k: int, sm_scale: float | None = None) -> jax.Array:
    """`pool(Q) pool(K)^T * sm_scale`: fp32 `(batch, heads, q_blocks, k_blocks)`."""
    scale = default_sm_scale(q.shape[-1]) if sm_scale is None else sm_scale
    return jnp.einsum("bihd,bjhd->bhij", _block_means(q, block_q), _block_means(k, block_k)) * scale


def finite_scores(logits: jax.Array, excluded_k: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(scores, nonfinite): the row softmax over the finite pooled logits only (0 elsewhere;
    a row with none is all 0), and the bool mask of NaN/inf logits. A block pair whose
    pooled logit is not finite holds a NaN/inf token; the rules keep it (`nonfinite` is
    or-ed into the mask) so that, as in dense attention, the bad value reaches the rows
    that attend to it instead of silently emptying the row.

    excluded_k: bool `(batch, heads, k_blocks)` or None; those columns are left out of the
    softmax too (score 0), unless every column of the row is (then they count as usual).
    """
    nonfinite = ~jnp.isfinite(logits)
    dropped = nonfinite
    if excluded_k is not None:
        all_excluded = jnp.all(excluded_k, axis=-1)[..., None, None]
        dropped = dropped | (excluded_k[..., None, :] & ~all_excluded)
    scores = jax.nn.softmax(jnp.where(dropped, -jnp.inf, logits), axis=-1)
    return jnp.where(jnp.all(dropped, axis=-1, keepdims=True), 0.0, scores), nonfinite


def pooled_scores(q, k, *, block_q: int, block_k: int, sm_scale: float | None = None,
                  excluded_k: jax.Array | None = None) -> jax.Array:
    """`softmax(pool(Q) pool(K)^T * sm_scale)` per row: fp32 `(batch, heads, q_blocks, k_blocks)`,
    over the finite logits and without the `excluded_k` columns (see `finite_scores`)."""
    logits = pooled_logits(q, k, block_q=block_q, block_k=block_k, sm_scale=sm_scale)
    return finite_scores(logits, excluded_k)[0]


def _per_head_values(name: str, value, heads: int) -> np.ndarray:
    """A concrete float or `(heads,)` parameter, range-checked -> fp32 NumPy `(heads,)`."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape not in ((), (heads,)):
        raise ValueError(f"{name} must be a float or have shape (heads,) = ({heads},); got shape {arr.shape}")
    check_fraction(name, tuple(arr.reshape(-1).tolist()))
    return np.broadcast_to(arr.astype(np.float32), (heads,))


def _per_head(name: str, value, heads: int) -> jax.Array:
    """A float or `(heads,)` parameter -> fp32 `(1, heads, 1, 1)`; range-checked when concrete."""
    if not isinstance(value, jax.core.Tracer):
        value = _per_head_values(name, value, heads)
    value = jnp.asarray(value, jnp.float32)
    return jnp.broadcast_to(value, (heads,)).reshape(1, heads, 1, 1)


def _topk_count(frac, nk: int, rounding: str = "ceil"):
    """Top-k's kept count in [1, nk], int32: fp32 `frac` of any shape, NumPy or jnp.

    "ceil": ceil(frac * nk) (with float32 slack, so 0.1 * 50 gives 5); "floor": the
    float32 product truncated, as SpargeAttn's `(topk * K).to(int64)` (0.25 * 10 gives 2).
    """
    xp = np if isinstance(frac, np.ndarray) else jnp
    if rounding == "floor":
        count = xp.floor(frac * np.float32(nk))
    else:
        count = xp.ceil(frac * np.float32(nk) - np.float32(_COUNT_SLACK))
    return xp.clip(count, 1, nk).astype(np.int32)


def _prefix_of_descending_order(scores: jax.Array, k=None, p=None, *, topk_count: str = "ceil",
                                topp_boundary: str = "include") -> jax.Array:
    """Top-k, Top-p or (both given) their union, from one sort per row.

    Both rules keep a prefix of the same descending order of each row (ties broken by
    the lower index, as a stable sort does), so their union is the prefix of length
    max(n_topk, n_topp). The prefix becomes a mask without inverting the permutation:
    with `thr` the score of its final entry, an entry is in it iff `score > thr`, or
    `score == thr` and fewer than the prefix's remaining places are taken by equal scores
    of lower index. Only the scores are sorted, with no index payload (on an H100, t2v-14B
    720p's 40 x 591 rows of 1182 k blocks: Top-k selection and lists 1.85 ms a layer against
    2.60 with the (score, index) sort and the sorted lists before them; 1.3B 480p: 0.080
    against 0.108 ms; benchmarks/floor_kernels.py, piece select_5%). `topk_count` and
    `topp_boundary` are `SparseConfig`'s fields of those names.
    """
    nk = scores.shape[-1]
    axis = scores.ndim - 1
    idx = jax.lax.broadcasted_iota(jnp.int32, scores.shape, axis)
    sorted_scores = -jax.lax.sort(-scores, dimension=axis, is_stable=False)
    n = jnp.ones(scores.shape[:-1] + (1,), jnp.int32)
    if k is not None:
        n = jnp.maximum(n, _topk_count(_per_head("topk", k, scores.shape[1]), nk, topk_count))
    if p is not None:
        frac = _per_head("topp", p, scores.shape[1])
        cdf = jnp.cumsum(sorted_scores, axis=-1)
        if topp_boundary == "exclude":
            kept = cdf <= frac
        else:
            kept = cdf - sorted_scores < frac
        n = jnp.maximum(n, jnp.sum(kept, axis=-1, keepdims=True, dtype=jnp.int32))
    thr = jnp.max(jnp.where(idx == n - 1, sorted_scores, -jnp.inf), axis=-1, keepdims=True)  # slot n-1
    above, tied = scores > thr, scores == thr
    places = n - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)  # left for entries equal to thr
    return above | (tied & (jnp.cumsum(tied, axis=-1, dtype=jnp.int32) <= places))


def topk_mask(scores: jax.Array, k) -> jax.Array:
    """Keep the ceil(k * k_blocks) largest pooled scores of each row (ties: lower index first).

    Top-k alone fails on near-uniform rows: a fixed number of blocks then holds only a
    small part of the attention mass, so the output loses most of its information.
    """
    return _prefix_of_descending_order(scores, k=k)


def topp_mask(scores: jax.Array, p) -> jax.Array:
    """Keep the fewest blocks whose cumulative pooled probability reaches p (at least one).

    Rows of `scores` must sum to 1. In descending order (ties: lower index first), the
    kept prefix is as long as the number of entries whose mass before them is below p.
    Top-p alone fails on peaked rows: when an attention sink holds most of the mass, p
    is reached with very few blocks and the smaller but informative blocks are dropped.
    """
    return _prefix_of_descending_order(scores, p=p)


def hybrid_mask(scores: jax.Array, k, p) -> jax.Array:
    """SpargeAttention2's hybrid rule: the union of the Top-k and Top-p sets of each row.

    Each set covers the other's failure: on near-uniform rows Top-p keeps enough blocks
    to hold mass p where Top-k's fixed count would hold too little; on peaked rows
    Top-k keeps a floor of blocks where one sink block alone would satisfy Top-p.
    Both are prefixes of one descending order, so one sort serves both.
    """
    return _prefix_of_descending_order(scores, k=k, p=p)


def block_self_similarity(x: jax.Array, block: int) -> jax.Array:
    """Mean cosine similarity of each block's real tokens to the block mean: fp32 `(batch, heads, n_blocks)`."""
    s = x.shape[1]
    n = num_blocks(s, block)
    mean = pool_blocks(x, block)
    xb = to_blocks(x.astype(jnp.float32), block).transpose(0, 3, 1, 2, 4)
    eps = 1e-6
    cos = jnp.einsum("bhntd,bhnd->bhnt", xb, mean) / (
        (jnp.linalg.norm(xb, axis=-1) + eps) * (jnp.linalg.norm(mean, axis=-1)[..., None] + eps)
    )
    real = (jnp.arange(n * block) < s).reshape(n, block)
    return jnp.sum(jnp.where(real, cos, 0.0), axis=-1) / real.sum(axis=-1)


def mean_pairwise_cosine(x: jax.Array, block: int) -> jax.Array:
    """Mean cosine similarity over all ordered token pairs (self-pairs included) of each block.

    `(batch, seq, heads, d)` -> fp32 `(batch, heads, n_blocks)`. Equal to the squared norm
    of the mean unit vector of the block's real tokens.
    """
    x = x.astype(jnp.float32)
    unit = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    mean_unit = pool_blocks(unit, block)
    return jnp.sum(mean_unit * mean_unit, axis=-1)


def rough_blocks(x: jax.Array, block: int, threshold: float, *, similarity: str = "to_mean",
                 tail_block: str = "score") -> jax.Array:
    """Blocks that cannot be summarised by their mean: bool `(batch, heads, n_blocks)`.

    x: `(batch, seq, heads, d)`. similarity "to_mean": `block_self_similarity < threshold`;
    "pairwise": `mean_pairwise_cosine <= threshold` (SpargeAttn). tail_block
    "never_similar" marks a ragged last block rough whatever its tokens.
    """
    if similarity == "pairwise":
        rough = mean_pairwise_cosine(x, block) <= threshold
    else:
        rough = block_self_similarity(x, block) < threshold
    if tail_block == "never_similar" and x.shape[1] % block:
        rough = rough.at[..., -1].set(True)
    return rough


def sparge2_parts(config: SparseConfig) -> tuple[Sparge2Method, KernelConfig]:
    """(SpargeAttention2 rule, kernel) of `config`; ValueError when its method is another one."""
    if not isinstance(config, SparseConfig):
        raise ValueError(f"config must be a sparge_jax.config.SparseConfig; got {config!r}")
    if not isinstance(config.method, Sparge2Method):
        raise ValueError(f"config.method={type(config.method).__name__}: this function predicts SpargeAttention2 "
                         "masks only; other methods plan through sparge_jax.masks.make_plan / "
                         "sparge_jax.methods.method_attention")
    return config.method, config.kernel


def _config_rough_blocks(q, k, rule: Sparge2Method, kernel: KernelConfig) -> tuple[jax.Array, jax.Array]:
    """`rough_blocks` of q and of k (mean-centred first when `rule.smooth_k`) for `rule`."""
    if rule.smooth_k:
        k = k.astype(jnp.float32)
        k = k - jnp.mean(k, axis=1, keepdims=True)
    kw = dict(similarity=rule.similarity, tail_block=rule.tail_block)
    return (rough_blocks(q, kernel.block_q, rule.sim_threshold, **kw),
            rough_blocks(k, kernel.block_k, rule.sim_threshold, **kw))


def similarity_guard(mask: jax.Array, q, k, *, block_q: int, block_k: int, threshold: float) -> jax.Array:
    """SpargeAttn's guard: q blocks (rows) and k blocks (columns) that are not
    self-similar cannot be summarised by their mean, so they are always computed."""
    rough_q = rough_blocks(q, block_q, threshold)
    rough_k = rough_blocks(k, block_k, threshold)
    return mask | rough_q[..., :, None] | rough_k[..., None, :]


def diagonal_blocks(seq: int, block_q: int, block_k: int) -> np.ndarray:
    """Bool `(q_blocks, k_blocks)`: k blocks overlapping each q block's own token range."""
    nq, nk = num_blocks(seq, block_q), num_blocks(seq, block_k)
    starts = np.arange(nq) * block_q
    ends = np.minimum(starts + block_q, seq)
    k_starts = np.arange(nk) * block_k
    return (k_starts[None, :] < ends[:, None]) & (k_starts[None, :] + block_k > starts[:, None])


def _check_diagonal(q, k) -> None:
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"keep_diagonal needs self-attention (seq_q == seq_k); got q seq {q.shape[1]}, k seq {k.shape[1]}"
        )


def predict_mask(q: jax.Array, k: jax.Array, config: SparseConfig) -> jax.Array:
    """The block mask `config` selects for these q, k: bool `(batch, heads, q_blocks, k_blocks)`.
    Block pairs with a NaN/inf pooled logit are always kept (see `finite_scores`). `config.method`
    must be a `Sparge2Method` (the other methods' masks come from `sparge_jax.masks.make_plan`)."""
    check_qkv(q, k)
    rule, kernel = sparge2_parts(config)
    excluded_k = None
    if rule.sim_threshold is not None:
        rough_q, rough_k = _config_rough_blocks(q, k, rule, kernel)
        excluded_k = rough_k if rule.similarity == "pairwise" else None
    logits = pooled_logits(q, k, block_q=kernel.block_q, block_k=kernel.block_k, sm_scale=kernel.sm_scale)
    scores, nonfinite = finite_scores(logits, excluded_k)
    mask = _prefix_of_descending_order(
        scores, k=None if rule.rule == "topp" else rule.topk, p=None if rule.rule == "topk" else rule.topp,
        topk_count=rule.topk_count, topp_boundary=rule.topp_boundary)
    mask = mask | nonfinite
    if rule.keep_first:
        mask = mask.at[..., 0].set(True)
    if rule.keep_diagonal:
        _check_diagonal(q, k)
        mask = mask | diagonal_blocks(q.shape[1], kernel.block_q, kernel.block_k)
    if rule.sim_threshold is not None:
        mask = mask | rough_q[..., :, None] | rough_k[..., None, :]
    return mask


def _fused_selection(q, k, config: SparseConfig) -> BlockSelection | None:
    """The fused block-selection kernels `predict_block_index` takes, or None for the XLA path.

    The dispatcher answers (`pallas_kernels.dispatch.resolve_selection`): the selection of
    the backend the kernel config names, where its kernels take the shapes and block sizes
    (on a GPU that is `pallas_kernels.triton`: rows of at most `MAX_K_BLOCKS` k blocks,
    power-of-two blocks and head_dim; interpreted when `kernel.interpret`). Rules with the
    similarity guard (which reads q and k again) or another Top-p boundary rule take the
    XLA path.
    """
    rule, kernel = sparge2_parts(config)
    if rule.sim_threshold is not None or rule.topp_boundary != "include":
        return None
    return resolve_selection(kernel.backend, q, k, kernel.block_q, kernel.block_k, kernel.interpret)


def _fused_block_index(selection: BlockSelection, q, k, config: SparseConfig) -> BlockIndex:
    """`mask_to_block_index(predict_mask(q, k, config))` by the fused kernels of `selection`."""
    rule, kernel = sparge2_parts(config)
    h, d = q.shape[2], q.shape[3]
    nk = num_blocks(k.shape[1], kernel.block_k)
    # Per-head parameters are config constants: static in the kernel, they cost no device work.
    n_min, topp = (1,) * h, (0.0,) * h
    if rule.rule != "topp":
        n_min = tuple(int(n) for n in _topk_count(_per_head_values("topk", rule.topk, h), nk, rule.topk_count))
    if rule.rule != "topk":
        topp = tuple(float(p) for p in _per_head_values("topp", rule.topp, h))
    if rule.keep_diagonal:
        _check_diagonal(q, k)
    scale = default_sm_scale(d) if kernel.sm_scale is None else kernel.sm_scale
    return selection.select_blocks(
        q, k, n_min=n_min, topp=topp, block_q=kernel.block_q, block_k=kernel.block_k, sm_scale=scale,
        keep_first=rule.keep_first, keep_diagonal=rule.keep_diagonal, interpret=kernel.interpret,
    )


def predict_block_index(q: jax.Array, k: jax.Array, config: SparseConfig) -> BlockIndex:
    """The kept-block lists of the mask `config` selects: `mask_to_block_index(predict_mask(q, k, config))`.

    On the GPU, for short rows (at most `pallas_kernels.triton.block_select.MAX_K_BLOCKS` k
    blocks, e.g. N <= 8192 tokens at the default 64-token k blocks), three fused kernels
    (pooling, selection with the kv lists, transposed lists) replace ~18 small XLA
    kernels; elsewhere this is the XLA path. Both select the same blocks: scores that tie
    exactly are broken the same way, and only a row whose cut lies within float32
    rounding (near-equal scores at the cut, or a prefix mass at topp) can differ by one
    block. Under jit the transposed (backward) lists are dropped when only the forward
    lists are used.
    """
    check_qkv(q, k)
    selection = _fused_selection(q, k, config)
    if selection is not None:
        return _fused_block_index(selection, q, k, config)
    return mask_to_block_index(predict_mask(q, k, config))


def sparsity(mask: jax.Array, *, seq_q: int | None = None, seq_k: int | None = None,
             block_q: int | None = None, block_k: int | None = None) -> jax.Array:
    """Fraction of skipped blocks of a `(batch, heads, q_blocks, k_blocks)` mask.

    With `seq_q`/`block_q` (and `seq_k`/`block_k`) given, only the blocks that hold real
    tokens are counted, so a mask padded to more blocks than the sequence needs (as
    kernels with larger tiles produce) reports the sparsity of the real problem.
    """
    if seq_q is not None and block_q is not None:
        mask = mask[..., : num_blocks(seq_q, block_q), :]
    if seq_k is not None and block_k is not None:
        mask = mask[..., : num_blocks(seq_k, block_k)]
    return 1.0 - jnp.mean(mask.astype(jnp.float32))
