"""Compare mask providers on one set of Q/K/V: block sparsity and output error vs dense.

`video_like_qkv` builds Q/K/V with the structure of a video DiT layer (smooth fields over
the latent grid, per-head spatial/temporal bias, Wan's 3D RoPE); `method_point` measures
one method config; `sweep` runs each method over its knob.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.blocks import default_sm_scale, num_blocks
from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.masks import make_plan
from sparge_jax.method_config import (
    RadialMethod,
    SLAMethod,
    Sparge2Method,
    SpargeAttnMethod,
    SVG2Method,
    SVGMethod,
)
from sparge_jax.methods import attend_plan
from sparge_jax.models.rope import apply_rope, rope_angles
from sparge_jax.sla_linear import linear_block_attention


def _smooth_field(key, grid, channels: int, scales) -> jax.Array:
    """Random field `(frames*height*width, channels)`, smooth over the grid with per-axis length scales."""
    out = 0.0
    for axis, n in enumerate(grid):
        k1, key = jax.random.split(key)
        coords = jnp.arange(n, dtype=jnp.float32)[:, None]
        freqs = jax.random.normal(k1, (1, channels)) / scales[axis]
        phase = jax.random.uniform(jax.random.fold_in(k1, 1), (1, channels)) * 2 * jnp.pi
        f = jnp.cos(coords * freqs + phase)
        shape = [1, 1, 1, channels]
        shape[axis] = n
        out = out + f.reshape(shape)
    return jnp.broadcast_to(out, tuple(grid) + (channels,)).reshape(-1, channels)


def video_like_qkv(grid: tuple[int, int, int], heads: int, head_dim: int, *, key: jax.Array,
                   batch: int = 1, dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Q, K, V `(batch, frames*height*width, heads, head_dim)` with video-DiT-like structure.

    Even heads vary slowly over time and fast over space, so a token resembles the same
    position in other frames (temporal heads); odd heads the reverse (spatial heads). Wan's
    3D RoPE is applied to Q and K.
    """
    seq = int(np.prod(grid))
    cols = []
    for h in range(heads):
        scales = (8.0, 1.0, 1.0) if h % 2 == 0 else (0.7, 6.0, 6.0)
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, h), 3)
        base = _smooth_field(kq, grid, head_dim, scales)
        cols.append((base + 0.3 * jax.random.normal(kk, (seq, head_dim)),
                     base + 0.3 * jax.random.normal(jax.random.fold_in(kk, 1), (seq, head_dim)),
                     _smooth_field(kv, grid, head_dim, (2.0, 2.0, 2.0))))
    q, k, v = (jnp.stack([c[i] for c in cols], axis=1)[None].repeat(batch, 0) for i in range(3))
    angles = rope_angles(grid, head_dim)
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    q, k = apply_rope(q * 1.5, cos, sin), apply_rope(k * 1.5, cos, sin)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def dense_attention_fp32(q, k, v) -> jax.Array:
    """Plain softmax attention in fp32, `(batch, seq, heads, d)` layout."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * default_sm_scale(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fit_projection(sparse_out, linear_out, dense_out) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (weight `(d, d)`, bias `(d,)`) with sparse + linear @ W + b closest to dense:
    the best SLA projection a fine-tune could reach on these tokens."""
    d = linear_out.shape[-1]
    x = np.asarray(linear_out, np.float64).reshape(-1, d)
    y = (np.asarray(dense_out, np.float64) - np.asarray(sparse_out, np.float64)).reshape(-1, d)
    sol, *_ = np.linalg.lstsq(np.concatenate([x, np.ones((len(x), 1))], 1), y, rcond=None)
    return sol[:d], sol[d]


@dataclasses.dataclass(frozen=True)
class Point:
    """One measurement: method name, knob value, block sparsity of the exact part, relative L2 error."""

    method: str
    knob: float
    sparsity: float
    error: float


def method_point(q, k, v, config: SparseConfig, *, grid, dense=None, key=None) -> tuple[float, float, object]:
    """(sparsity, rel. L2 error vs dense, plan) of `config.method` on q, k, v.

    Sparsity is the fraction of real (q block, k block) pairs not computed exactly. SLA's
    linear branch uses the least-squares projection (`fit_projection`).
    """
    dense = dense_attention_fp32(q, k, v) if dense is None else dense
    method, kernel = config.method, config.kernel
    plan, _ = make_plan(q, k, v, method, kernel, grid=grid, key=key)
    nq, nk = num_blocks(q.shape[1], kernel.block_q), num_blocks(k.shape[1], kernel.block_k)
    sparsity = 1.0 - float(np.mean(np.asarray(plan.mask)[..., :nq, :nk]))
    if plan.linear_mask is None:
        out = attend_plan(q, k, v, plan, kernel)
    else:
        sparse = attend_plan(q, k, v, plan._replace(linear_mask=None), kernel)
        linear = linear_block_attention(q, k, v, plan.linear_mask, block_q=kernel.block_q,
                                        block_k=kernel.block_k, feature_map_name=method.feature_map)
        w, b = fit_projection(sparse, linear, dense)
        out = np.asarray(sparse, np.float64) + np.asarray(linear, np.float64) @ w + b
    return sparsity, rel_l2(out, dense), plan


# method name -> (config from (knob value, sequence length), knob name, knob values)
SWEEPS = {
    "SpargeAttention2": (lambda x, seq: Sparge2Method(topk=x, topp=0.5), "topk", (0.02, 0.05, 0.1, 0.2, 0.35)),
    "SpargeAttn": (lambda x, seq: SpargeAttnMethod(cdf_threshold=x, sim_threshold=0.3), "cdf",
                   (0.5, 0.7, 0.85, 0.95, 0.99)),
    "SLA": (lambda x, seq: SLAMethod(critical=x, negligible=min(0.5, 1.0 - x)), "critical", (0.02, 0.05, 0.1, 0.2, 0.35)),
    "SVG": (lambda x, seq: SVGMethod(band_frames=x), "band", (0.25, 0.5, 1.0, 1.5, 2.0)),
    "Radial": (lambda x, seq: RadialMethod(decay=x), "decay", (0.0625, 0.125, 0.25, 0.5, 1.0)),
    "SVG2": (lambda x, seq: SVG2Method(q_clusters=max(2, min(64, seq // 48)), k_clusters=max(2, min(128, seq // 24)),
                                       topp=x, init_iters=10), "topp", (0.5, 0.7, 0.85, 0.95, 0.99)),
}


def method_config(name: str, knob: float, kernel: KernelConfig, seq: int) -> SparseConfig:
    """The `SparseConfig` of sweep entry `name` at `knob` on `kernel`."""
    return SparseConfig(SWEEPS[name][0](knob, seq), kernel)


def sweep(q, k, v, kernel: KernelConfig, *, grid, methods=None, key=None) -> list[Point]:
    """Every method of `SWEEPS` (or the named subset) over its knob, on the same q, k, v."""
    dense = dense_attention_fp32(q, k, v)
    points = []
    for name in methods or SWEEPS:
        for x in SWEEPS[name][2]:
            s, e, _ = method_point(q, k, v, method_config(name, x, kernel, q.shape[1]), grid=grid, dense=dense,
                                   key=key)
            points.append(Point(name, x, s, e))
    return points
