"""A/B of candidate formulations of the non-attention pieces of a Wan2.1 step (the "floor").

Each piece of the floor that a profile of the t2v-1.3B 480p step on an H200 shows costing time
outside the matmuls (issue 18) is written here in 2-6 ways as small standalone jitted functions at
the model's real shapes (bf16 inputs, random seeded data), run in one process:

  ffn_gelu       FFN up-projection + GELU-tanh: whether XLA fuses the activation into the cuBLASLt
                 call (epilogue "GELU" / "BIAS_GELU" in the compiled HLO) and what that saves
                 against the GEMM alone (variant g). XLA's GemmRewriter matches
                 `x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * (x * (x * x))))))` on the GEMM
                 output in the GEMM's output type (jax.nn.gelu lowers to that structure). In the
                 floor trace's HLO the bf16 tanh sits between f32 converts (XLA's bf16 float
                 normalization), and in XLA's pipeline the GemmRewriter that takes the dots the
                 Triton GEMM autotuner hands back to cuBLAS runs after that normalization: likely
                 why nothing fused. So the "-nt" variants compile with
                 `xla_gpu_enable_triton_gemm=False` (the dot is rewritten earlier, still in bf16),
                 and variant c keeps the GEMM output and the GELU in f32 (no converts to break it).
  ffn_full       the whole FFN (linear_1, GELU, linear_2) for the ffn_gelu variants that change more
                 than the activation (Triton GEMMs off, an f32 GELU).
  qk_norm_rope   RMSNorm over the full dim (with weight) + 3D RoPE of q and k (both, as one layer does).
  compact_*      block-index compaction (`mask_to_block_index`'s kept lists) of a bool
                 (1, heads, q_blocks, k_blocks) block mask with ~5% / ~0.2% kept per row.
  select_*       Top-k selection from pooled scores + compaction: the selection and list building of a
                 mask prediction.
  ln_mod         LayerNorm (no affine, float32, from the f32 residual) + `*(1+scale)+shift` -> bf16.
  resid_ln       the gated residual add `x + y*gate` followed by that LayerNorm, separately or fused.
  block_means    the pooled q/k block means of the mask prediction.
  qkv_proj       the self-attention's q, k, v projections of one input and their consumers (q/k
                 RMSNorm + RoPE, v in heads): three GEMMs (the library), or one over the weights
                 concatenated on the output axis (plain, or heads-interleaved so that a
                 `tensor`-sharded weight stays local), the concatenation done in the call.

Per variant: median ms per call (`bench_timing.median_time`: warm-up, then --reps repeats of
back-to-back calls), ms per step (x the calls per denoising step: layers x uses per layer), an
effective rate (TFLOP/s for the GEMMs; GB/s of the least traffic the piece needs: inputs read once,
outputs written once), the error against the piece's reference variant (the library's current
formulation, called from the library where it exists): max |out - ref|, and per output that over
max |ref| (the largest over the outputs), checked against the variant's stated tolerance (bf16
outputs: 2e-2, ~2.5 bf16 ulps of the largest value); integer outputs must match exactly.
"kernels" counts the ops of the compiled program that launch work (fusions, custom calls, sorts,
copies, ...; from `compile().as_text()`); "gemm" names each matmul with its cuBLASLt epilogue or
the fusion that holds it.

GPU (expected: 1-2 minutes on an H200 at the default shapes, compiles included: ~45 small
programs, the first of each GEMM shape autotuned, each variant timed for ~0.3 s):

    PYTHONPATH=. python3 benchmarks/floor_kernels.py                          # t2v-1.3B, 480p
    PYTHONPATH=. python3 benchmarks/floor_kernels.py --preset t2v-14b --resolution 720p
    PYTHONPATH=. python3 benchmarks/floor_kernels.py --pieces ffn_gelu qk_norm_rope --reps 20
    PYTHONPATH=. python3 benchmarks/floor_kernels.py --pieces qkv_proj ffn_full   # the GEMMs' rates

CPU: `--small` (tiny shapes; tests/test_floor_kernels.py runs it).

What to look for: ffn_gelu's gemm column (a "BIAS_GELU" epilogue, and the ms of that variant
against g, the GEMM alone: today's separate GELU costs ~0.43 ms a layer at 1.3B 480p);
qk_norm_rope's kernels and ms (today: a stats reduce + a norm/RoPE fusion per tensor); whether
the cumsum / top_k compactions beat the sort and stay exact; whether fusing the gated residual
into the LayerNorm saves its f32 round trip.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import re
import time
from types import SimpleNamespace
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from bench_timing import median_time
from flax import nnx

from pallas_kernels.block_index import mask_to_block_index
from pallas_kernels.blocks import num_blocks
from sparge_jax.compile_options import TRITON_GEMM_OFF
from sparge_jax.config import KernelConfig
from sparge_jax.masks.sparge import _block_means, _topk_count, topk_mask
from sparge_jax.models.rope import axis_angles, broadcast_axes, grid_rope
from sparge_jax.models.wan import WAN_CONFIGS, gelu_tanh, layer_norm

F32, BF16 = jnp.float32, jnp.bfloat16
# Token grids (frames, height, width) after the (1, 2, 2) patch embedding of 81-frame latents.
RESOLUTIONS = {"480p": (21, 30, 52), "720p": (21, 45, 80)}
SMALL = dict(grid=(2, 4, 7), dim=64, heads=4, ffn=128, layers=2, block_q=16, block_k=8, mask_shape=(1, 4, 16, 40))
EPS = 1e-6
OVER = "g"  # ffn_gelu's GEMM-alone variant: the others' activation cost is their time minus its time
# "-nt" variants compile with TRITON_GEMM_OFF (sparge_jax.compile_options, the sampler's default on
# GPUs): no Triton GEMMs, so the dot is rewritten to cuBLASLt before bf16 normalization.
BF16_TOL = 2e-2  # bf16 outputs: ~2.5 bf16 ulps (2**-7 each) of the largest reference value
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One formulation of a piece.

    label: short name ("a", "b2", ...); what: one line on what it does.
    fn: `(ctx, *args) -> output pytree`, jitted with ctx bound.
    compare_to: the label of the variant (earlier in the list) its output is checked against;
      None: not compared (a baseline computing something else).
    tol: largest allowed max |out - ref| / max |ref|; None with compare_to set: exact (integers).
    options: XLA compiler options of this variant's compile (e.g. `TRITON_GEMM_OFF`).
    prepare: `(ctx, args) -> args` run before timing (e.g. a permuted channel layout).
    restore: `(ctx, out) -> out` in the reference's layout, for the comparison only.
    """

    label: str
    what: str
    fn: Callable
    compare_to: str | None = "a"
    tol: float | None = None
    options: dict | None = None
    prepare: Callable | None = None
    restore: Callable | None = None


