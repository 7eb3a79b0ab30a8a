"""One interface over every mask provider: q, k, v (+ latent grid) -> `AttentionPlan`.

`make_plan(q, k, v, method, kernel, grid=..., state=..., key=...)` returns the plan and
the provider's state for the next call (SVG2's centroids; None for stateless methods).
A provider is `(q, k, v, method, kernel, grid, state, key) -> (AttentionPlan, state)`,
registered in `PROVIDERS` under its method config class by `register_provider` (a new method:
one module with its config, a `sparge_jax.method_config.Method` subclass, its rule and its
registered provider, imported by `sparge_jax.masks`).
A `HeadMix` runs each head's method on that head's slice and stacks the plans.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.block_index import TokenBand
from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.masks.radial import radial_mask, radial_mask_upstream
from sparge_jax.masks.sla import sla_block_split
from sparge_jax.masks.sparge import predict_mask
from sparge_jax.masks.spargeattn import spargeattn_mask
from sparge_jax.masks.svg import check_grid, svg_band, svg_plan
from sparge_jax.masks.svg2 import Centroids, initial_centroids, initial_centroids_upstream, svg2_plan
from sparge_jax.method_config import (
    HeadMix,
    LayerMethods,
    RadialMethod,
    SLAMethod,
    Sparge2Method,
    SpargeAttnMethod,
    SVG2Method,
    SVGMethod,
)


class AttentionPlan(NamedTuple):
    """What one attention call computes, per (batch, head).

    mask: bool `(batch, heads, q_blocks, k_blocks)`, blocks computed exactly, indexed in the
      permuted token order when `q_order` / `k_order` are given.
    q_order: int32 `(batch, heads, seq_q)` or None: slot i holds original query token q_order[i].
    k_order: int32 `(batch, heads, seq_k)` or None, the same for keys and values.
    linear_mask: bool like `mask` or None: the blocks of SLA's linear branch (its marginal blocks,
      or every block with `SLAMethod(linear_keys="all")`).
    band: `pallas_kernels.TokenBand` (int32 `(batch, heads)` width and sink) or None: inside the
      kept blocks only the tokens with |i - j| <= width or j < sink (permuted slots) are computed
      (`SVGMethod(token_band=True)`); only the "xla" kernel backend runs it.
    """

    mask: jax.Array
    q_order: jax.Array | None = None
    k_order: jax.Array | None = None
    linear_mask: jax.Array | None = None
    band: TokenBand | None = None


PROVIDERS: dict[type, Callable] = {}


def register_provider(method_class: type):
    """Decorator: the function is the provider of `method_class` (see the module docstring)."""

    def register(provider: Callable) -> Callable:
        if PROVIDERS.get(method_class, provider) is not provider:
            raise ValueError(f"{method_class.__name__} already has a provider: {PROVIDERS[method_class].__name__}")
        PROVIDERS[method_class] = provider
        return provider

    return register


@register_provider(Sparge2Method)
def _plan_sparge2(q, k, v, method: Sparge2Method, kernel, grid, state, key):
    return AttentionPlan(predict_mask(q, k, SparseConfig(method, kernel))), None


@register_provider(SpargeAttnMethod)
def _plan_spargeattn(q, k, v, method: SpargeAttnMethod, kernel, grid, state, key):
    mask = spargeattn_mask(q, k, block_q=kernel.block_q, block_k=kernel.block_k,
                           cdf_threshold=method.cdf_threshold, sim_threshold=method.sim_threshold,
                           keep_first=method.keep_first, sm_scale=kernel.sm_scale, topk=method.topk,
                           smooth_k=method.smooth_k, tail_block=method.tail_block)
    return AttentionPlan(mask), None


@register_provider(SLAMethod)
def _plan_sla(q, k, v, method: SLAMethod, kernel, grid, state, key):
    critical, marginal = sla_block_split(q, k, block_q=kernel.block_q, block_k=kernel.block_k,
                                         critical=method.critical, negligible=method.negligible,
                                         critical_count=method.critical_count)
    if method.linear_keys == "all":
        marginal = jnp.ones_like(marginal)
    return AttentionPlan(critical, linear_mask=marginal), None


@register_provider(SVGMethod)
def _plan_svg(q, k, v, method: SVGMethod, kernel, grid, state, key):
    seed_key = jax.random.key(method.seed) if key is None else jax.random.fold_in(key, method.seed)
    mask, order, _ = svg_plan(q, k, v, grid, block_q=kernel.block_q, block_k=kernel.block_k,
                              band_frames=method.band_frames, sink=method.sink,
                              sampled_rows=method.sampled_rows, key=seed_key, sm_scale=kernel.sm_scale,
                              upstream_sparsity=method.sparsity, max_row=method.sample_mse_max_row)
    band = None
    if method.token_band:
        width, sink = svg_band(check_grid(grid, q.shape[1]), band_frames=method.band_frames, sink=method.sink,
                               upstream_sparsity=method.sparsity)
        b, h = q.shape[0], q.shape[2]
        band = TokenBand(jnp.full((b, h), width, jnp.int32), jnp.full((b, h), sink, jnp.int32))
    return AttentionPlan(mask, order, order, band=band), None


@register_provider(RadialMethod)
def _plan_radial(q, k, v, method: RadialMethod, kernel, grid, state, key):
    grid = check_grid(grid, q.shape[1])
    if method.variant == "upstream":
        static = radial_mask_upstream(grid, kernel.block_q, kernel.block_k, decay=method.decay,
                                      block_size=method.block_size, sink_first_frame=method.sink_first_frame)
    else:
        static = radial_mask(grid, kernel.block_q, kernel.block_k, decay=method.decay,
                             dense_distance=method.dense_distance, min_window=method.min_window,
                             sink_first_frame=method.sink_first_frame)
    b, h = q.shape[0], q.shape[2]
    return AttentionPlan(jnp.broadcast_to(jnp.asarray(static), (b, h) + static.shape)), None


def svg2_start(q, k, method: SVG2Method, state, key) -> tuple[Centroids, int]:
    """(centroids, Lloyd iterations) an SVG2 call starts from: `state` (the previous step's
    centroids) with `step_iters`, or (None) tokens drawn from `key` folded with `method.seed`
    (`jax.random.key(seed)` without a key) with `init_iters`."""
    if state is not None:
        return state, method.step_iters
    seed_key = jax.random.key(method.seed) if key is None else jax.random.fold_in(key, method.seed)
    kq, kk = jax.random.split(seed_key)
    draw = initial_centroids_upstream if method.upstream_kmeans else initial_centroids
    return Centroids(draw(q, method.q_clusters, kq), draw(k, method.k_clusters, kk)), method.init_iters


@register_provider(SVG2Method)
def _plan_svg2(q, k, v, method: SVG2Method, kernel, grid, state, key):
    state, iters = svg2_start(q, k, method, state, key)
    mask, q_order, k_order, state = svg2_plan(
        q, k, block_q=kernel.block_q, block_k=kernel.block_k, q_clusters=method.q_clusters,
        k_clusters=method.k_clusters, topp=method.topp, min_k_ratio=method.min_k_ratio,
        iters=iters, centroids=state, sm_scale=kernel.sm_scale, upstream=method.upstream_kmeans)
    return AttentionPlan(mask, q_order, k_order), state




def _identity_order(b: int, h: int, s: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, h, s))


def _stack_plans(plans: list[AttentionPlan], heads_of: list[list[int]], b: int, sq: int, sk: int) -> AttentionPlan:
    """Plans of head groups -> one plan over all heads in their original order."""
    position = jnp.argsort(jnp.asarray([h for group in heads_of for h in group]))

    def stack(field, fill):
        if all(getattr(p, field) is None for p in plans):
            return None
        parts = [getattr(p, field) if getattr(p, field) is not None else fill(p, len(g)) for p, g in zip(plans, heads_of)]
        return jnp.concatenate(parts, axis=1)[:, position]

    no_band = max(sq, sk)  # a width that every token pair is within
    bands = [p.band or TokenBand(jnp.full((b, len(g)), no_band, jnp.int32), jnp.zeros((b, len(g)), jnp.int32))
             for p, g in zip(plans, heads_of)]
    band = None
    if any(p.band is not None for p in plans):
        band = TokenBand(*(jnp.concatenate(parts, axis=1)[:, position] for parts in zip(*bands)))
    return AttentionPlan(
        mask=stack("mask", None),
        q_order=stack("q_order", lambda p, n: _identity_order(b, n, sq)),
        k_order=stack("k_order", lambda p, n: _identity_order(b, n, sk)),
        linear_mask=stack("linear_mask", lambda p, n: jnp.zeros_like(p.mask)),
        band=band,
    )


def make_plan(q, k, v, method, kernel: KernelConfig, *, grid=None, state: Any = None,
              key: jax.Array | None = None, layer: int | None = None) -> tuple[AttentionPlan, Any]:
    """The attention plan of `method` for q, k, v `(batch, seq, heads, d)`.

    method: a config of `sparge_jax.method_config`; `LayerMethods` needs `layer`. kernel: the
      `KernelConfig` whose block sizes (and softmax scale) the plan is made for. grid: latent token grid
      `(frames, height, width)` for the video-aware methods (SVG, Radial). state: what the
      previous call returned for this layer (SVG2 centroids). key: PRNG key for the
      methods that draw (SVG row sampling, SVG2 initial centroids).
    Returns (AttentionPlan, new state).
    """
    if not isinstance(kernel, KernelConfig):
        raise ValueError(f"kernel must be a sparge_jax.config.KernelConfig; got {kernel!r}")
    if isinstance(method, LayerMethods):
        if layer is None:
            raise ValueError("layer must be given with LayerMethods")
        method = method.for_layer(layer)
    if isinstance(method, HeadMix):
        heads = q.shape[2]
        if len(method.methods) != heads:
            raise ValueError(f"HeadMix.methods must have one entry per head ({heads}); got {len(method.methods)}")
        groups: dict = {}
        for h, m in enumerate(method.methods):
            groups.setdefault(m, []).append(h)
        states = state if state is not None else {}
        plans, heads_of, new_states = [], [], {}
        for m, hs in groups.items():
            idx = jnp.asarray(hs)
            plan, new_states[m] = make_plan(q[:, :, idx], k[:, :, idx], v[:, :, idx], m, kernel,
                                            grid=grid, state=states.get(m), key=key)
            plans.append(plan)
            heads_of.append(hs)
        return _stack_plans(plans, heads_of, q.shape[0], q.shape[1], k.shape[1]), new_states
    provider = PROVIDERS.get(type(method))
    if provider is None:
        raise ValueError(f"method must be a sparge_jax.method_config.Method with a registered provider; got {method!r}")
    return provider(q, k, v, method, kernel, grid, state, key)
