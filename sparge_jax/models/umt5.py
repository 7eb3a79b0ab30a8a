"""The umT5 text encoder (the encoder half of umT5-XXL, Wan2.1's text encoder) in Flax NNX.

Same network as transformers' `UMT5EncoderModel` and Wan2.1's `T5Encoder` (wan/modules/t5.py,
`shared_pos=False`): token embedding; per layer RMS norm -> self-attention with the layer's own
relative position bias (T5 buckets, bidirectional) and no 1/sqrt(d) scaling -> residual, RMS
norm -> gated-GELU FFN (tanh GELU) -> residual; final RMS norm. Parameter names follow Wan2.1's
checkpoint (`blocks.N.attn.q`, `blocks.N.ffn.gate`, `blocks.N.pos_embedding`, ...), so
`convert.umt5` maps them one to one.

Precision: the residual stream, the norms (variance in float32), the position bias, the attention
scores and their softmax run in float32; the projections run in the compute `dtype`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparge_jax.config_builder import StoredConfig
from sparge_jax.models.wan import gelu_tanh


@dataclasses.dataclass(frozen=True)
class UMT5Config(StoredConfig):
    """Architecture of a umT5 encoder; the defaults are umT5-XXL as Wan2.1 uses it.

    vocab_size: token embedding rows; d_model: width of the residual stream (the `text_dim` of
    `WanConfig`); d_kv, num_heads: per-head width and heads (attention width d_kv * num_heads);
    d_ff: gated FFN width; num_layers: blocks; num_buckets, max_distance: T5 relative position
    buckets (bidirectional: half the buckets per direction) and the distance from which on all
    positions share the last bucket; eps: RMS norm epsilon.
    """

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers", "max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not isinstance(self.num_buckets, int) or self.num_buckets < 4 or self.num_buckets % 4:
            raise ValueError(f"num_buckets must be a positive multiple of 4; got {self.num_buckets!r}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"max_distance must exceed num_buckets // 4 ({self.num_buckets // 4}); "
                             f"got {self.max_distance}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive; got {self.eps!r}")

    @property
    def inner_dim(self) -> int:
        """Width of q, k, v: d_kv * num_heads."""
        return self.d_kv * self.num_heads


UMT5_CONFIGS: dict[str, UMT5Config] = {
    "umt5-xxl": UMT5Config(),
    # For tests and CPU demos (the fixtures' architecture).
    "tiny": UMT5Config(vocab_size=300, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2),
}


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 `(q_len, k_len)`: the bidirectional T5 bucket of each key position minus query position.

    Half the buckets per sign; within each, distances below a quarter of `num_buckets` have a
    bucket each, larger ones share logarithmically wider buckets up to `max_distance`, beyond
    which all fall in the last. The logarithm is taken in float32 as transformers and Wan2.1 do
    (it decides the bucket at exact boundaries)."""
    relative = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    distance = np.abs(relative)
    scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return ((relative > 0) * half + np.where(distance < max_exact, distance, large)).astype(np.int32)


def rms_norm(dim: int, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """T5's norm: x / sqrt(mean(x^2) + eps) * scale, no mean, no bias, computed in float32."""
    return nnx.RMSNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


class UMT5Attention(nnx.Module):
    """Self-attention without biases or scaling; `(batch, seq, d_model) -> (batch, seq, d_model)`."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.q = nnx.Linear(config.d_model, config.inner_dim, **linear)
        self.k = nnx.Linear(config.d_model, config.inner_dim, **linear)
        self.v = nnx.Linear(config.d_model, config.inner_dim, **linear)
        self.o = nnx.Linear(config.inner_dim, config.d_model, **linear)

    def __call__(self, x, bias, mask):
        """x `(batch, seq, d_model)`; bias float32 `(heads, seq, seq)`; mask bool `(batch, seq)`
        (False: a padded key, which no query attends to)."""
        batch, seq, _ = x.shape
        heads = (batch, seq, self.num_heads, self.d_kv)
        q, k, v = (proj(x).reshape(heads) for proj in (self.q, self.k, self.v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias[None]
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.o(out.reshape(batch, seq, -1))


class GatedGeluFFN(nnx.Module):
    """fc2(gelu_tanh(gate(x)) * fc1(x)); `(..., d_model) -> (..., d_model)`."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = nnx.Linear(config.d_model, config.d_ff, **linear)
        self.fc1 = nnx.Linear(config.d_model, config.d_ff, **linear)
        self.fc2 = nnx.Linear(config.d_ff, config.d_model, **linear)

    def __call__(self, x):
        return self.fc2(gelu_tanh(self.gate(x)) * self.fc1(x))


class UMT5Block(nnx.Module):
    """norm1 -> attn (with this layer's position bias) -> residual; norm2 -> ffn -> residual."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = config
        self.norm1 = rms_norm(config.d_model, config.eps, param_dtype, rngs)
        self.attn = UMT5Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = rms_norm(config.d_model, config.eps, param_dtype, rngs)
        self.ffn = GatedGeluFFN(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pos_embedding = nnx.Embed(config.num_buckets, config.num_heads, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, buckets, mask):
        """x float32 `(batch, seq, d_model)`; buckets int32 `(seq, seq)`; mask bool `(batch, seq)`."""
        bias = self.pos_embedding(buckets).astype(jnp.float32).transpose(2, 0, 1)
        x = x + self.attn(self.norm1(x), bias, mask).astype(jnp.float32)
        return x + self.ffn(self.norm2(x)).astype(jnp.float32)


class UMT5Encoder(nnx.Module):
    """umT5 encoder: ids int `(batch, seq)` + attention mask `(batch, seq)` (1/True: a token,
    0/False: padding) -> float32 `(batch, seq, d_model)`. Padded positions get values too (they
    attend to the real tokens), as in transformers; `TextEncoder` zeroes them.

    dtype: compute dtype of the projections (None: `param_dtype`, so bf16 params compute in bf16
    rather than promoted to the float32 of the residual stream); param_dtype: dtype the
    parameters are created in."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.config = config
        dtype = param_dtype if dtype is None else dtype  # flax would promote to the inputs' float32
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(config.vocab_size, config.d_model, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([UMT5Block(config, **kw) for _ in range(config.num_layers)])
        self.norm = rms_norm(config.d_model, config.eps, param_dtype, rngs)

    def check_inputs(self, ids, mask):
        """ValueError unless ids are integer `(batch, seq)` (in the vocabulary, where they are NumPy)
        and mask is bool or integer of the same shape."""
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"ids must be integer token ids of shape (batch, seq); got {ids.dtype} {ids.shape}")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of ids {ids.shape}; got {mask.shape}")
        if not (jnp.issubdtype(mask.dtype, jnp.integer) or mask.dtype == jnp.bool_):
            raise ValueError(f"attention_mask must be bool or integer (1: token, 0: padding); got {mask.dtype}")
        if isinstance(ids, np.ndarray) and ids.size and not 0 <= ids.min() <= ids.max() < self.config.vocab_size:
            raise ValueError(f"ids must lie in [0, vocab_size={self.config.vocab_size}); "
                             f"got values in [{ids.min()}, {ids.max()}]")

    def __call__(self, ids, attention_mask):
        self.check_inputs(ids, attention_mask)
        mask = attention_mask.astype(bool)
        buckets = jnp.asarray(relative_position_buckets(ids.shape[1], ids.shape[1], self.config.num_buckets,
                                                        self.config.max_distance))
        x = self.token_embedding(ids).astype(jnp.float32)
        for block in self.blocks:
            x = block(x, buckets, mask)
        return self.norm(x)