def with_triton_gemm_off(variants: list[Variant], twins: tuple[str, ...]) -> list[Variant]:
    """`variants` with, after each one labelled in `twins`, its "-nt" twin: the same function
    compiled with `TRITON_GEMM_OFF`, checked to `BF16_TOL` against the variant's reference (the
    variant itself where it is a reference)."""
    out = []
    for variant in variants:
        out.append(variant)
        if variant.label in twins:
            out.append(dataclasses.replace(
                variant, label=f"{variant.label}-nt",
                what=f"{variant.label}, compiled with xla_gpu_enable_triton_gemm=False",
                compare_to=variant.compare_to or variant.label, tol=BF16_TOL, options=TRITON_GEMM_OFF))
    return out


# ----------------------------------------------------------------------------------------------
# 1. FFN up-projection + GELU-tanh: (1, tokens, dim) @ (dim, ffn) + (ffn,) -> bf16 (1, tokens, ffn)


def _linear(x, w, b=None, out_dtype=None):
    """nnx.Linear's computation: dot_general over x's last axis, then the bias added."""
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=out_dtype)
    return y if b is None else y + b.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))


def gelu_rewriter_form(h):
    """GELU-tanh written out in h's dtype as x * (0.5 * (1 + tanh(c * (x + 0.044715 * (x * (x * x)))))),
    the operand structure XLA's GemmRewriter matches on a cuBLASLt GEMM's output (jax.nn.gelu's
    HLO has the same structure: its x**3 lowers to (x * x) * x)."""
    const = lambda v: jnp.asarray(v, h.dtype)  # noqa: E731
    inner = const(SQRT_2_OVER_PI) * (h + const(0.044715) * (h * (h * h)))
    return h * (const(0.5) * (const(1.0) + jnp.tanh(inner)))


def gelu_sigmoid_form(h):
    """The same function as x * sigmoid(2c (x + 0.044715 x^3)) (0.5 (1 + tanh z) = sigmoid(2z))."""
    const = lambda v: jnp.asarray(v, h.dtype)  # noqa: E731
    return h * jax.nn.sigmoid(const(2 * SQRT_2_OVER_PI) * (h + const(0.044715) * (h * (h * h))))


def ffn_current(ctx, x, w, b):
    return gelu_tanh(_linear(x, w, b))


def ffn_rewriter_form(ctx, x, w, b):
    return gelu_rewriter_form(_linear(x, w, b))


def ffn_f32(ctx, x, w, b):
    return gelu_rewriter_form(_linear(x, w, b, out_dtype=F32)).astype(x.dtype)


def ffn_sigmoid(ctx, x, w, b):
    return gelu_sigmoid_form(_linear(x, w, b))


def ffn_nobias_current(ctx, x, w, b):
    return gelu_tanh(_linear(x, w))


def ffn_nobias_rewriter_form(ctx, x, w, b):
    return gelu_rewriter_form(_linear(x, w))


def gemm_bias_only(ctx, x, w, b):
    return _linear(x, w, b)


def ffn_inputs(ctx, key):
    kx, kw, kb = jax.random.split(key, 3)
    x = jax.random.normal(kx, (1, ctx.tokens, ctx.dim), BF16)
    w = (jax.random.normal(kw, (ctx.dim, ctx.ffn), F32) / math.sqrt(ctx.dim)).astype(BF16)
    b = (0.5 * jax.random.normal(kb, (ctx.ffn,), F32)).astype(BF16)
    return x, w, b


FFN_VARIANTS = with_triton_gemm_off([
    Variant("a", "current: x@w+b (bf16), jax.nn.gelu(approximate=True)", ffn_current, None),
    Variant("b", "x@w+b, GELU written in the GemmRewriter's form (bf16)", ffn_rewriter_form, tol=BF16_TOL),
    Variant("c", "GEMM out f32 (preferred_element_type) + f32 bias, GELU f32, -> bf16", ffn_f32, tol=BF16_TOL),
    Variant("e", "x@w+b, GELU as x*sigmoid(2z) (same function, no tanh)", ffn_sigmoid, tol=BF16_TOL),
    Variant("d0", "no bias: x@w, jax.nn.gelu (reference of d; not the model's math)", ffn_nobias_current, None),
    Variant("d", "no bias: x@w, rewriter-form GELU (GELU epilogue without BIAS)", ffn_nobias_rewriter_form, "d0",
            tol=BF16_TOL),
    Variant("g", "GEMM alone: x@w+b (bias epilogue), no activation (baseline)", gemm_bias_only, None),
], twins=("a", "b", "c", "d"))


def mlp_current(ctx, x, w1, b1, w2, b2):
    return _linear(ffn_current(ctx, x, w1, b1), w2, b2)


def mlp_f32_gelu(ctx, x, w1, b1, w2, b2):
    return _linear(ffn_f32(ctx, x, w1, b1), w2, b2)


def mlp_inputs(ctx, key):
    k1, k2, k3 = jax.random.split(key, 3)
    x, w1, b1 = ffn_inputs(ctx, k1)
    w2 = (jax.random.normal(k2, (ctx.ffn, ctx.dim), F32) / math.sqrt(ctx.ffn)).astype(BF16)
    b2 = (0.5 * jax.random.normal(k3, (ctx.dim,), F32)).astype(BF16)
    return x, w1, b1, w2, b2


# The whole FFN: whether a variant's gain on linear_1 survives (Triton off changes linear_2's
# kernel too; an f32 GELU output could fold its cast into a Triton linear_2).
MLP_VARIANTS = with_triton_gemm_off([
    Variant("a", "current: linear_2(gelu_tanh(linear_1(x))), bf16", mlp_current, None),
    Variant("c", "linear_1 out f32 + f32 GELU (ffn_gelu c), -> bf16, linear_2", mlp_f32_gelu, tol=BF16_TOL),
], twins=("a", "c"))


