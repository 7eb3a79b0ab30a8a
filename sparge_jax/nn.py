"""Flax NNX attention module whose core switches between dense and block-sparse per call."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.platform import target_platform
from sparge_jax.attention import sparse_attention
from sparge_jax.config import SparseConfig
from sparge_jax.context_parallel import check_method, context_degree, ulysses_attention
from sparge_jax.method_config import LayerMethods
from sparge_jax.methods import method_attention, uses_sla

ATTENTION_MODES = ("dense", "sparse")

# rope hook: (q, k) of shape (batch, seq, heads, head_dim) -> rotated (q, k).
RopeFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

# What self-attention calls sow (set by `recording_qkv`; read at trace time): None, nothing;
# else a function `(q, k, v, layer) -> pytree` whose value is sown.
_RECORDING_QKV = contextvars.ContextVar("sparge_recording_qkv", default=None)


def _whole_qkv(q, k, v, layer):
    return q, k, v


@contextlib.contextmanager
def recording_qkv(reduce: Callable[[jax.Array, jax.Array, jax.Array, int | None], Any] | None = None):
    """Within it, every `SparseAttention` self-attention call sows `(q, k, v)` as the
    `nnx.Intermediate` "qkv" of its module (read them with `nnx.pop(model, nnx.Intermediate)`);
    outside it nothing is sown, so jitted and scanned calls keep their state unchanged.

    reduce: `(q, k, v, layer) -> pytree` (layer: the module's layer index), sown instead of
    `(q, k, v)`: it runs inside the forward, so under `jax.jit` only its outputs outlive the
    call (a few scalars per layer instead of every layer's q, k, v)."""
    token = _RECORDING_QKV.set(_whole_qkv if reduce is None else reduce)
    try:
        yield
    finally:
        _RECORDING_QKV.reset(token)


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


XLA_LOGITS_LIMIT = 1 << 26  # logits (batch x heads x query rows x seq_k) the XLA path holds at once


def dense_attention(q, k, v, *, sm_scale: float | None = None, logits_limit: int = XLA_LOGITS_LIMIT
                    ) -> jax.Array:
    """Full softmax attention, `(batch, seq, heads, head_dim)` layout (cuDNN on GPU where it applies,
    XLA elsewhere: any length works).

    `jax.nn.dot_product_attention`'s default implementation is XLA's, which materialises the
    `(batch, heads, seq_q, seq_k)` logits (48 GiB for Wan2.1 at 480p), so cuDNN is asked for
    explicitly where it applies. Elsewhere (CPU, TPU, float32) queries go through in chunks of
    rows whose logits stay within `logits_limit` elements (256 MiB in float32 by default; the
    wide miniature teacher's 24-clip batch held 8 GiB at once), one after another: each row's
    softmax still sees every key, so the result is the unchunked one."""
    if _cudnn_applies(q, k):
        return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, implementation="cudnn")
    batch, seq_q, heads, head_dim = q.shape
    rows = max(1, logits_limit // (batch * heads * k.shape[1]))
    if rows >= seq_q:
        return jax.nn.dot_product_attention(q, k, v, scale=sm_scale)
    chunks = -(-seq_q // rows)
    padded = jnp.pad(q, ((0, 0), (0, chunks * rows - seq_q), (0, 0), (0, 0)))
    per_chunk = padded.reshape(batch, chunks, rows, heads, head_dim).swapaxes(0, 1)
    out = jax.lax.map(lambda q_rows: jax.nn.dot_product_attention(q_rows, k, v, scale=sm_scale), per_chunk)
    return out.swapaxes(0, 1).reshape(batch, chunks * rows, heads, v.shape[-1])[:, :seq_q]


def check_mode(mode: str) -> None:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode must be one of {ATTENTION_MODES}; got {mode!r}")


class SparseAttention(nnx.Module):
    """Multi-head attention: q/k/v/out projections, optional RMS qk-norm over the full
    model dim, an optional rope hook, and a dense or block-sparse core chosen per call,
    so one set of parameters serves a dense teacher and a sparse student.

    Input x `(batch, seq, dim)`; `context` `(batch, seq_kv, kv_dim)` for cross-attention.
    config: the `SparseConfig` of the sparse core. layer: this module's layer index in its
    model, bound at construction: it picks the entry of a `LayerMethods` and seeds the
    providers that draw (SVG, SVG2). SLA is refused: its learnable linear-branch projection
    is not part of this module.
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
        layer: int | None = None,
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
        self.layer, self.mode = layer, mode
        self.config = self._bound(config)
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

    def _bound(self, config: SparseConfig) -> SparseConfig:
        """`config` with a `LayerMethods` replaced by this layer's entry; SLA refused."""
        if isinstance(config.method, LayerMethods):
            if self.layer is None:
                raise ValueError("config.method is a LayerMethods: build the module with its layer index (layer=)")
            config = config.replace(method=config.method.for_layer(self.layer))
        if uses_sla(config.method):
            raise ValueError("config.method uses SLA, whose learnable linear-branch projection this module "
                             "does not hold; run it through sparge_jax.methods.method_attention with a "
                             "sparge_jax.sla_linear.SLAProjection")
        return config

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

    def __call__(self, x, context=None, *, rope: RopeFn | None = None, grid: tuple[int, int, int] | None = None,
                 mode: str | None = None, mask=None, config: SparseConfig | None = None,
                 state: Any = None, key: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """(output `(batch, seq, dim)`, mask-provider state for the next call).

        grid: the latent token grid `(frames, height, width)` the video-aware methods need.
        mode: "dense" or "sparse" (None: the module's). mask: an optional precomputed block
        mask for the sparse core. config: a `SparseConfig` for this call instead of the
        module's. state: what the previous call returned (None: start afresh); SVG2 keeps its
        k-means centroids in it (`step_iters` instead of `init_iters` Lloyd iterations), the
        other methods return it as given. key: PRNG key of the providers that draw (SVG, SVG2);
        None: `jax.random.key(layer)`. With no `mask` the sparse core is
        `sparge_jax.methods.method_attention`. Inside `recording_qkv()` a self-attention call
        sows its q, k, v (after qk-norm and rope), or the context's reduction of them, as the
        `nnx.Intermediate` "qkv" (see `sparge_jax.tools.capture`). Under a mesh with a
        "context" axis (`jax.set_mesh`) the core runs Ulysses context parallel
        (`sparge_jax.context_parallel.ulysses_attention`).
        """
        mode = self.mode if mode is None else mode
        check_mode(mode)
        config = self.config if config is None else self._bound(config)
        q, k, v = self.project_qkv(x, context, rope=rope)
        record = _RECORDING_QKV.get()
        if context is None and record is not None:
            self.sow(nnx.Intermediate, "qkv", record(q, k, v, self.layer))
        if context_degree() > 1:  # Ulysses: the core sees full sequences of a slice of the heads
            if context is not None or mask is not None or state is not None:
                raise ValueError("context parallelism (a mesh with context > 1) runs self-attention only, without "
                                 "a precomputed mask or provider state; got "
                                 + ", ".join(n for n, a in (("context", context), ("mask", mask), ("state", state))
                                             if a is not None))
            if mode == "sparse":
                check_method(config.method)
            core = lambda q, k, v: self._core(q, k, v, mode, None, config, grid, None, key)[0]  # noqa: E731
            out = ulysses_attention(core, q, k, v)
        else:
            out, state = self._core(q, k, v, mode, mask, config, grid, state, key)
        return self.o(out.reshape(*out.shape[:2], self.dim)), state

    def _core(self, q, k, v, mode, mask, config, grid, state, key):
        """(attention output `(batch, seq, heads, head_dim)`, provider state) of the dense or sparse core;
        key: the providers' PRNG key (None: `jax.random.key(layer)`)."""
        if mode == "dense":
            return dense_attention(q, k, v, sm_scale=config.kernel.sm_scale), state
        if mask is None:
            key = jax.random.key(0 if self.layer is None else self.layer) if key is None else key
            return method_attention(q, k, v, config=config, grid=grid, key=key, state=state)
        return sparse_attention(q, k, v, mask=mask, config=config), state

    def attend(self, *args, **kwargs):
        """Removed: `__call__` takes and returns the state now."""
        raise TypeError("SparseAttention.attend(x, ..., method_state=s) is now SparseAttention.__call__(x, ..., "
                        "state=s), which returns (output, state); the layer is bound at construction (layer=)")
