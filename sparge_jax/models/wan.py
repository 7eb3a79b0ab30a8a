"""The Wan2.1 video diffusion transformer (DiT) in Flax NNX.

Same network as Wan2.1's `WanModel` and diffusers' `WanTransformer3DModel`; parameter names
follow the original checkpoints (`blocks.N.self_attn.q`, `blocks.N.norm3`, `head.head`, ...)
so `convert` maps them one to one. Self-attention runs through `sparge_jax.nn.SparseAttention`
(dense or block-sparse per call). Precision follows the original: the residual stream, norms,
modulation, time embedding and head run in float32; the attention/FFN/text projections run in
the compute `dtype`. `WanModel(residual_dtype=jnp.bfloat16)` stores the residual stream in
bf16 instead, as diffusers' bf16 pipeline does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.config_builder import StoredConfig
from sparge_jax.context_parallel import shard_tokens
from sparge_jax.method_config import Sparge2Method
from sparge_jax.models.remat import checkpoint_block
from sparge_jax.models.rope import grid_rope, sincos_embedding
from sparge_jax.nn import ATTENTION_MODES, SparseAttention, check_mode, dense_attention

MODEL_TYPES = ("t2v", "i2v")
PREDICTIONS = ("velocity", "clean")  # what the head predicts (`WanConfig.prediction`)
CLEAN_SIGMA_MIN = 0.05  # floor on sigma when a "clean" head's output is turned into a velocity


@dataclasses.dataclass(frozen=True)
class WanConfig(StoredConfig):
    """Architecture of a Wan2.1 DiT plus its self-attention sparsity settings.

    model_type: "t2v" or "i2v" (image-to-video: CLIP image tokens and an extra conditioning video).
    patch_size: (frames, height, width) of a latent patch.
    in_dim / out_dim: latent channels in (i2v: latents + conditioning channels) and out.
    dim, ffn_dim, num_heads, num_layers: transformer width, FFN width, heads, blocks.
    freq_dim: sinusoidal timestep features; text_dim: text-encoder (umT5) width.
    qk_norm: RMS norm on q and k over the full dim; cross_attn_norm: affine LayerNorm before
      cross-attention; eps: epsilon of those norms and the block LayerNorms.
    image_dim: CLIP feature width (i2v only, 1280 for Wan2.1).
    rope_theta: RoPE base.
    coordinate_channels: append `COORDINATES` channels to the latents before the patch embedding
      (`coordinate_grid`: each cell's frame, row and column, in [-1, 1] across the clip), whose
      kernel then takes in_dim + 3 channels. Not in Wan2.1, whose tokens know only their relative
      positions (RoPE): at pure noise such a model tells a token in the top-left corner from one
      in the centre only by what it learns from the clip's edges (a uniform input gives every
      token the same output). Measured, they did not make the miniature teacher learn what its
      captions place (docs/teacher.md). `with_coordinate_channels` adds them to trained weights.
    absolute_positions: add a fixed sin-cos embedding of each token's frame, row and column
      (`sincos_embedding`, at full scale: norm sqrt(dim / 2)) to the patch-embedded tokens, as DiT
      does in 2D. Not in Wan2.1 (RoPE only); for a model that must know, at pure noise, which
      frame or side of the clip a token is in without learning it from the clip's edges.
    prediction: what the head predicts. "velocity" (Wan2.1): the call returns the head's output.
      "clean": the head predicts the clean latents x0 (Li & He 2025, "Back to Basics: Let
      Denoising Generative Models Denoise": the noise then never has to pass through the
      network), and the call returns the velocity it implies, (latents - head) / max(sigma,
      `CLEAN_SIGMA_MIN`) with sigma = timestep / 1000, so samplers, losses and distillation see a
      velocity either way. Below `CLEAN_SIGMA_MIN` the head's optimum is latents - 0.05 v, that
      is x0 + (sigma - 0.05) (noise - x0): x0 with a little of the noise and clip mixed in.
    sparse: `SparseConfig` of the self-attention sparse core (its method and kernel).
    dense_layers: block indices whose self-attention always runs dense.
    attention_mode: default self-attention mode ("dense" or "sparse") when a call passes None.
    scan_layers: run each stretch of consecutive blocks whose self-attention runs alike (dense,
      or sparse with one method) as one `jax.lax.scan` over their stacked params, so each kernel
      is lowered once per stretch instead of once per block (shorter compiles, same values).
      The params stay per block (`blocks.N....`), so checkpoints are the same either way.
    """

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int | None = None
    rope_theta: float = 10000.0
    coordinate_channels: bool = False
    absolute_positions: bool = False
    prediction: str = "velocity"
    sparse: SparseConfig = SparseConfig()
    dense_layers: tuple[int, ...] = ()
    attention_mode: str = "sparse"
    scan_layers: bool = False

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}; got {self.model_type!r}")
        if len(self.patch_size) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be 3 positive ints (frames, height, width); got {self.patch_size!r}")
        for name in ("in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_heads", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim ({self.dim}) must split into num_heads ({self.num_heads}) heads of even size")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even; got {self.freq_dim}")
        if self.model_type == "i2v":
            if self.image_dim is None or self.image_dim < 1:
                raise ValueError(f"image_dim must be a positive int for i2v; got {self.image_dim!r}")
            if self.in_dim <= self.out_dim:
                raise ValueError(f"i2v needs in_dim > out_dim (latents + conditioning); got {self.in_dim}, {self.out_dim}")
        elif self.image_dim is not None:
            raise ValueError(f"image_dim is for i2v only; got {self.image_dim!r} with model_type 't2v'")
        bad = [i for i in self.dense_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dense_layers must be block indices in [0, {self.num_layers}); got {bad}")
        check_mode(self.attention_mode)
        if not isinstance(self.coordinate_channels, bool):
            raise ValueError(f"coordinate_channels must be a bool; got {self.coordinate_channels!r}")
        if not isinstance(self.absolute_positions, bool):
            raise ValueError(f"absolute_positions must be a bool; got {self.absolute_positions!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}; got {self.prediction!r}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers must be a bool; got {self.scan_layers!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def replace(self, **changes) -> "WanConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


WAN_CONFIGS: dict[str, WanConfig] = {
    "t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-14b": WanConfig(
        model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, image_dim=1280
    ),
    # A few-layer model for tests and CPU smoke runs (head_dim 16, sparse blocks sized for short sequences).
    "tiny": WanConfig(
        dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32,
        sparse=SparseConfig(Sparge2Method(topk=0.25, topp=0.5), KernelConfig(block_q=32, block_k=16)),
    ),
    "tiny-i2v": WanConfig(
        model_type="i2v", in_dim=32, dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, image_dim=48,
        sparse=SparseConfig(Sparge2Method(topk=0.25, topp=0.5), KernelConfig(block_q=32, block_k=16)),
    ),
}


def _high_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """x (float64) with its mantissa cut to `bits` significant bits (exact in float32)."""
    mantissa, exponent = np.frexp(x)
    return np.ldexp(np.floor(mantissa * 2.0**bits) / 2.0**bits, exponent)


def timestep_features(timestep: jax.Array, freq_dim: int) -> jax.Array:
    """Sinusoidal features float32 `(batch, freq_dim)` of timesteps `(batch,)`: cos then sin of
    `t * 10000 ** (-i / half)`, i < half = freq_dim // 2.

    Wan2.1 computes these in float64; a plain float32 product `t * freq` is off by up to
    ~3e-5 rad at t ~ 1000. Here the angle is built from exact float32 pieces instead: the integer
    part of t times a 12-bit head of each frequency is exact (t < 2048), reduced modulo 2*pi with
    a 12-bit head of 2*pi (exact) and its tail, plus the small remaining terms. Error ~1e-7.
    """
    half = freq_dim // 2
    freqs = 10000.0 ** (-np.arange(half, dtype=np.float64) / half)
    freq_head = _high_bits(freqs, 12)
    two_pi_head = _high_bits(np.array(2 * np.pi), 12)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    t = timestep.astype(jnp.float32)[:, None]
    t_int = jnp.floor(t)
    t_frac = t - t_int
    coarse = t_int * f32(freq_head)
    turns = jnp.round(coarse / f32(2 * np.pi))
    angles = ((coarse - turns * f32(two_pi_head)) - turns * f32(2 * np.pi - two_pi_head)
              + (t_int * f32(freqs - freq_head) + t_frac * f32(freqs)))
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, in float32."""
    x = x.astype(jnp.float32)
    centered = x - x.mean(axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)