# ----------------------------------------------------------------------------------------------
# 2. q/k RMSNorm over the full dim (with weight) + 3D RoPE: bf16 (1, tokens, dim) x2 -> (1, tokens, heads, hd) x2


def _heads(ctx, x):
    return x.reshape(*x.shape[:2], ctx.heads, ctx.head_dim)


def _library_rms_norm(ctx, x, w):
    """`nnx.RMSNorm` as `SparseAttention` builds it (dtype = param dtype = the compute dtype)."""
    norm = nnx.RMSNorm(x.shape[-1], epsilon=EPS, dtype=x.dtype, param_dtype=w.dtype, rngs=nnx.Rngs(0))
    norm.scale.value = w
    return norm(x)


def norm_rope_current(ctx, q, k, wq, wk):
    """The library: nnx.RMSNorm in bf16, then `grid_rope`'s hook (`apply_rope`: f32, pairs swapped by a reverse)."""
    rope = grid_rope(ctx.grid, ctx.head_dim)
    return rope(_heads(ctx, _library_rms_norm(ctx, q, wq)), _heads(ctx, _library_rms_norm(ctx, k, wk)))


def _axis_consts(tables):
    return [jnp.asarray(t, F32) for t in tables]


def interleaved_tables(ctx):
    """f32 `(tokens, head_dim)` cos and signed sin for the interleaved layout: channel 2i and 2i+1
    get pair i's cos; sin is -sin on 2i and +sin on 2i+1. Built in the program from per-axis
    tables, as `grid_rope` does."""
    cos = [np.repeat(np.cos(a), 2, axis=-1) for a in ctx.angles]
    sin = [np.stack([-np.sin(a), np.sin(a)], axis=-1).reshape(a.shape[0], -1) for a in ctx.angles]
    return broadcast_axes(jnp, _axis_consts(cos), ctx.grid), broadcast_axes(jnp, _axis_consts(sin), ctx.grid)


def half_tables(ctx):
    """f32 `(tokens, head_dim)` cos and signed sin for the rotate-half layout (pair i's real part at
    channel i, imaginary part at i + head_dim/2)."""
    cos = broadcast_axes(jnp, _axis_consts([np.cos(a) for a in ctx.angles]), ctx.grid)
    sin = broadcast_axes(jnp, _axis_consts([np.sin(a) for a in ctx.angles]), ctx.grid)
    return jnp.concatenate([cos, cos], -1), jnp.concatenate([-sin, sin], -1)


def pair_swap(x):
    """(x1, x0, x3, x2, ...) of x's last axis: reshape to pairs, reverse each."""
    return x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)


def half_swap(x):
    """(second half, first half) of x's last axis."""
    half = x.shape[-1] // 2
    return jnp.concatenate([x[..., half:], x[..., :half]], axis=-1)


def _rope_with(x, cos, sin, swap):
    """x * cos + swap(x) * sin in f32, tables `(tokens, head_dim)` broadcast over batch and heads."""
    xf = x.astype(F32)
    return (xf * cos[None, :, None, :] + swap(xf) * sin[None, :, None, :]).astype(x.dtype)


def norm_rope_pairswap(ctx, q, k, wq, wk):
    cos, sin = interleaved_tables(ctx)
    return tuple(_rope_with(_heads(ctx, _library_rms_norm(ctx, x, w)), cos, sin, pair_swap)
                 for x, w in ((q, wq), (k, wk)))


def norm_rope_pairswap_given_tables(ctx, q, k, wq, wk, cos, sin):
    return tuple(_rope_with(_heads(ctx, _library_rms_norm(ctx, x, w)), cos, sin, pair_swap)
                 for x, w in ((q, wq), (k, wk)))


def with_interleaved_tables(ctx, args):
    return (*args, *jax.jit(functools.partial(interleaved_tables, ctx))())


def norm_rope_half(ctx, q, k, wq, wk):
    cos, sin = half_tables(ctx)
    return tuple(_rope_with(_heads(ctx, _library_rms_norm(ctx, x, w)), cos, sin, half_swap)
                 for x, w in ((q, wq), (k, wk)))


def _fused_norm_rope(ctx, x, w, cos, sin, swap):
    """RMSNorm (f32 statistics, weight) and RoPE as one f32 expression, cast to x's dtype once."""
    xf = x.astype(F32)
    inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + EPS)
    y = _heads(ctx, xf * inv * w.astype(F32))
    return (y * cos[None, :, None, :] + swap(y) * sin[None, :, None, :]).astype(x.dtype)


def norm_rope_fused(ctx, q, k, wq, wk):
    cos, sin = interleaved_tables(ctx)
    return tuple(_fused_norm_rope(ctx, x, w, cos, sin, pair_swap) for x, w in ((q, wq), (k, wk)))


def norm_rope_fused_half(ctx, q, k, wq, wk):
    cos, sin = half_tables(ctx)
    return tuple(_fused_norm_rope(ctx, x, w, cos, sin, half_swap) for x, w in ((q, wq), (k, wk)))


