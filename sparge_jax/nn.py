"""Flax NNX attention module whose core switches between dense and block-sparse per call."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.platform import target_platform
from sparge_jax.attention import sparse_attention
from sparge_jax.config import SparseConfig
from sparge_jax.methods import method_attention, uses_sla

ATTENTION_MODES = ("dense", "sparse")

# rope hook: (q, k) of shape (batch, seq, heads, head_dim) -> rotated (q, k).
RopeFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _cudnn_applies(q, k) -> bool:
    """Whether cuDNN flash attention takes these shapes, in the forward and in the backward.

    jax's rule (`jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention`): bf16/fp16,
    head_dim a multiple of 8 (up to 128 here, 256 on Hopper), and, when differentiated, even
    query and key lengths (its training path always passes a bias placeholder, and cuDNN refuses
    a bias with an odd length). Whether a call will be differentiated is unknown here, so odd
    lengths (a text or image context of 5 or 257 tokens) take the XLA implementation."""
    head_dim = q.shape[-1]
    return (target_platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128 and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)


def dense_attention(q, k, v, *, sm_scale: float | None = None) -> jax.Array:
    """Full softmax attention, `(batch, seq, heads, head_dim)` layout (cuDNN on GPU where it applies,
    XLA elsewhere: any length works).

    `jax.nn.dot_product_attention`'s default implementation is XLA's, which materialises the
    `(batch, heads, seq_q, seq_k)` logits (48 GiB for Wan2.1 at 480p), so cuDNN is asked for
    explicitly where it applies."""
    implementation = "cudnn" if _cudnn_applies(q, k) else None
    return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, implementation=implementation)


def check_mode(mode: str) -> None:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode must be one of {ATTENTION_MODES}; got {mode!r}")


class SparseAttention(nnx.Module):
    """Multi-head attention: q/k/v/out projections, optional RMS qk-norm over the full
    model dim, an optional rope hook, and a dense or block-sparse core chosen per call,
    so one set of parameters serves a dense teacher and a sparse student.

    Input x `(batch, seq, dim)`; `context` `(batch, seq_kv, kv_dim)` for cross-attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kv_dim: int | None = None,
        qk_norm: bool = True,
        eps: float = 1e-6,
        config: SparseConfig = SparseConfig(),
        mode: str = "sparse",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        check_mode(mode)
        kv_dim = dim if kv_dim is None else kv_dim
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.config, self.mode = config, mode
        self.q = nnx.Linear(dim, dim, **linear)
        self.k = nnx.Linear(kv_dim, dim, **linear)
        self.v = nnx.Linear(kv_dim, dim, **linear)
        self.o = nnx.Linear(dim, dim, **linear)
        if qk_norm:
            norm = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.norm_q = nnx.RMSNorm(dim, **norm)
            self.norm_k = nnx.RMSNorm(dim, **norm)
        else:
            self.norm_q = self.norm_k = None

    def project_qkv(self, x, context=None, *, rope: RopeFn | None = None):
        """q `(batch, seq, heads, head_dim)` and k, v `(batch, seq_kv, heads, head_dim)`."""
        context = x if context is None else context
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, seq, {self.dim}); got {x.shape}")
        q, k, v = self.q(x), self.k(context), self.v(context)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        heads = lambda t: t.reshape(*t.shape[:2], self.num_heads, self.head_dim)
        q, k, v = heads(q), heads(k), heads(v)
        if rope is not None:
            q, k = rope(q, k)
        return q, k, v

    def __call__(self, x, context=None, *, rope: RopeFn | None = None, mode: str | None = None,
                 mask=None, config: SparseConfig | None = None, grid: tuple[int, int, int] | None = None,
                 layer: int | None = None):
        """Returns `(batch, seq, dim)`. `mode`/`config` override the module's for this call;
        `mask` is an optional precomputed block mask for the sparse core.

        With a peer method in `config.method` (see `sparge_jax.method_config`) and no `mask`,
        the sparse core is `sparge_jax.methods.method_attention`: `grid` is the latent token
        grid `(frames, height, width)` the video-aware methods need and `layer` picks the
        entry of a `LayerMethods`. SLA is refused: its learnable projection is not part of
        this module. `attend` is the same call with the mask provider's state (SVG2's
        centroids) passed in and out.
        """
        out, _ = self.attend(x, context, rope=rope, mode=mode, mask=mask, config=config, grid=grid, layer=layer)
        return out

    def attend(self, x, context=None, *, rope: RopeFn | None = None, mode: str | None = None, mask=None,
               config: SparseConfig | None = None, grid: tuple[int, int, int] | None = None,
               layer: int | None = None, method_state: Any = None) -> tuple[jax.Array, Any]:
        """`__call__`, plus the peer mask provider's state: `method_state` from the previous
        call (None: start afresh) -> (output `(batch, seq, dim)`, state for the next call).
        The state is what `make_plan` returns (SVG2: `Centroids`, reused with `step_iters`
        instead of `init_iters`); calls that run no peer method return `method_state` as given."""
        mode = self.mode if mode is None else mode
        check_mode(mode)
        config = self.config if config is None else config
        q, k, v = self.project_qkv(x, context, rope=rope)
        if mode == "dense":
            out = dense_attention(q, k, v, sm_scale=config.kernel.sm_scale)
        elif mask is None:
            if uses_sla(config.method, layer):
                raise ValueError("config.method uses SLA, whose learnable linear-branch projection this module "
                                 "does not hold; run it through sparge_jax.methods.method_attention with a "
                                 "sparge_jax.sla_linear.SLAProjection")
            key = jax.random.key(0 if layer is None else layer)
            out, method_state = method_attention(q, k, v, config=config, grid=grid, layer=layer, key=key,
                                                 state=method_state)
        else:
            out = sparse_attention(q, k, v, mask=mask, config=config)
        return self.o(out.reshape(*out.shape[:2], self.dim)), method_state
