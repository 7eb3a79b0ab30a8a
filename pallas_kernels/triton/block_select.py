"""Fused mask prediction on the GPU (Pallas Triton): q, k -> kept-block lists in three kernels.

For short rows (few k blocks) the XLA path of mask prediction is a chain of ~18 small
kernels (two pooling reductions, score matmul, softmax, three sorts, cumsums, list
building) whose launches cost more than their work. Here three kernels do it all:

* `block_sums`: per (batch, head, block), the fp32 token sums of one q block or one k
  block (one launch for both tensors; tail blocks masked in-kernel, padded blocks zero);
* `select_rows`: per (batch, head, `ROWS_PER_PROGRAM` q blocks), the pooled scores
  `softmax(mean(q) mean(k)^T * sm_scale)` of each row (a matmul of the block sums,
  divided by the token counts; of at least 16 rows, the matmul's least M), the kept
  set, the forced blocks (first k block, diagonal), and the rows' kept lists, counts and
  mask;
* `transpose_lists`: per (batch, head, `COLUMNS_PER_PROGRAM` k blocks), the q blocks
  keeping each k block, from that mask (the backward's lists).

Nothing is sorted. Both rules keep a prefix of the row's descending order (ties: lower
index first), so a row's kept set follows from its cut value: Top-k's is the smallest v
with fewer than Top-k's count of entries above it, Top-p's the smallest v whose entries
above it sum to less than Top-p's mass. Both are found by bisection on the fp32 bit
patterns of the scores; entries equal to the cut are taken in index order up to the
prefix length, and a list is written by scattering each kept index to its running count.

Padded k columns (past the real blocks, up to `padded_blocks(nk)`) get zero probability
and are never kept; padded q rows keep nothing. Lists follow
`pallas_kernels.block_index`: ascending, padded by repeating the last kept index (0 for
an empty list), int32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MAX_K_BLOCKS = 128  # longest padded row (k blocks) select_rows takes (measured on the H100)
MAX_Q_BLOCKS = 256  # longest padded column (q blocks) transpose_lists takes
ROWS_PER_PROGRAM = 8  # q blocks per select_rows program (10.0 us at N=8192 on the H100, 16: 11.4)
_MATMUL_ROWS = 16  # the least M of a Triton matmul: a program of fewer rows scores 16
COLUMNS_PER_PROGRAM = 8  # k blocks per transpose_lists program
NUM_WARPS = 8  # warps per select_rows / transpose_lists program
SUM_WARPS = 4  # warps per block_sums program
_SUM_TILE = 16384  # most elements block_sums loads at once
# The score matmul: three TF32 tensor-core passes, about fp32's accuracy (the XLA path's
# einsum runs at the GPU's default, one TF32 pass). With fp32 FMAs select_rows took 20 us
# at N=8192 on the H100, with this 11.4 us (16 q blocks per program).
_DOT_ALGORITHM = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
_ONE_BITS = 0x3F800000  # bit pattern of 1.0f: every softmax score lies in [0, 1]
_HALVINGS = 30  # 2**30 > _ONE_BITS + 1


def padded_blocks(n: int) -> int:
    """The power of two >= n (and >= 16) that the kernels' tiles use for n blocks."""
    return max(16, 1 << (n - 1).bit_length())


def is_power_of_two(n: int) -> bool:
    """Whether n > 0 is a power of two (the kernels' block sizes and head_dim must be)."""
    return n > 0 and n & (n - 1) == 0


def supports_head_dim(d: int) -> bool:
    """Whether the kernels take this head_dim (a power of two, loaded whole)."""
    return d >= 16 and is_power_of_two(d)


def _compiler_params(num_warps: int | None = None):
    return pltriton.CompilerParams(num_warps=num_warps or NUM_WARPS, num_stages=1)


