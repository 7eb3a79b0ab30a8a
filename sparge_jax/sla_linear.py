"""SLA's linear-attention branch over the marginal blocks, and its learnable output projection.

For query token t in q block i, with phi the feature map:
  out_t = phi(q_t) H_i / (phi(q_t) . Z_i + eps),
  H_i = sum over marginal k blocks j of phi(K_j)^T V_j,  Z_i = sum over those j of sum_u phi(k_u).
It is plain differentiable jnp (O(seq * head_dim^2) per head); gradients come from autodiff
of this blocked form and are tested against a dense token-level formulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.blocks import to_blocks
from sparge_jax.method_config import FEATURE_MAPS

LINEAR_EPS = 1e-5


def feature_map(x: jax.Array, name: str) -> jax.Array:
    """phi(x) in fp32: "softmax" over head_dim, "elu" (elu(x) + 1) or "relu"."""
    x = x.astype(jnp.float32)
    if name == "softmax":
        return jax.nn.softmax(x, axis=-1)
    if name == "elu":
        return jax.nn.elu(x) + 1.0
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}; got {name!r}")


def linear_block_attention(q, k, v, marginal: jax.Array, *, block_q: int, block_k: int,
                           feature_map_name: str = "softmax") -> jax.Array:
    """Linear attention of each q block over its marginal k blocks.

    q `(batch, seq_q, heads, d)`, k/v `(batch, seq_k, heads, d)`, marginal bool
    `(batch, heads, q_blocks, k_blocks)`. Returns fp32 `(batch, seq_q, heads, d)`; rows
    with no marginal block are 0. Padding tokens of the tail blocks contribute nothing
    (their features are zero-padded after the feature map).
    """
    fk = to_blocks(feature_map(k, feature_map_name), block_k)
    vb = to_blocks(v.astype(jnp.float32), block_k)
    kv = jnp.einsum("bjthd,bjthe->bhjde", fk, vb)
    ksum = jnp.einsum("bjthd->bhjd", fk)
    m = marginal.astype(jnp.float32)
    h_state = jnp.einsum("bhij,bhjde->bhide", m, kv)
    z_state = jnp.einsum("bhij,bhjd->bhid", m, ksum)
    fq = to_blocks(feature_map(q, feature_map_name), block_q)
    num = jnp.einsum("bithd,bhide->bithe", fq, h_state)
    den = jnp.einsum("bithd,bhid->bith", fq, z_state)
    out = num / (den + LINEAR_EPS)[..., None]
    b, nq, bq, h, d = out.shape
    return out.reshape(b, nq * bq, h, d)[:, : q.shape[1]]


class SLAProjection(nnx.Module):
    """SLA's learnable projection of the linear branch: Linear(head_dim, head_dim), shared
    by the heads, zero-initialised so a fresh SLA layer starts as its sparse branch alone."""

    def __init__(self, head_dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.linear = nnx.Linear(head_dim, head_dim, kernel_init=nnx.initializers.zeros,
                                 bias_init=nnx.initializers.zeros, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, linear_out: jax.Array) -> jax.Array:
        """`(batch, seq, heads, head_dim)` -> same shape, fp32."""
        return self.linear(linear_out.astype(jnp.float32))
