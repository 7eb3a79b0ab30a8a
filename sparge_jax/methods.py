"""Attention through any mask provider: plan, permute, block-sparse kernel, linear branch, un-permute."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparge_jax.attention import sparse_attention
from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.masks.providers import AttentionPlan, make_plan
from sparge_jax.method_config import HeadMix, LayerMethods, SLAMethod, Sparge2Method
from sparge_jax.sla_linear import linear_block_attention
from sparge_jax.validation import check_qkv


def permute_tokens(x: jax.Array, order: jax.Array) -> jax.Array:
    """x `(batch, seq, heads, d)`, order int32 `(batch, heads, seq)` -> x gathered per head along seq."""
    return jnp.take_along_axis(x, order.transpose(0, 2, 1)[..., None], axis=1)


def unpermute_tokens(x: jax.Array, order: jax.Array) -> jax.Array:
    """Inverse of `permute_tokens` for the same order."""
    return permute_tokens(x, jnp.argsort(order, axis=-1).astype(jnp.int32))


def attend_plan(q, k, v, plan: AttentionPlan, kernel: KernelConfig, *, feature_map_name: str = "softmax",
                linear_projection: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Attention of q `(batch, seq_q, heads, d)` over k, v `(batch, seq_k, heads, d)` as `plan` says.

    Tokens are permuted per head (when the plan has orders), the plan's mask (and token band,
    when it has one) runs through `sparse_attention`, SLA's marginal blocks (`plan.linear_mask`) add
    `linear_projection(linear_block_attention(...))`, and the output goes back to the
    original token order. Returns `(batch, seq_q, heads, d)` in q.dtype. Differentiable
    in q, k, v (the plan is treated as constant).
    """
    check_qkv(q, k, v)
    plan = jax.tree.map(jax.lax.stop_gradient, plan)
    if plan.q_order is not None:
        q = permute_tokens(q, plan.q_order)
    if plan.k_order is not None:
        k, v = permute_tokens(k, plan.k_order), permute_tokens(v, plan.k_order)
    out = sparse_attention(q, k, v, mask=plan.mask, config=SparseConfig(kernel=kernel), band=plan.band)
    if plan.linear_mask is not None:
        if linear_projection is None:
            raise ValueError("linear_projection must be given for a plan with SLA's linear_mask")
        linear = linear_block_attention(q, k, v, plan.linear_mask, block_q=kernel.block_q,
                                        block_k=kernel.block_k, feature_map_name=feature_map_name)
        out = (out.astype(jnp.float32) + linear_projection(linear)).astype(q.dtype)
    if plan.q_order is not None:
        out = unpermute_tokens(out, plan.q_order)
    return out


def _sla_configs(method, layer: int | None = None) -> list[SLAMethod]:
    """The SLA configs inside `method` (only those of `layer` when given and `method` is per-layer)."""
    if isinstance(method, LayerMethods):
        candidates = [method.for_layer(layer)] if layer is not None else [method.default] + [m for _, m in method.layers]
    else:
        candidates = [method]
    return [single for m in candidates for single in (m.methods if isinstance(m, HeadMix) else (m,))
            if isinstance(single, SLAMethod)]


def uses_sla(method, layer: int | None = None) -> bool:
    """Whether `method` (at `layer`, for a `LayerMethods`) has SLA heads."""
    return bool(_sla_configs(method, layer))


def sla_feature_map(method) -> str:
    """The feature map of the (first) SLA config inside `method` ("softmax" when there is none)."""
    configs = _sla_configs(method)
    return configs[0].feature_map if configs else "softmax"


def method_attention(q, k, v, *, config: SparseConfig, grid=None, state: Any = None,
                     key: jax.Array | None = None, layer: int | None = None,
                     linear_projection: Callable[[jax.Array], jax.Array] | None = None) -> tuple[jax.Array, Any]:
    """Attention of q `(batch, seq_q, heads, d)` over k, v by `config.method` (at `layer`, for a
    `LayerMethods`) on `config.kernel`: `make_plan` under stop_gradient, then `attend_plan`.

    A `Sparge2Method` goes straight to `sparse_attention`, whose block lists come from the fused
    selection kernels on the GPU (the same blocks as its plan). See `make_plan` for grid, state,
    key. linear_projection: SLA's learnable projection (e.g.
    `sparge_jax.sla_linear.SLAProjection`), needed when the method has SLA heads. Returns
    (output `(batch, seq_q, heads, d)` in q.dtype, provider state for the next call).
    """
    method = config.method
    if isinstance(method, LayerMethods):
        if layer is None:
            raise ValueError("layer must be given with LayerMethods")
        method = method.for_layer(layer)
    if isinstance(method, Sparge2Method):
        return sparse_attention(q, k, v, config=SparseConfig(method, config.kernel)), state
    plan, state = make_plan(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), jax.lax.stop_gradient(v),
                            method, config.kernel, grid=grid, state=state, key=key)
    out = attend_plan(q, k, v, plan, config.kernel, feature_map_name=sla_feature_map(method),
                      linear_projection=linear_projection)
    return out, state