def _half_order(head_dim: int) -> np.ndarray:
    """Channel i of a head in the rotate-half layout is channel _half_order[i] of the interleaved one."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def to_half_layout(ctx, args):
    """q, k and their norm weights with each head's channels permuted to the rotate-half layout: what
    permuting the output columns of the q/k projections (kernel and bias) and the norm weights in
    the checkpoint gives. q.k is unchanged, so attention is too (v and o keep their layout)."""
    order = _half_order(ctx.head_dim)
    permute = lambda t: t.reshape(*t.shape[:-1], ctx.heads, ctx.head_dim)[..., order].reshape(t.shape)  # noqa: E731
    return tuple(permute(t) for t in args)


def from_half_layout(ctx, out):
    inverse = np.argsort(_half_order(ctx.head_dim))
    return tuple(t[..., inverse] for t in out)


def norm_rope_inputs(ctx, key):
    kq, kk, kwq, kwk = jax.random.split(key, 4)
    q = (3 * jax.random.normal(kq, (1, ctx.tokens, ctx.dim), F32)).astype(BF16)
    k = (3 * jax.random.normal(kk, (1, ctx.tokens, ctx.dim), F32)).astype(BF16)
    wq = (1 + 0.1 * jax.random.normal(kwq, (ctx.dim,), F32)).astype(BF16)
    wk = (1 + 0.1 * jax.random.normal(kwk, (ctx.dim,), F32)).astype(BF16)
    return q, k, wq, wk


ROPE_VARIANTS = [
    Variant("a", "current: nnx.RMSNorm (bf16 out), rope.apply_rope (f32, pair reverse; until 634b61a slice/stack)",
            norm_rope_current, None),
    Variant("b", "RMSNorm as a; RoPE x*cos2 + pairswap(x)*sin2, interleaved tables built in-program",
            norm_rope_pairswap, tol=BF16_TOL),
    Variant("b2", "b with the (tokens, head_dim) f32 tables passed in (not built in-program)",
            norm_rope_pairswap_given_tables, tol=BF16_TOL, prepare=with_interleaved_tables),
    Variant("c", "RMSNorm as a; rotate-half RoPE (INFO: needs q/k weight channels permuted per head)",
            norm_rope_half, tol=BF16_TOL, prepare=to_half_layout, restore=from_half_layout),
    Variant("d", "norm + pairswap RoPE as one f32 expression, one bf16 cast", norm_rope_fused, tol=BF16_TOL),
    Variant("e", "d in the rotate-half layout (INFO: permuted q/k weights, as c)", norm_rope_fused_half, tol=BF16_TOL,
            prepare=to_half_layout, restore=from_half_layout),
]


# ----------------------------------------------------------------------------------------------
# 3. Block-index compaction of a bool (1, heads, nq, nk) mask -> (kept indices padded, counts)


def compact_current(ctx, mask):
    index = mask_to_block_index(mask)  # the transposed lists are dead code under jit
    return index.kv_indices, index.kv_counts


def _row_iota(mask):
    return jax.lax.broadcasted_iota(jnp.int32, mask.shape, mask.ndim - 1)


def _last_kept(mask):
    """The last kept index of each row, 0 for an empty row (the padding value), keepdims."""
    return jnp.max(jnp.where(mask, _row_iota(mask), 0), axis=-1, keepdims=True)


def _sorted_lists(mask):
    """The library's compaction until session 39 (2026-12-05): one sort of int keys per row (a kept
    entry's key is its index, a dropped one's n), clamped to the last kept index."""
    keys = jax.lax.sort(jnp.where(mask, _row_iota(mask), mask.shape[-1]), dimension=mask.ndim - 1, is_stable=False)
    return jnp.minimum(keys, _last_kept(mask)), jnp.sum(mask, axis=-1, dtype=jnp.int32)


def compact_sorted(ctx, mask):
    return _sorted_lists(mask)


def _compact_searchsorted(mask, method: str):
    """Slot j holds the first index whose inclusive kept-count reaches j + 1 (a binary search of
    the row's cumsum); slots past the count find n and are clamped to the last kept index."""
    rows = mask.reshape(-1, mask.shape[-1])
    inclusive = jnp.cumsum(rows.astype(jnp.int32), axis=-1)
    wanted = _row_iota(rows) + 1
    found = jax.vmap(functools.partial(jnp.searchsorted, side="left", method=method))(inclusive, wanted)
    out = jnp.minimum(found.astype(jnp.int32), _last_kept(rows))
    return out.reshape(mask.shape), inclusive[:, -1].reshape(mask.shape[:-1])


def compact_search_unrolled(ctx, mask):
    return _compact_searchsorted(mask, "scan_unrolled")


def compact_search_compare_all(ctx, mask):
    return _compact_searchsorted(mask, "compare_all")


def _compact_top_k(mask, k: int):
    """`lax.top_k` of keys n - index on kept entries, 0 on dropped ones: the first k slots hold the
    kept indices ascending (its indices output); slots past the count are the padding."""
    n = mask.shape[-1]
    iota = _row_iota(mask)
    keys = jnp.where(mask, (n - iota).astype(F32), 0.0)
    k = max(k, 1)
    _, found = jax.lax.top_k(keys, k)
    counts = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    last = _last_kept(mask)
    head = jnp.where(iota[..., :k] < counts[..., None], found.astype(jnp.int32), last)
    return jnp.concatenate([head, jnp.broadcast_to(last, (*mask.shape[:-1], n - k))], axis=-1), counts


def compact_top_k_bound(ctx, mask):
    return _compact_top_k(mask, ctx.bound)


def compact_top_k_full(ctx, mask):
    return _compact_top_k(mask, mask.shape[-1])


def mask_inputs(ctx, key, keep: float):
    """A bool mask keeping each block with probability `keep`, plus one random block per row (a
    predicted row keeps at least one); --small adds an empty row and a full row. Sets ctx.bound,
    the largest row count (variant c's static bound, as a Top-k count is)."""
    ku, kr = jax.random.split(key)
    shape = ctx.mask_shape
    mask = jax.random.uniform(ku, shape) < keep
    mask = mask | jax.nn.one_hot(jax.random.randint(kr, shape[:-1], 0, shape[-1]), shape[-1], dtype=bool)
    if ctx.small:
        mask = mask.at[0, 0, 0].set(False).at[0, 0, 1].set(True)
    ctx.bound = int(jnp.max(jnp.sum(mask, axis=-1)))
    return (mask,)


COMPACT_VARIANTS = [
    Variant("a", "current: mask_to_block_index (running count + scatter of each kept index to its slot)",
            compact_current, None),
    Variant("s", "one lax.sort of int keys per row (the library until 2026-12-05; 14B 720p, H100: 0.874 ms "
            "against the scatter's 0.436)", compact_sorted),
    Variant("c", "lax.top_k of index keys, k = a static bound >= every row's count (Top-k's count)",
            compact_top_k_bound),
    Variant("c2", "lax.top_k of index keys, k = n (no bound needed)", compact_top_k_full),
    Variant("d", "cumsum + binary search per slot (searchsorted scan_unrolled)", compact_search_unrolled),
    Variant("d2", "cumsum + searchsorted compare_all (n x n compares per row)", compact_search_compare_all),
]


# ----------------------------------------------------------------------------------------------
# 3b. Top-k selection from pooled scores + compaction (a Top-k mask prediction after its scores)


def select_current(ctx, scores):
    index = mask_to_block_index(topk_mask(scores, ctx.keep))
    return index.kv_indices, index.kv_counts


def select_top_k(ctx, scores):
    """lax.top_k's k indices (ties: lower index first, as the library's order), sorted ascending,
    padded with the last: the kept lists without a full sort or a mask."""
    n = scores.shape[-1]
    _, found = jax.lax.top_k(scores, ctx.count)
    found = jnp.sort(found.astype(jnp.int32), axis=-1)
    pad = jnp.broadcast_to(found[..., -1:], (*scores.shape[:-1], n - ctx.count))
    return jnp.concatenate([found, pad], axis=-1), jnp.full(scores.shape[:-1], ctx.count, jnp.int32)


def select_top_k_mask(ctx, scores):
    """lax.top_k for the selection (its k-th value and index give the library's tie rule), the mask
    rebuilt from them, compacted by `mask_to_block_index` as today."""
    values, found = jax.lax.top_k(scores, ctx.count)
    thr, last = values[..., -1:], found[..., -1:]
    iota = _row_iota(scores)
    mask = (scores > thr) | ((scores == thr) & (iota <= last))
    index = mask_to_block_index(mask)
    return index.kv_indices, index.kv_counts


def select_two_key_sort(ctx, scores):
    """The library until session 39 (2026-12-05): the Top-k prefix from a sort of (-score, index)
    pairs (its last entry's score and index give the tie rule), compacted by a sort of int keys."""
    idx = _row_iota(scores)
    neg_sorted, order = jax.lax.sort((-scores, idx), dimension=scores.ndim - 1, is_stable=False, num_keys=2)
    at_end = idx == ctx.count - 1
    thr = jnp.max(jnp.where(at_end, -neg_sorted, -jnp.inf), axis=-1, keepdims=True)
    last = jnp.max(jnp.where(at_end, order, -1), axis=-1, keepdims=True)
    return _sorted_lists((scores > thr) | ((scores == thr) & (idx <= last)))


def select_inputs(ctx, key, keep: float):
    """Row-softmax scores f32 `ctx.mask_shape` (random logits); sets ctx.keep (the Top-k fraction)
    and ctx.count (its kept count per row, the library's rounding)."""
    ctx.keep = keep
    ctx.count = int(_topk_count(np.float32(keep), ctx.mask_shape[-1]))
    return (jax.nn.softmax(2.0 * jax.random.normal(key, ctx.mask_shape, F32), axis=-1),)


SELECT_VARIANTS = [
    Variant("a", "current: topk_mask (f32 sort, ties by a running count) -> mask_to_block_index (scatter)",
            select_current, None),
    Variant("s", "until 2026-12-05: (-score, index) two-key sort -> mask -> int-key sort compaction",
            select_two_key_sort),
    Variant("b", "lax.top_k indices, sorted (k entries), padded: no mask, no full sort", select_top_k),
    Variant("c", "lax.top_k -> mask (library tie rule) -> mask_to_block_index", select_top_k_mask),
]


# ----------------------------------------------------------------------------------------------
# 4. LayerNorm (no affine, f32) + modulation -> bf16; and the gated residual add before it


def _modulate(normed, scale, shift):
    return (normed * (1 + scale) + shift).astype(BF16)


def ln_current(ctx, x, scale, shift):
    return _modulate(layer_norm(x, EPS), scale, shift)


def _one_pass_norm(x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)
    return (x - mean) * jax.lax.rsqrt(var + EPS)


def ln_one_pass(ctx, x, scale, shift):
    return _modulate(_one_pass_norm(x), scale, shift)


def ln_one_pass_fma(ctx, x, scale, shift):
    """One pass; per row a = rsqrt(var+eps)*(1+scale), c = shift - mean*a, out = x*a + c."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)
    a = jax.lax.rsqrt(var + EPS) * (1 + scale)
    return (x * a + (shift - mean * a)).astype(BF16)


def ln_inputs(ctx, key):
    """x: a f32 residual stream with a mean offset and two outlier channels (DiT residuals carry a
    few large channels: what a one-pass variance is sensitive to); scale/shift/gate as the
    modulation's (1, 1, dim) rows; y: a bf16 branch output (for resid_ln)."""
    kx, ks, kh, kg, ky = jax.random.split(key, 5)
    x = 2.0 * jax.random.normal(kx, (1, ctx.tokens, ctx.dim), F32) + 1.0
    x = x.at[..., :2].add(40.0)
    scale = 0.1 * jax.random.normal(ks, (1, 1, ctx.dim), F32)
    shift = 0.1 * jax.random.normal(kh, (1, 1, ctx.dim), F32)
    gate = 0.1 * jax.random.normal(kg, (1, 1, ctx.dim), F32)
    y = jax.random.normal(ky, (1, ctx.tokens, ctx.dim), BF16)
    return x, scale, shift, gate, y


LN_VARIANTS = [
    Variant("a", "current: wan.layer_norm (two-pass, f32) * (1+scale) + shift -> bf16",
            lambda ctx, x, s, h, g, y: ln_current(ctx, x, s, h), None),
    Variant("b", "one-pass E[x^2]-E[x]^2 (f32)", lambda ctx, x, s, h, g, y: ln_one_pass(ctx, x, s, h), tol=BF16_TOL),
    Variant("b2", "one-pass, folded to x*a + c per row", lambda ctx, x, s, h, g, y: ln_one_pass_fma(ctx, x, s, h),
            tol=BF16_TOL),
]


def _gated_add(x, y, gate):
    return x + y.astype(F32) * gate


def resid_ln_separate(ctx, x, scale, shift, gate, y):
    """Today's split: the gated add as its own fusion (the barrier keeps XLA from merging them),
    then the LayerNorm reading the new residual back."""
    x = jax.lax.optimization_barrier(_gated_add(x, y, gate))
    return x, ln_current(ctx, x, scale, shift)


def resid_ln_together(ctx, x, scale, shift, gate, y):
    x = _gated_add(x, y, gate)
    return x, ln_current(ctx, x, scale, shift)


def resid_ln_together_one_pass(ctx, x, scale, shift, gate, y):
    x = _gated_add(x, y, gate)
    return x, ln_one_pass(ctx, x, scale, shift)


RESID_LN_VARIANTS = [
    Variant("a", "current: x+y*gate, then (barrier) layer_norm + modulation: two kernels", resid_ln_separate, None),
    Variant("c", "x+y*gate and layer_norm in one program (XLA's fusion choice)", resid_ln_together, tol=BF16_TOL),
    Variant("c2", "c with the one-pass LayerNorm", resid_ln_together_one_pass, tol=BF16_TOL),
]


# ----------------------------------------------------------------------------------------------
# 5. Pooled block means of q (block_q) and k (block_k): bf16 (1, tokens, heads, hd) -> f32 means


def means_current(ctx, q, k):
    return _block_means(q, ctx.block_q), _block_means(k, ctx.block_k)


def _means_matmul(x, block):
    """A (blocks, tokens) 0/1 pooling matrix times the tokens (f32 accumulation) over the counts."""
    s = x.shape[1]
    n = num_blocks(s, block)
    pool = (jnp.arange(s)[None, :] // block == jnp.arange(n)[:, None]).astype(x.dtype)
    counts = jnp.minimum(block, s - np.arange(n) * block).astype(np.float32)
    return jnp.einsum("ns,bshd->bnhd", pool, x, preferred_element_type=F32) / counts[None, :, None, None]


def means_matmul(ctx, q, k):
    return _means_matmul(q, ctx.block_q), _means_matmul(k, ctx.block_k)


def means_inputs(ctx, key):
    kq, kk = jax.random.split(key)
    shape = (1, ctx.tokens, ctx.heads, ctx.head_dim)
    return jax.random.normal(kq, shape, BF16), jax.random.normal(kk, shape, BF16)


MEANS_VARIANTS = [
    Variant("a", "current: sparge._block_means (whole blocks by reshape of a slice, the tail apart, f32 sums; "
            "until issue 18: pad to whole blocks + reshape, 0.105 vs 0.075 ms at 1.3B 480p on an H200)",
            means_current, None),
    Variant("c", "0/1 pooling matrix matmul (f32 accumulation)", means_matmul, tol=1e-4),
]


# ----------------------------------------------------------------------------------------------
# 6. q, k, v projections + q/k RMSNorm + RoPE: bf16 (1, tokens, dim) -> three bf16 (1, tokens, heads, hd)


def _qkv_finish(ctx, q, k, v, norms):
    """The projections' consumers, as a layer has them: q/k RMSNorm + RoPE (the library's), v in heads."""
    q, k = norm_rope_current(ctx, q, k, *norms)
    return q, k, _heads(ctx, v)


def qkv_separate(ctx, x, ws, bs, norms):
    return _qkv_finish(ctx, *(_linear(x, w, b) for w, b in zip(ws, bs)), norms)


def qkv_concatenated(ctx, x, ws, bs, norms):
    y = _linear(x, jnp.concatenate(ws, axis=1), jnp.concatenate(bs))
    return _qkv_finish(ctx, *jnp.split(y, 3, axis=-1), norms)


def qkv_heads_interleaved(ctx, x, ws, bs, norms):
    """Weights stacked as (dim, heads, 3, head_dim): each head's q, k, v columns side by side."""
    w = jnp.stack([w.reshape(ctx.dim, ctx.heads, ctx.head_dim) for w in ws], axis=2)
    b = jnp.stack([b.reshape(ctx.heads, ctx.head_dim) for b in bs], axis=1)
    y = _linear(x, w.reshape(ctx.dim, 3 * ctx.dim), b.reshape(-1))
    y = y.reshape(*y.shape[:2], ctx.heads, 3, ctx.head_dim)
    return _qkv_finish(ctx, *(y[..., i, :].reshape(*y.shape[:2], ctx.dim) for i in range(3)), norms)


def qkv_inputs(ctx, key):
    kx, kn, *kw = jax.random.split(key, 8)
    x = jax.random.normal(kx, (1, ctx.tokens, ctx.dim), BF16)
    ws = tuple((jax.random.normal(k, (ctx.dim, ctx.dim), F32) / math.sqrt(ctx.dim)).astype(BF16) for k in kw[:3])
    bs = tuple((0.5 * jax.random.normal(k, (ctx.dim,), F32)).astype(BF16) for k in kw[3:])
    norms = tuple((1 + 0.1 * jax.random.normal(k, (ctx.dim,), F32)).astype(BF16) for k in jax.random.split(kn))
    return x, ws, bs, norms


QKV_VARIANTS = with_triton_gemm_off([
    Variant("a", "current: q(x), k(x), v(x), three GEMMs; q/k RMSNorm + RoPE; v in heads", qkv_separate, None),
    Variant("b", "one GEMM over [Wq | Wk | Wv] (concatenated in the call), split; the same after", qkv_concatenated,
            tol=BF16_TOL),
    Variant("c", "one GEMM, weights heads-interleaved (dim, heads, 3, head_dim), sliced; the same after",
            qkv_heads_interleaved, tol=BF16_TOL),
], twins=("a", "b", "c"))


def _qkv_work(ctx):
    return 2.0 * ctx.tokens * ctx.dim * 3 * ctx.dim, None


# ----------------------------------------------------------------------------------------------
# The pieces: (name, inputs(ctx, key) -> args, variants, calls per layer, work(ctx) -> (flops, bytes))


def _ffn_work(ctx):
    return 2.0 * ctx.tokens * ctx.dim * ctx.ffn, None


def _mlp_work(ctx):
    return 4.0 * ctx.tokens * ctx.dim * ctx.ffn, None


def _rope_work(ctx):
    return None, 2 * (2 * ctx.tokens * ctx.dim * 2)  # q and k: read bf16, write bf16


def _ln_work(ctx):
    return None, ctx.tokens * ctx.dim * (4 + 2)


def _resid_ln_work(ctx):
    return None, ctx.tokens * ctx.dim * (4 + 2 + 4 + 2)  # read x, y; write x, h (the least traffic)


def _means_work(ctx):
    return None, 2 * ctx.tokens * ctx.dim * 2


PIECES = {
    "ffn_gelu": (ffn_inputs, FFN_VARIANTS, 1, _ffn_work),
    "ffn_full": (mlp_inputs, MLP_VARIANTS, 1, _mlp_work),
    "qk_norm_rope": (norm_rope_inputs, ROPE_VARIANTS, 1, _rope_work),
    "compact_5%": (functools.partial(mask_inputs, keep=0.05), COMPACT_VARIANTS, 1, None),
    "compact_0.2%": (functools.partial(mask_inputs, keep=0.002), COMPACT_VARIANTS, 1, None),
    "select_5%": (functools.partial(select_inputs, keep=0.05), SELECT_VARIANTS, 1, None),
    "select_0.2%": (functools.partial(select_inputs, keep=0.002), SELECT_VARIANTS, 1, None),
    "ln_mod": (ln_inputs, LN_VARIANTS, 2, _ln_work),
    "resid_ln": (ln_inputs, RESID_LN_VARIANTS, 2, _resid_ln_work),
    "block_means": (means_inputs, MEANS_VARIANTS, 1, _means_work),
    "qkv_proj": (qkv_inputs, QKV_VARIANTS, 1, _qkv_work),
}
VARIANTS = {name: piece[1] for name, piece in PIECES.items()}


# ----------------------------------------------------------------------------------------------
# Compiled-HLO inspection

_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s(?P<op>[a-z][a-z0-9\-]*)\(")
_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "after-all",
                "partition-id", "replica-id", "add-dependency", "domain"}


def hlo_computations(text: str) -> tuple[dict[str, list[tuple[str, str]]], str | None]:
    """Compiled HLO text -> ({computation: [(opcode, line), ...]}, entry computation name)."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = line.split("(", 1)[0].split()
            current = header[-1].lstrip("%") if header else None
            if header and header[0] == "ENTRY":
                entry = current
            computations[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            match = _INSTRUCTION.match(line)
            if match:
                computations[current].append((match["op"], line))
    return computations, entry


def _called(line: str, key: str) -> str | None:
    match = re.search(key + r"=%?([\w.\-]+)", line)
    return match.group(1) if match else None


def _kernel_kind(op: str, line: str) -> str:
    if op == "fusion":
        custom = re.search(r'"kind":"__(\w+)"', line)  # Triton / library fusions name their emitter
        kind = re.search(r"kind=k(\w+)", line)
        return custom.group(1) if custom else (kind.group(1).lower() if kind else "fusion")
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        return target.group(1).strip("_").replace("$", ".") if target else op
    return op


def hlo_kernels(text: str) -> collections.Counter:
    """Ops of the entry computation (and of the computations it `call`s) that launch work, by kind
    (fusion kind or emitter / custom-call target / opcode)."""
    computations, entry = hlo_computations(text)
    kinds = collections.Counter()
    pending, seen = [entry], set()
    while pending:
        name = pending.pop()
        if name is None or name in seen or name not in computations:
            continue
        seen.add(name)
        for op, line in computations[name]:
            if op == "call":
                pending.append(_called(line, "to_apply"))
            elif op not in _NOT_KERNELS and not op.endswith(("-done", "-update")):
                kinds[_kernel_kind(op, line)] += 1
    return kinds


def _fused_ops(computations, name: str, depth: int = 0) -> set[str]:
    """Opcodes of a fusion's computation, nested fusions included."""
    ops = set()
    for op, line in computations.get(name, []):
        ops.add(op)
        if op == "fusion" and depth < 4:
            ops |= _fused_ops(computations, _called(line, "calls"), depth + 1)
    return ops


def gemm_summary(text: str) -> list[str]:
    """Each matmul of the compiled program: "cublas.lt.matmul:BIAS_GELU" (a cuBLAS custom call and
    its epilogue), "<fusion kind>:dot" (+"+tanh" / "+logistic" when the activation is in the same
    fusion), or "dot" (unfused)."""
    computations, _ = hlo_computations(text)
    fusion_bodies = {_called(line, "calls") for ins in computations.values() for op, line in ins if op == "fusion"}
    found = []
    for name, instructions in computations.items():
        if name in fusion_bodies:
            continue
        for op, line in instructions:
            if op == "custom-call" and "cublas" in line:
                epilogue = re.search(r'"epilogue":"(\w+)"', line)
                found.append(f"{_kernel_kind(op, line)}:{epilogue.group(1) if epilogue else '?'}")
            elif op == "fusion":
                ops = _fused_ops(computations, _called(line, "calls"))
                if ops & {"dot", "scaled-dot"}:
                    act = "".join(f"+{a}" for a in ("tanh", "logistic") if a in ops)
                    found.append(f"{_kernel_kind(op, line)}:dot{act}")
            elif op == "dot":
                found.append("dot")
    return found


# ----------------------------------------------------------------------------------------------
# Running


def context(args) -> SimpleNamespace:
    """Static sizes of the run: the token grid, widths, blocks, layers, mask shape."""
    if args.small:
        c = dict(SMALL)
        c["preset"] = "small"
    else:
        config = WAN_CONFIGS[args.preset]
        grid = RESOLUTIONS[args.resolution]
        c = dict(grid=grid, dim=config.dim, heads=config.num_heads, ffn=config.ffn_dim, layers=config.num_layers,
                 block_q=KernelConfig().block_q, block_k=KernelConfig().block_k,
                 preset=f"{args.preset} {args.resolution}")
    ctx = SimpleNamespace(**c, small=args.small)
    ctx.tokens = math.prod(ctx.grid)
    ctx.head_dim = ctx.dim // ctx.heads
    ctx.angles = axis_angles(tuple(ctx.grid), ctx.head_dim)
    if not hasattr(ctx, "mask_shape"):
        ctx.mask_shape = (1, ctx.heads, num_blocks(ctx.tokens, ctx.block_q), num_blocks(ctx.tokens, ctx.block_k))
    return ctx


@jax.jit
def _leaf_errors(out, ref):
    diff = jnp.max(jnp.abs(out.astype(F32) - ref.astype(F32)))
    return diff, jnp.max(jnp.abs(ref.astype(F32)))


@jax.jit
def _leaf_mismatches(out, ref):
    return jnp.sum(out != ref)


def compare(out, ref, exact: bool) -> dict:
    outs, refs = jax.tree.leaves(out), jax.tree.leaves(ref)
    if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs)):
        return {"mismatches": -1, "max_abs_err": math.inf, "rel_err": math.inf}
    if exact:
        return {"mismatches": int(sum(int(_leaf_mismatches(o, r)) for o, r in zip(outs, refs)))}
    pairs = [tuple(float(v) for v in _leaf_errors(o, r)) for o, r in zip(outs, refs)]
    return {"max_abs_err": max(d for d, _ in pairs), "rel_err": max(d / max(m, 1e-30) for d, m in pairs)}