def _block_sums_kernel(q_ref, k_ref, sq_ref, sk_ref, *, blocks: tuple):
    """One (batch, head, block) of q (first `nq_pad` grid steps) or of k. x_ref: the whole
    `(batch, seq, heads, d)` input; s_ref: the whole fp32 `(batch, heads, n_pad, d)` output."""
    b, h, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nq_pad = sq_ref.shape[2]

    def pool(x_ref, s_ref, block, i):
        seq, d = x_ref.shape[1], x_ref.shape[3]
        chunk = min(block, max(1, _SUM_TILE // d))

        def add(c, acc):
            start = i * block + c * chunk
            real = start + lax.broadcasted_iota(jnp.int32, (chunk, d), 0) < seq
            tile = pltriton.load(x_ref.at[b, pl.ds(start, chunk), h, :], mask=real, other=0,
                                 eviction_policy="evict_first")  # read once
            return acc + jnp.sum(tile.astype(jnp.float32), axis=0)

        s_ref[b, h, i, :] = lax.fori_loop(0, block // chunk, add, jnp.zeros((d,), jnp.float32))

    block_q, block_k = blocks

    @pl.when(g < nq_pad)
    def _():
        pool(q_ref, sq_ref, block_q, g)

    @pl.when(g >= nq_pad)
    def _():
        pool(k_ref, sk_ref, block_k, g - nq_pad)


def block_sums(q: jax.Array, k: jax.Array, *, block_q: int, block_k: int, interpret: bool = False):
    """fp32 token sums of every q block and k block, in one launch.

    Args:
      q: `(batch, seq_q, heads, d)`, k: `(batch, seq_k, heads, d)`; any float dtype, d a
        power of two (`supports_head_dim`).
      block_q, block_k: tokens per block (powers of two).
    Returns:
      fp32 `(batch, heads, padded_blocks(nq), d)` and `(batch, heads, padded_blocks(nk), d)`;
      the tail block sums its real tokens, blocks past the sequence are zero.
    """
    b, seq_q, h, d = q.shape
    nq_pad = padded_blocks(pl.cdiv(seq_q, block_q))
    nk_pad = padded_blocks(pl.cdiv(k.shape[1], block_k))
    return pl.pallas_call(
        functools.partial(_block_sums_kernel, blocks=(block_q, block_k)),
        grid=(b, h, nq_pad + nk_pad),
        out_shape=[jax.ShapeDtypeStruct((b, h, nq_pad, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, nk_pad, d), jnp.float32)],
        compiler_params=_compiler_params(SUM_WARPS),
        interpret=interpret,
        name="sparge_block_sums",
    )(q, k)


def _block_tokens(seq: int, block: int, start: jax.Array) -> jax.Array:
    """Real tokens of the blocks whose first token is `start` (>= 1, so padding divides by 1)."""
    return jnp.clip(seq - start, 1, block).astype(jnp.float32)


def _store_lists(idx_ref, keep: jax.Array, axis: int, first_line=0) -> jax.Array:
    """Write the kept lists of a 0/1 int32 tile `keep` along `axis` (one list per line of the
    other axis) into lines `first_line...` of idx_ref, shaped (lines, entries); returns the
    counts `(lines,)`.

    One scatter that is a permutation of each line: kept entry i goes to slot
    (kept entries up to i) - 1, dropped entry i to slot count + (dropped entries before i)
    with the value of the last kept index, which is the padding.
    """
    running = jnp.cumsum(keep, axis=axis)
    position = lax.broadcasted_iota(jnp.int32, keep.shape, axis)
    line = first_line + lax.broadcasted_iota(jnp.int32, keep.shape, 1 - axis)
    counts = jnp.sum(keep, axis=axis)
    last = jnp.max(jnp.where(keep > 0, position, 0), axis=axis)
    kept = keep > 0
    slot = jnp.where(kept, running - 1, jnp.expand_dims(counts, axis) + position - running)
    idx_ref[line, slot] = jnp.where(kept, position, jnp.expand_dims(last, axis))
    return counts


def _per_head_value(values: tuple, head: jax.Array, dtype) -> jax.Array:
    """values[head] for a static per-head tuple: a constant when all heads share one value."""
    if len(set(values)) == 1:
        return jnp.asarray(values[0], dtype)
    out = jnp.asarray(values[0], dtype)
    for i, v in enumerate(values[1:], 1):
        out = jnp.where(head == i, jnp.asarray(v, dtype), out)
    return out


def _cuts(p: jax.Array, n_min: jax.Array, topp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of fp32 `p` `(rows, n)` (values in [0, 1]): Top-k's cut, the smallest v with
    fewer than n_min entries above it, and Top-p's, the smallest v whose entries above it sum
    to less than topp. Both bisections run on the fp32 bit patterns (ordered like the
    integers for non-negative floats) in one loop, so their row reductions overlap; 30
    halvings pin each cut to an entry of the row. Returns two fp32 `(rows, 1)`."""
    def halve(_, bounds):
        lo_k, hi_k, lo_p, hi_p = bounds
        mid_k, mid_p = lo_k + (hi_k - lo_k) // 2, lo_p + (hi_p - lo_p) // 2
        above_k = p > lax.bitcast_convert_type(mid_k, jnp.float32)
        above_p = p > lax.bitcast_convert_type(mid_p, jnp.float32)
        ok_k = jnp.sum(above_k.astype(jnp.int32), axis=1, keepdims=True) < n_min
        ok_p = jnp.sum(jnp.where(above_p, p, 0.0), axis=1, keepdims=True) < topp
        return (jnp.where(ok_k, lo_k, mid_k), jnp.where(ok_k, mid_k, hi_k),
                jnp.where(ok_p, lo_p, mid_p), jnp.where(ok_p, mid_p, hi_p))

    lo, hi = jnp.full((p.shape[0], 1), -1, jnp.int32), jnp.full((p.shape[0], 1), _ONE_BITS, jnp.int32)
    _, hi_k, _, hi_p = lax.fori_loop(0, _HALVINGS, halve, (lo, hi, lo, hi))
    return lax.bitcast_convert_type(hi_k, jnp.float32), lax.bitcast_convert_type(hi_p, jnp.float32)


def _select_rows_kernel(sq_ref, sk_ref, idx_ref, cnt_ref, mask_ref, probs_ref, *, seq_q, seq_k, block_q,
                        block_k, sm_scale, n_min, topp, keep_first, keep_diagonal, interpret):
    """One (batch, head, `rows` q blocks). sq_ref `(scored, d)`: fp32 sums of the `scored`
    (>= rows: the matmul's M is at least 16) q blocks around them, sk_ref `(nk_pad, d)`;
    probs_ref `(scored, nk_pad)`: the program's scratch for their scores."""
    scored, nk_pad = probs_ref.shape
    rows = idx_ref.shape[0]
    nq, nk = pl.cdiv(seq_q, block_q), pl.cdiv(seq_k, block_k)
    first = pl.program_id(2) * rows  # the program's first q block
    first_scored = first // scored * scored
    scored_row = first_scored + lax.broadcasted_iota(jnp.int32, (scored, nk_pad), 0)
    col = lax.broadcasted_iota(jnp.int32, (scored, nk_pad), 1)
    # Interpreted (CPU), the matmul runs in fp32: XLA's CPU dot takes no TF32 algorithm.
    precision = lax.Precision.HIGHEST if interpret else _DOT_ALGORITHM
    dots = lax.dot_general(sq_ref[...], sk_ref[...], (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)
    tokens = _block_tokens(seq_q, block_q, scored_row * block_q) * _block_tokens(seq_k, block_k, col * block_k)
    logits = dots * (sm_scale / tokens)
    # NaN/inf logits (a NaN/inf token in the blocks) are scored -1: never chosen by the rules
    # below, always kept after them (like `sparge_jax.masks.finite_scores`).
    nonfinite = (col < nk) & ~jnp.isfinite(logits)
    logits = jnp.where((col < nk) & ~nonfinite, logits, -jnp.inf)
    top = jnp.max(logits, axis=1, keepdims=True)
    e = jnp.exp(logits - jnp.where(top > -jnp.inf, top, 0.0))
    total = jnp.sum(e, axis=1, keepdims=True)
    probs_ref[...] = jnp.where(nonfinite, -1.0, e / jnp.where(total > 0, total, 1.0))
    # Reloaded, the scores take the load's layout: each row within one warp, so the row
    # reductions of the bisection below need no block-wide barrier (1.7x faster than on
    # the matmul's layout). The interpreter runs stores and loads in order: no barrier there.
    if not interpret:
        pltriton.debug_barrier()
    p = probs_ref[pl.ds(first - first_scored, rows), :]
    row = first + lax.broadcasted_iota(jnp.int32, (rows, nk_pad), 0)
    col = lax.broadcasted_iota(jnp.int32, (rows, nk_pad), 1)
    real = col < nk

    head = pl.program_id(1)
    n_min = _per_head_value(n_min, head, jnp.int32)
    topp = _per_head_value(topp, head, jnp.float32)
    cut_k, cut_p = _cuts(p, n_min, topp)
    count_above = lambda v: jnp.sum((p > v).astype(jnp.int32), axis=1, keepdims=True)
    # Top-p keeps every entry above cut_p and, in index order, those equal to it while the
    # mass before them stays below topp.
    tied_p = (p == cut_p) & real
    mass_above_p = jnp.sum(jnp.where(p > cut_p, p, 0.0), axis=1, keepdims=True)
    mass_tied = mass_above_p + (jnp.cumsum(tied_p.astype(jnp.int32), axis=1) - 1).astype(jnp.float32) * cut_p
    n_topp = count_above(cut_p) + jnp.sum((tied_p & (mass_tied < topp)).astype(jnp.int32), axis=1, keepdims=True)
    n_topp = jnp.where(topp > 0, n_topp, 0)
    n = jnp.maximum(n_min, n_topp)
    cut = jnp.where(n_topp > n_min, cut_p, cut_k)
    tied = (p == cut) & real
    keep = (p > cut) | (tied & (jnp.cumsum(tied.astype(jnp.int32), axis=1) <= n - count_above(cut))) | (p < 0)
    if keep_first:
        keep = keep | (col == 0)
    if keep_diagonal:
        q_start = row * block_q
        q_end = jnp.minimum(q_start + block_q, seq_q)
        keep = keep | ((col * block_k < q_end) & (col * block_k + block_k > q_start))
    keep = (keep & real & (row < nq)).astype(jnp.int32)
    mask_ref[...] = keep.astype(jnp.int8)
    cnt_ref[...] = _store_lists(idx_ref, keep, axis=1)


def select_rows(sums_q: jax.Array, sums_k: jax.Array, *, n_min: tuple, topp: tuple,
                seq_q: int, seq_k: int, block_q: int, block_k: int, sm_scale: float,
                keep_first: bool = False, keep_diagonal: bool = False, interpret: bool = False):
    """Kept blocks of every q block, from block sums of q and k.

    Args:
      sums_q: fp32 `(batch, heads, nq_pad, d)`, token sums of each q block (`block_sums`).
      sums_k: fp32 `(batch, heads, nk_pad, d)`, the same for k.
      n_min: per head (tuple of `heads` ints), the shortest kept prefix (Top-k's count, in
        [1, k blocks]).
      topp: per head (tuple of `heads` floats), Top-p's mass (0 for no Top-p).
      seq_q, seq_k, block_q, block_k: token counts and block sizes.
      sm_scale: softmax scale of the pooled logits.
      keep_first: always keep k block 0. keep_diagonal: always keep the k blocks overlapping
        each q block's tokens (self-attention).
    Returns:
      kv_indices int32 `(batch, heads, nq_pad, nk_pad)`, kv_counts int32 `(batch, heads, nq_pad)`,
      mask int8 `(batch, heads, nq_pad, nk_pad)`.
    """
    b, h, nq_pad, d = sums_q.shape
    nk_pad = sums_k.shape[2]
    rows = min(ROWS_PER_PROGRAM, nq_pad)
    scored = max(rows, _MATMUL_ROWS)  # q blocks scored per program: the matmul's M
    kernel = functools.partial(_select_rows_kernel, seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k,
                               sm_scale=sm_scale, n_min=n_min, topp=topp, keep_first=keep_first,
                               keep_diagonal=keep_diagonal, interpret=bool(interpret))
    lists_spec = pl.BlockSpec((None, None, rows, nk_pad), lambda bi, hi, g: (bi, hi, g, 0))
    kv_indices, kv_counts, mask, _ = pl.pallas_call(
        kernel,
        grid=(b, h, nq_pad // rows),
        in_specs=[
            pl.BlockSpec((None, None, scored, d), lambda bi, hi, g: (bi, hi, g * rows // scored, 0)),
            pl.BlockSpec((None, None, nk_pad, d), lambda bi, hi, g: (bi, hi, 0, 0)),
        ],
        out_specs=[lists_spec, pl.BlockSpec((None, None, rows), lambda bi, hi, g: (bi, hi, g)), lists_spec,
                   pl.BlockSpec((None, None, None, scored, nk_pad), lambda bi, hi, g: (bi, hi, g, 0, 0))],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, nq_pad, nk_pad), jnp.int32),
            jax.ShapeDtypeStruct((b, h, nq_pad), jnp.int32),
            jax.ShapeDtypeStruct((b, h, nq_pad, nk_pad), jnp.int8),
            # each program's scores, reloaded
            jax.ShapeDtypeStruct((b, h, nq_pad // rows, scored, nk_pad), jnp.float32),
        ],
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="sparge_select_rows",
    )(sums_q, sums_k)
    return kv_indices, kv_counts, mask


def _transpose_lists_kernel(mask_ref, idx_ref, cnt_ref):
    """One (batch, head, group of k blocks). mask_ref int8 `(nq_pad, columns)`, idx_ref `(columns, nq_pad)`."""
    cnt_ref[...] = _store_lists(idx_ref, mask_ref[...].astype(jnp.int32), axis=0)


def transpose_lists(mask: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The q blocks keeping each k block: int8 mask `(batch, heads, nq_pad, nk_pad)` ->
    q_indices int32 `(batch, heads, nk_pad, nq_pad)`, q_counts int32 `(batch, heads, nk_pad)`."""
    b, h, nq_pad, nk_pad = mask.shape
    columns = min(COLUMNS_PER_PROGRAM, nk_pad)
    return pl.pallas_call(
        _transpose_lists_kernel,
        grid=(b, h, nk_pad // columns),
        in_specs=[pl.BlockSpec((None, None, nq_pad, columns), lambda bi, hi, g: (bi, hi, 0, g))],
        out_specs=[
            pl.BlockSpec((None, None, columns, nq_pad), lambda bi, hi, g: (bi, hi, g, 0)),
            pl.BlockSpec((None, None, columns), lambda bi, hi, g: (bi, hi, g)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, nk_pad, nq_pad), jnp.int32),
            jax.ShapeDtypeStruct((b, h, nk_pad), jnp.int32),
        ],
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="sparge_transpose_lists",
    )(mask)