def affine_layer_norm(dim: int, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with scale and bias computed in float32 (two-pass variance, like torch)."""
    return nnx.LayerNorm(
        dim, epsilon=eps, use_fast_variance=False, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
    )


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


class MLP(nnx.Module):
    """linear_1 -> activation -> linear_2; `(..., in_dim) -> (..., out_dim)`."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, activation: Callable, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = nnx.Linear(in_dim, hidden_dim, **linear)
        self.linear_2 = nnx.Linear(hidden_dim, out_dim, **linear)
        self.activation = activation

    def __call__(self, x):
        return self.linear_2(self.activation(self.linear_1(x)))


class ImageEmbedding(nnx.Module):
    """CLIP image tokens `(batch, n, image_dim)` -> context `(batch, n, dim)`:
    LayerNorm -> Linear -> GELU (exact) -> Linear -> LayerNorm (LayerNorms eps 1e-5, float32)."""

    def __init__(self, image_dim: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.norm1 = affine_layer_norm(image_dim, 1e-5, param_dtype, rngs)
        self.mlp = MLP(image_dim, image_dim, dim, gelu_exact, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = affine_layer_norm(dim, 1e-5, param_dtype, rngs)

    def __call__(self, clip_fea):
        return self.norm2(self.mlp(self.norm1(clip_fea.astype(jnp.float32))))


class WanCrossAttention(SparseAttention):
    """Dense cross-attention from video tokens to text context, plus (i2v) a second attention to
    image context through its own k_img/v_img projections and norm_k_img; both outputs are
    summed before the output projection."""

    def __init__(self, dim: int, num_heads: int, *, image_context: bool, qk_norm: bool, eps: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        super().__init__(dim, num_heads, qk_norm=qk_norm, eps=eps, mode="dense", dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k_img = nnx.Linear(dim, dim, **linear) if image_context else None
        self.v_img = nnx.Linear(dim, dim, **linear) if image_context else None
        self.norm_k_img = (
            nnx.RMSNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if image_context and qk_norm else None
        )

    def __call__(self, x, context, image_context=None):
        """x `(batch, seq, dim)`, context `(batch, text_len, dim)`, image_context `(batch, n, dim)`
        or None -> `(batch, seq, dim)`."""
        q, k, v = self.project_qkv(x, context)
        out = dense_attention(q, k, v)
        if image_context is not None:
            if self.k_img is None:
                raise ValueError("image_context given to a cross-attention built without the image branch (t2v)")
            k_img = self.k_img(image_context)
            if self.norm_k_img is not None:
                k_img = self.norm_k_img(k_img)
            heads = lambda t: t.reshape(*t.shape[:2], self.num_heads, self.head_dim)
            out = out + dense_attention(q, heads(k_img), heads(self.v_img(image_context)))
        return self.o(out.reshape(*out.shape[:2], self.dim))


class WanBlock(nnx.Module):
    """One DiT block: modulated self-attention (RoPE), cross-attention, modulated GELU-tanh FFN.

    `modulation` `(1, 6, dim)` plus the time projection gives shift/scale/gate for the
    self-attention and the FFN. The residual stream keeps the dtype it comes in (float32, or
    bfloat16 with `WanModel(residual_dtype=...)`): each norm, modulation and residual add is
    computed in float32 and its sum stored back in that dtype, rounded once (diffusers'
    `(x.float() + out * gate).type_as(x)`; a no-op for float32).
    """

    def __init__(self, config: WanConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        self.eps = c.eps
        self.dense = layer in c.dense_layers  # self-attention always dense
        self.modulation = nnx.Param(
            jax.random.normal(rngs.params(), (1, 6, c.dim), param_dtype) / math.sqrt(c.dim)
        )
        self.self_attn = SparseAttention(c.dim, c.num_heads, qk_norm=c.qk_norm, eps=c.eps, config=c.sparse,
                                         layer=layer, mode=c.attention_mode, dtype=dtype, param_dtype=param_dtype,
                                         rngs=rngs)
        self.norm3 = affine_layer_norm(c.dim, c.eps, param_dtype, rngs) if c.cross_attn_norm else None
        self.cross_attn = WanCrossAttention(c.dim, c.num_heads, image_context=c.model_type == "i2v",
                                            qk_norm=c.qk_norm, eps=c.eps, dtype=dtype, param_dtype=param_dtype,
                                            rngs=rngs)
        self.ffn = MLP(c.dim, c.ffn_dim, c.dim, gelu_tanh, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, e0, context, image_context=None, state=None, *, rope, grid, mode: str, key=None):
        """(x, state) after the block, x in its input's dtype. x `(batch, seq, dim)`, float32 or
        bfloat16 (the residual stream's dtype); e0 float32
        `(batch, 6, dim)`; context `(batch, text_len, dim)`; image_context `(batch, n, dim)` or
        None; state: the self-attention's mask-provider state (`SparseAttention.__call__`);
        rope: (q, k) -> (q, k); grid `(frames, height, width)` of the tokens; mode "dense" |
        "sparse" (a block of `dense_layers` runs dense); key: PRNG key of the self-attention's
        drawing providers (None: `jax.random.key(layer)`)."""
        e = self.modulation[...].astype(jnp.float32) + e0
        shift_attn, scale_attn, gate_attn, shift_ffn, scale_ffn, gate_ffn = jnp.split(e, 6, axis=1)
        h = layer_norm(x, self.eps) * (1 + scale_attn) + shift_attn
        attn, state = self.self_attn(h, rope=rope, grid=grid, mode="dense" if self.dense else mode, state=state,
                                    key=key)
        x = _residual_add(x, attn.astype(jnp.float32) * gate_attn)
        h = x.astype(jnp.float32)
        h = h if self.norm3 is None else self.norm3(h)
        x = _residual_add(x, self.cross_attn(h, context, image_context).astype(jnp.float32))
        h = layer_norm(x, self.eps) * (1 + scale_ffn) + shift_ffn
        return _residual_add(x, self.ffn(h).astype(jnp.float32) * gate_ffn), state


def _residual_add(x, update):
    """x + update in float32, back in x's dtype (the residual stream's: float32 or bfloat16)."""
    return (x.astype(jnp.float32) + update).astype(x.dtype)


class PatchEmbedding(nnx.Module):
    """Wan's patch embedding (a Conv3d whose stride is its kernel, `patch_size`) computed as one
    matmul over the latents cut into their non-overlapping patches (`patchify`): the same values
    and params as `nnx.Conv` (kernel `(pt, ph, pw, in_dim, dim)`, bias `(dim,)`, initialised and
    promoted alike). XLA's CPU convolution took 13 of the 14 s of a small model's training step on
    the teacher's clips (batch 8; it grew ~3x per doubling of the batch); a matmul does not.
    """

    def __init__(self, in_dim: int, dim: int, patch_size: tuple[int, int, int], *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.patch_size = tuple(patch_size)
        self.dtype = dtype
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (*self.patch_size, in_dim, dim),
                                                                param_dtype))
        self.bias = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (dim,), param_dtype))

    def __call__(self, latents):
        """latents `(batch, frames, height, width, in_dim)` (multiples of `patch_size`) ->
        tokens `(batch, frames/pt, height/ph, width/pw, dim)`."""
        patches, kernel, bias = nnx.nn.dtypes.promote_dtype(
            (patchify(latents, self.patch_size), self.kernel[...], self.bias[...]), dtype=self.dtype)
        return jnp.einsum("bfhwtyxc,tyxcd->bfhwd", patches, kernel) + bias


class WanHead(nnx.Module):
    """Output head: LayerNorm modulated by `modulation` `(1, 2, dim)` + time embedding, then a
    float32 Linear to `out_dim * prod(patch_size)` per token."""

    def __init__(self, config: WanConfig, *, param_dtype, rngs: nnx.Rngs):
        c = config
        self.eps = c.eps
        self.modulation = nnx.Param(
            jax.random.normal(rngs.params(), (1, 2, c.dim), param_dtype) / math.sqrt(c.dim)
        )
        self.head = nnx.Linear(c.dim, c.out_dim * math.prod(c.patch_size), dtype=jnp.float32,
                               param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, time_embedding):
        """x `(batch, seq, dim)` (the residual stream: float32 or bfloat16, normed in float32),
        time_embedding float32 `(batch, dim)` -> float32 `(batch, seq, out)`."""
        shift, scale = jnp.split(self.modulation[...].astype(jnp.float32) + time_embedding[:, None], 2, axis=1)
        return self.head(layer_norm(x, self.eps) * (1 + scale) + shift)


class WanModel(nnx.Module):
    """Wan2.1 DiT. `dtype`: compute dtype of the big projections (None: `param_dtype`, so bf16
    params compute in bf16 rather than promoted to the float32 of the residual stream);
    `param_dtype`: dtype the parameters are created in; `remat`: recompute each block's
    activations in the backward pass (`nnx.remat`), so training keeps only the block inputs
    (same values and gradients, more compute). `config.scan_layers` scans runs of alike blocks
    (`layer_runs`). `remat_input_dtype`: the dtype scanned blocks keep each block's float32
    input in for that recompute; float32 is exact, bfloat16 halves those bytes and computes the
    gradients at the rounded inputs (`sparge_jax.models.remat.checkpoint_block`); blocks that
    are not scanned keep float32. `residual_dtype`: the dtype the residual stream `(batch, seq,
    dim)` is stored in between and inside the blocks: float32 (default) as Wan2.1 under
    autocast; bfloat16 as diffusers' bf16 pipeline (norms, modulation and residual adds still
    computed in float32, each sum rounded to bf16 once; `WanBlock`), half the bytes each norm
    and add reads and writes. With bfloat16 the block inputs are bf16 already and remat saves
    them as they are, so `remat_input_dtype` has no effect."""

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 remat: bool = False, remat_input_dtype=jnp.float32, residual_dtype=jnp.float32):
        c = config
        self.config = c
        self.remat = remat
        self.remat_input_dtype = jnp.dtype(remat_input_dtype)
        self.residual_dtype = jnp.dtype(residual_dtype)
        if not jnp.issubdtype(self.residual_dtype, jnp.floating):
            raise ValueError(f"residual_dtype must be a floating dtype (float32 or bfloat16); got {self.residual_dtype}")
        dtype = param_dtype if dtype is None else dtype  # flax would promote to the inputs' float32
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        fp32 = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        in_dim = c.in_dim + COORDINATES * c.coordinate_channels
        self.patch_embedding = PatchEmbedding(in_dim, c.dim, c.patch_size, **kw)
        self.text_embedding = MLP(c.text_dim, c.dim, c.dim, gelu_tanh, **kw)
        self.time_embedding = MLP(c.freq_dim, c.dim, c.dim, jax.nn.silu, **fp32)
        self.time_projection = nnx.Linear(c.dim, 6 * c.dim, **fp32)
        self.blocks = nnx.List([WanBlock(c, layer, **kw) for layer in range(c.num_layers)])
        self.head = WanHead(c, param_dtype=param_dtype, rngs=rngs)
        self.img_emb = ImageEmbedding(c.image_dim, c.dim, **kw) if c.model_type == "i2v" else None

    def _check_inputs(self, latents, timestep, context, clip_fea, y):
        c = self.config
        if latents.ndim != 5:
            raise ValueError(f"latents must have shape (batch, frames, height, width, channels); got {latents.shape}")
        batch = latents.shape[0]
        channels = latents.shape[-1] + (0 if y is None else y.shape[-1])
        if channels != c.in_dim:
            raise ValueError(
                f"latents (+ y) must have {c.in_dim} channels in total; got latents {latents.shape}"
                + ("" if y is None else f", y {y.shape}")
            )
        if any(n % p for n, p in zip(latents.shape[1:4], c.patch_size)):
            raise ValueError(f"latents frames/height/width {latents.shape[1:4]} must be multiples of patch_size "
                             f"{c.patch_size}")
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must have shape ({batch},); got {timestep.shape}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != c.text_dim:
            raise ValueError(f"context must have shape ({batch}, text_len, {c.text_dim}); got {context.shape}")
        if c.model_type == "i2v":
            if clip_fea is None or y is None:
                raise ValueError("an i2v model needs clip_fea (batch, n, image_dim) and y (batch, F, H, W, channels)")
            if clip_fea.ndim != 3 or clip_fea.shape[0] != batch or clip_fea.shape[-1] != c.image_dim:
                raise ValueError(f"clip_fea must have shape ({batch}, n, {c.image_dim}); got {clip_fea.shape}")
            if y.shape[:4] != latents.shape[:4]:
                raise ValueError(f"y must have shape {latents.shape[:4] + (c.in_dim - latents.shape[-1],)}; "
                                 f"got {y.shape}")
        elif clip_fea is not None or y is not None:
            raise ValueError("clip_fea and y are for i2v models only")

    def __call__(self, latents, timestep, context, state=None, *, clip_fea=None, y=None,
                 attention_mode: str | None = None, scan_layers: bool | None = None,
                 scan_stacked: frozenset[str] | None = None, scan_runs: tuple[range, ...] | None = None):
        """(velocity float32 `(batch, frames, height, width, out_dim)`, state for the next call).

        latents `(batch, frames, height, width, channels)`; timestep `(batch,)` in [0, 1000];
        context `(batch, text_len, text_dim)`; i2v: clip_fea `(batch, n, image_dim)` and
        y `(batch, frames, height, width, in_dim - channels)`. attention_mode "dense" | "sparse" |
        None (the config's) applies to every self-attention except `config.dense_layers`.
        scan_layers: None (the config's) or whether this call scans runs of alike blocks
        (`layer_runs`; a scanned block's q, k, v are not sown, so `recording_qkv` needs False).
        scan_stacked: which block params a scan takes stacked, as paths inside a block
        ("self_attn/q/kernel"); None: all of them. A stacked param is copied into one array over
        the run's layers (what a differentiated param needs: its gradient comes out stacked the
        same way); every other one is read from its own layer's array as the scan reaches it, a
        copy of one layer's at a time (`_scan_blocks`). Same values either way; a call that is not
        differentiated passes an empty set and copies no stack of the model (26 GiB at 14B, bf16).
        scan_runs: the runs of blocks to scan, in order, covering every block, each inside one of
        `layer_runs(mode)`'s (so finer: a caller whose params are slices of stacks over those runs
        scans each stack as it is, `train.block_stacks`); None: `layer_runs(mode)`.

        state: the self-attention mask providers' state, carried from one denoising step to the
        next: None (start afresh) or what the previous call returned, a tuple with one entry per
        block (None where the block's provider keeps none). With an `SVG2Method`, each layer then
        reuses its k-means centroids (`step_iters` Lloyd iterations instead of `init_iters`). The
        batch must keep its size and order between the calls (e.g. conditional and unconditional
        halves of CFG).
        """
        c = self.config
        self._check_inputs(latents, timestep, context, clip_fea, y)
        mode = c.attention_mode if attention_mode is None else attention_mode
        check_mode(mode)
        if state is None:
            state = (None,) * len(self.blocks)
        elif not isinstance(state, tuple) or len(state) != len(self.blocks):
            raise ValueError(f"state must be None or a tuple of {len(self.blocks)} per-block states "
                             f"(what the previous call returned); got {type(state).__name__}")
        noisy = latents
        if y is not None:
            latents = jnp.concatenate([latents, y.astype(latents.dtype)], axis=-1)
        if c.coordinate_channels:
            latents = jnp.concatenate([latents, coordinate_grid(latents.shape[:4], latents.dtype)], axis=-1)
        tokens = self.patch_embedding(latents)
        batch, *grid, _ = tokens.shape
        grid = tuple(grid)
        x = tokens.reshape(batch, -1, c.dim)
        if c.absolute_positions:
            x = x + sincos_embedding(grid, c.dim, c.rope_theta)
        x = shard_tokens(x.astype(self.residual_dtype))  # tokens over "context", if any

        time_embedding = self.time_embedding(timestep_features(timestep, c.freq_dim))
        e0 = self.time_projection(jax.nn.silu(time_embedding)).reshape(batch, 6, c.dim)
        text = self.text_embedding(context)
        image = None if self.img_emb is None else self.img_emb(clip_fea).astype(text.dtype)

        rope = grid_rope(grid, c.head_dim, c.rope_theta)

        def run(block, x, e0, text, image, block_state):
            return block(x, e0, text, image, block_state, rope=rope, grid=grid, mode=mode)

        if c.scan_layers if scan_layers is None else scan_layers:
            def call(block, x, block_state, key, e0, text, image):
                x, block_state = block(x, e0, text, image, block_state, rope=rope, grid=grid, mode=mode, key=key)
                return shard_tokens(x), block_state

            new_state = []
            for layers in self._checked_runs(mode, scan_runs):
                x, run_state = self._scan_blocks(layers, x, state[layers.start:layers.stop], call, (e0, text, image),
                                                 scan_stacked)
                new_state.extend(run_state)
        else:
            run = nnx.remat(run) if self.remat else run
            new_state = []
            for block, block_state in zip(self.blocks, state):
                x, block_state = run(block, x, e0, text, image, block_state)
                x = shard_tokens(x)
                new_state.append(block_state)

        out = unpatchify(self.head(x, time_embedding), grid, c.patch_size, c.out_dim)
        if c.prediction == "clean":
            out = clean_to_velocity(noisy, out, timestep)
        return out, tuple(new_state)

    def layer_runs(self, mode: str) -> list[range]:
        """The block indices split into runs of consecutive blocks whose self-attention runs
        alike in `mode`: dense (a `dense_layers` block, or mode "dense"), or sparse with one
        method config (a `LayerMethods` may give layers different ones)."""
        def kind(block):
            return "dense" if mode == "dense" or block.dense else block.self_attn.config

        runs: list[range] = []
        for i, block in enumerate(self.blocks):
            if runs and kind(self.blocks[runs[-1].start]) == kind(block):
                runs[-1] = range(runs[-1].start, i + 1)
            else:
                runs.append(range(i, i + 1))
        return runs

    def _checked_runs(self, mode: str, runs: tuple[range, ...] | None) -> list[range]:
        """`runs` (`__call__`'s `scan_runs`), checked, or `layer_runs(mode)` when None."""
        alike = self.layer_runs(mode)
        if runs is None:
            return alike
        covered = [layer for run in runs for layer in run]
        if covered != list(range(len(self.blocks))) or not all(
                any(run.start >= a.start and run.stop <= a.stop for a in alike) for run in runs if len(run)):
            raise ValueError(f"scan_runs must cover blocks 0..{len(self.blocks) - 1} in order, each run inside one of "
                             f"layer_runs({mode!r}) = {alike}; got {list(runs)}")
        return list(runs)

    def _scan_blocks(self, layers: range, x, states: tuple, call, inputs: tuple, stacked: frozenset[str] | None
                     ) -> tuple[jax.Array, list]:
        """Blocks `layers` (alike, see `layer_runs`) as one `jax.lax.scan` over their `stacked`
        params (see `__call__`'s `scan_stacked`), per-layer PRNG keys and per-layer states; each
        iteration picks its layer's other params with a `jax.lax.switch`. `call(block, x, state,
        key, *inputs) -> (x, state)`; `inputs`: the arrays every block reads (time and text
        embeddings). Returns (x, the new state of each layer). Rematerialised per block with
        `remat`, saving each block's input in `remat_input_dtype` (`checkpoint_block`)."""
        in_stack = lambda path, _: stacked is None or "/".join(map(str, path)) in stacked
        splits = [nnx.split(self.blocks[i], in_stack, ...) for i in layers]
        graphdef = splits[0][0]
        stack = lambda *leaves: jnp.stack(leaves)
        params = jax.tree.map(stack, *(split[1] for split in splits))
        own = [split[2] for split in splits]
        structures = {jax.tree.structure(s) for s in states}
        if len(structures) > 1:
            raise ValueError(f"state entries of layers {layers.start}..{layers.stop - 1} differ in structure; pass "
                             "None or what the previous call returned")
        stacked_states = jax.tree.map(stack, *states)
        keys = jax.vmap(jax.random.key)(jnp.arange(layers.start, layers.stop))

        def block_step(x, differentiable, fixed):
            (block_params, inputs), (index, key, block_state, own) = differentiable, fixed
            branches = [lambda layer_params=layer_params: layer_params for layer_params in own]
            return call(nnx.merge(graphdef, block_params, jax.lax.switch(index, branches)), x, block_state, key,
                        *inputs)

        if self.remat:
            block_step = checkpoint_block(block_step, self.remat_input_dtype)

        def body(x, per_layer):
            block_params, index, key, block_state = per_layer
            return block_step(x, (block_params, inputs), (index, key, block_state, own))

        x, new_states = jax.lax.scan(body, x, (params, jnp.arange(len(layers)), keys, stacked_states))
        return x, [jax.tree.map(lambda a, j=j: a[j], new_states) for j in range(len(layers))]

    def call_with_state(self, *args, **kwargs):
        """Removed: `__call__` takes and returns the state now."""
        raise TypeError("WanModel.call_with_state(latents, timestep, context, state) is now "
                        "WanModel.__call__(latents, timestep, context, state), which returns (velocity, state)")


def clean_to_velocity(latents: jax.Array, clean: jax.Array, timestep: jax.Array) -> jax.Array:
    """Velocity float32 `(batch, frames, height, width, channels)` that a clean-latents prediction
    `clean` implies for noisy `latents` (same shape) at `timestep` `(batch,)` in [0, 1000]:
    (latents - clean) / max(timestep / 1000, CLEAN_SIGMA_MIN) (`WanConfig.prediction` "clean")."""
    sigma = jnp.maximum(timestep.astype(jnp.float32) / 1000.0, CLEAN_SIGMA_MIN)
    return (latents.astype(jnp.float32) - clean.astype(jnp.float32)) / sigma[:, None, None, None, None]


COORDINATES = 3  # channels `coordinate_grid` appends: frame, row, column


def coordinate_grid(shape: tuple[int, int, int, int], dtype) -> jax.Array:
    """`(batch, frames, height, width, COORDINATES)` of `dtype`: each latent cell's frame, row
    and column centre scaled to [-1, 1] across its axis ((2 i + 1) / n - 1; 0 for an axis of one)
    for a latent video of `shape` `(batch, frames, height, width)`."""
    batch, *axes = shape
    centres = [(2 * jnp.arange(n, dtype=jnp.float32) + 1) / n - 1 for n in axes]
    grid = jnp.stack(jnp.meshgrid(*centres, indexing="ij"), axis=-1)
    return jnp.broadcast_to(grid, (batch, *grid.shape)).astype(dtype)


def with_coordinate_channels(params: dict, config: WanConfig) -> tuple[dict, WanConfig]:
    """(`params` of a `WanModel(config)` without coordinate channels with the patch embedding's
    kernel `(pt, ph, pw, in_dim, dim)` widened by `COORDINATES` zero input channels, `config`
    with `coordinate_channels`): the same model, computing the same velocities, that training
    can then teach to use each token's place."""
    if config.coordinate_channels:
        raise ValueError("config.coordinate_channels is already set: these weights have coordinate channels")
    kernel = params["patch_embedding"]["kernel"]
    zeros = jnp.zeros((*kernel.shape[:3], COORDINATES, kernel.shape[4]), kernel.dtype)
    embedding = {**params["patch_embedding"], "kernel": jnp.concatenate([jnp.asarray(kernel), zeros], axis=3)}
    return {**params, "patch_embedding": embedding}, config.replace(coordinate_channels=True)


def patchify(video: jax.Array, patch_size: tuple[int, int, int]) -> jax.Array:
    """Video `(batch, f*pt, h*ph, w*pw, channels)` -> patches `(batch, f, h, w, pt, ph, pw, channels)`."""
    batch, frames, height, width, channels = video.shape
    pt, ph, pw = patch_size
    x = video.reshape(batch, frames // pt, pt, height // ph, ph, width // pw, pw, channels)
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7)


def unpatchify(x: jax.Array, grid: tuple[int, int, int], patch_size: tuple[int, int, int], channels: int):
    """Tokens `(batch, f*h*w, prod(patch)*channels)` -> video `(batch, f*pt, h*ph, w*pw, channels)`."""
    f, h, w = grid
    pt, ph, pw = patch_size
    x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(x.shape[0], f * pt, h * ph, w * pw, channels)


__all__ = ["ARCHITECTURE_FIELDS", "ATTENTION_MODES", "COORDINATES", "WAN_CONFIGS", "WanConfig", "WanModel",
           "architecture_differences", "clean_to_velocity", "coordinate_grid", "preset_of", "timestep_features",
           "unpatchify", "with_coordinate_channels"]


# WanConfig fields that fix the weights or what they compute (the rest, sparse / dense_layers /
# attention_mode / scan_layers, choose how self-attention runs).
ARCHITECTURE_FIELDS = ("model_type", "patch_size", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
                       "num_heads", "num_layers", "qk_norm", "cross_attn_norm", "eps", "image_dim", "rope_theta",
                       "coordinate_channels", "absolute_positions", "prediction")


def architecture_differences(a: WanConfig, b: WanConfig) -> list[str]:
    """The `ARCHITECTURE_FIELDS` in which two configs differ."""
    return [name for name in ARCHITECTURE_FIELDS if getattr(a, name) != getattr(b, name)]


def preset_of(config: WanConfig) -> str | None:
    """The `WAN_CONFIGS` name whose architecture (`ARCHITECTURE_FIELDS`) `config` has, or None
    for an architecture of its own."""
    return next((name for name, c in WAN_CONFIGS.items() if not architecture_differences(c, config)), None)