def run_piece(ctx, name: str, key, reps: int) -> list[dict]:
    inputs, variants, per_layer, work = PIECES[name]
    args = jax.block_until_ready(inputs(ctx, key))
    flops, nbytes = work(ctx) if work else (None, None)
    outputs, rows = {}, []
    referenced = {v.compare_to for v in variants}
    for v in variants:
        row = {"piece": name, "variant": v.label, "what": v.what, "compare_to": v.compare_to, "tol": v.tol,
               "options": v.options}
        try:
            call_args = v.prepare(ctx, args) if v.prepare else args
            t0 = time.perf_counter()
            compiled = jax.jit(functools.partial(v.fn, ctx)).lower(*call_args).compile(v.options)
            row["compile_s"] = time.perf_counter() - t0
            text = compiled.as_text()
            kinds = hlo_kernels(text)
            row["kernels"], row["kernel_kinds"] = sum(kinds.values()), dict(kinds)
            row["gemms"] = gemm_summary(text)
            out = jax.block_until_ready(compiled(*call_args))
            seconds = median_time(compiled, *call_args, reps=reps)
        except Exception as e:  # a variant XLA refuses (e.g. an unknown option) is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(f"{name} {v.label}: FAILED {row['error']}", flush=True)
            continue
        row["ms"] = seconds * 1e3
        row["ms_per_step"] = seconds * 1e3 * per_layer * ctx.layers
        if flops:
            row["tflops"] = flops / seconds / 1e12
        if nbytes:
            row["gbps"] = nbytes / seconds / 1e9
        if v.restore:
            out = v.restore(ctx, out)
        if v.compare_to is not None:
            exact = v.tol is None
            row.update(compare(out, outputs[v.compare_to], exact))
            row["ok"] = row["mismatches"] == 0 if exact else row["rel_err"] <= v.tol
        if v.label in referenced:
            outputs[v.label] = out
        del out
        print(f"{name} {v.label}: {row['ms']:.3f} ms, {row['kernels']} kernels {row['gemms'] or ''}"
              f"{'' if row.get('ok', True) else '  OUT OF TOLERANCE'}", flush=True)
        rows.append(row)
    outputs.clear()
    baseline = next((r for r in rows if r["variant"] == OVER and "ms" in r), None) if name == "ffn_gelu" else None
    for r in rows:
        if baseline is not None and "ms" in r and r is not baseline:
            r["over_gemm_ms"] = r["ms"] - baseline["ms"]
    return rows


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def print_table(ctx, rows: list[dict]) -> None:
    print(f"\n## Floor pieces, {jax.devices()[0].device_kind}, {ctx.preset}: {ctx.tokens} tokens, dim {ctx.dim}, "
          f"{ctx.heads} heads x {ctx.head_dim}, ffn {ctx.ffn}, mask {ctx.mask_shape}, {ctx.layers} layers")
    print("ms/step: ms x calls per step (layers x uses per layer). err: max over outputs of max|out-ref| / max|ref| "
          "(tolerance), or exact mismatches. rate: TFLOP/s (GEMMs) or GB/s of the least traffic.\n")
    print("| piece | variant | ms | ms/step | rate | max abs err | err (tol) | ok | kernels | gemm | what |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['piece']} | {r['variant']} | failed | | | | | | | | {r['what']}: {r['error']} |")
            continue
        rate = (f"{r['tflops']:.3g} TF/s" if "tflops" in r else f"{r['gbps']:.3g} GB/s" if "gbps" in r else "")
        if "over_gemm_ms" in r:
            rate += f", {r['over_gemm_ms']:+.3f} ms vs {OVER}"
        if r["compare_to"] is None:
            err, abs_err, ok = "ref" if r["variant"] == "a" else "-", "", ""
        elif r["tol"] is None:
            err, abs_err, ok = f"{r['mismatches']} mismatches (exact)", "", "yes" if r["ok"] else "NO"
        else:
            err = f"{r['rel_err']:.1e} ({r['tol']:.0e}) vs {r['compare_to']}"
            abs_err, ok = _fmt(r["max_abs_err"], ".2e"), "yes" if r["ok"] else "NO"
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["kernel_kinds"].items()))
        gemm = ", ".join(r["gemms"])
        print(f"| {r['piece']} | {r['variant']} | {r['ms']:.3f} | {r['ms_per_step']:.2f} | {rate} | {abs_err} | {err} "
              f"| {ok} | {r['kernels']} ({kinds}) | {gemm} | {r['what']} |")


def main(argv=None) -> dict:
    """Run the A/B; returns {"device", "preset", "shape", "rows": [one dict per variant]}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("t2v-1.3b", "t2v-14b"), default="t2v-1.3b")
    parser.add_argument("--resolution", choices=tuple(RESOLUTIONS), default="480p")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU; tests the code paths)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--pieces", nargs="+", choices=tuple(PIECES), default=list(PIECES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ctx = context(args)
    print(f"device {jax.devices()[0].device_kind}; {ctx.preset}: {ctx.tokens} tokens, dim {ctx.dim}, "
          f"{ctx.heads}x{ctx.head_dim} heads, ffn {ctx.ffn}, mask {ctx.mask_shape}", flush=True)
    rows = []
    keys = jax.random.split(jax.random.key(args.seed), len(PIECES))
    for key, name in zip(keys, PIECES):
        if name in args.pieces:
            rows.extend(run_piece(ctx, name, key, args.reps))
    print_table(ctx, rows)
    return {"device": jax.devices()[0].device_kind, "preset": ctx.preset,
            "shape": {"tokens": ctx.tokens, "dim": ctx.dim, "heads": ctx.heads, "ffn": ctx.ffn,
                      "mask": ctx.mask_shape, "layers": ctx.layers},
            "rows": rows}


if __name__ == "__main__":
    main()
