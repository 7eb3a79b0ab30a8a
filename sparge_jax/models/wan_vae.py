"""The Wan2.1 video VAE (`AutoencoderKLWan` in diffusers) in Flax NNX, channels-last.

Video `(batch, frames, height, width, 3)` in [-1, 1] <-> latents
`(batch, 1 + (frames - 1) // 4, height / 8, width / 8, z_dim)`. Every temporal convolution is
causal (it sees the current and earlier frames only), so the video is processed chunk by chunk
like the original: the encoder takes the first frame, then chunks of 4 frames; the decoder takes
one latent frame at a time. Between chunks each causal layer carries the last frames of its
input (`FrameCache`), so only one chunk's activations exist at a time: the chunks after the first
run in a `jax.lax.scan`. Parameter names (`encoder.downsamples.N.conv1`, ...) follow the original
checkpoint's module tree; `convert.vae_keys` maps them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparge_jax.config_builder import StoredConfig

# Wan2.1's per-channel statistics of its latents; the DiT is trained on (latent - mean) / std.
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Frames the encoder takes per chunk after the first frame (= its temporal compression).
FRAMES_PER_CHUNK = 4
SPATIAL_FACTOR = 8


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(StoredConfig):
    """Architecture of a Wan2.1 VAE (defaults: the released `Wan2.1_VAE.pth`).

    base_dim: channels of the first encoder stage; stage i has base_dim * dim_mult[i].
    z_dim: latent channels. num_res_blocks: residual blocks per encoder stage (decoder: one more).
    temporal_downsample: per encoder stage transition, whether it also halves the frames
      (two of three, for 4x temporal compression); the decoder mirrors it.
    latents_mean / latents_std: per-channel statistics (z_dim each) of the normalised latents.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self):
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("base_dim", "z_dim", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if len(self.dim_mult) != 4 or any(not isinstance(m, int) or m < 1 for m in self.dim_mult):
            raise ValueError(f"dim_mult must be 4 positive ints (8x spatial compression); got {self.dim_mult!r}")
        if len(self.temporal_downsample) != 3 or sum(map(bool, self.temporal_downsample)) != 2:
            raise ValueError("temporal_downsample must be 3 bools, two of them True (4x temporal compression); "
                             f"got {self.temporal_downsample!r}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} must have z_dim ({self.z_dim}) entries; got {len(getattr(self, name))}")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError(f"latents_std must be positive; got {self.latents_std}")

    def replace(self, **changes) -> "WanVAEConfig":
        return dataclasses.replace(self, **changes)


class FrameCache:
    """The temporal state of the causal layers between chunks, read and written in call order.

    `previous`: the states the layers kept on the chunk before (None on the first chunk). Each
    causal layer calls `last()` (its state from the chunk before; None on the first chunk), then
    `keep(state)` once per chunk; `states` lists what was kept, for the next chunk."""

    def __init__(self, previous: list | None):
        self.first = previous is None
        self._previous = previous
        self.states: list = []

    def last(self):
        return None if self.first else self._previous[len(self.states)]

    def keep(self, state) -> None:
        self.states.append(state)


class RMSNorm(nnx.Module):
    """x / |x| * sqrt(dim) * gamma over the channel (last) axis, in float32; `(..., dim)`."""

    def __init__(self, dim: int, *, param_dtype):
        self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))
        self.scale = dim ** 0.5

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        squares = jnp.sum(x32 * x32, axis=-1, keepdims=True)
        out = x32 * jax.lax.rsqrt(jnp.maximum(squares, 1e-24)) * self.scale * self.gamma[...].astype(jnp.float32)
        return out.astype(x.dtype)


class CausalConv3d(nnx.Module):
    """3D convolution `(b, t, h, w, in) -> (b, t', h, w, out)`, zero-padded in space ("same")
    and causal in time: each output frame sees `kernel_t` input frames ending at its own. With a
    `FrameCache`, the frames before the chunk come from the last chunk (zeros before the first)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int], *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kt, kh, kw = kernel
        self.history = kt - 1
        self.conv = nnx.Conv(in_dim, out_dim, kernel, padding=[(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)],
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cache: FrameCache | None = None):
        if self.history:
            if cache is None:
                raise ValueError("a temporal causal convolution needs a FrameCache")
            previous = cache.last()
            if previous is None:
                previous = jnp.zeros((x.shape[0], self.history, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([previous.astype(x.dtype), x], axis=1)
            cache.keep(x[:, -self.history:])
        return self.conv(x)


class ResidualBlock(nnx.Module):
    """RMS norm -> SiLU -> causal 3x3x3 conv, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(in_dim, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), **conv)
        self.norm2 = RMSNorm(out_dim, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), **conv)
        self.shortcut = CausalConv3d(in_dim, out_dim, (1, 1, 1), **conv) if in_dim != out_dim else None

    def __call__(self, x, cache: FrameCache):
        h = x if self.shortcut is None else self.shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)), cache)
        x = self.conv2(jax.nn.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame, with a residual; `(b, t, h, w, c)`."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(dim, param_dtype=param_dtype)
        self.to_qkv = nnx.Conv(dim, 3 * dim, (1, 1), **conv)
        self.proj = nnx.Conv(dim, dim, (1, 1), **conv)

    def __call__(self, x, cache: FrameCache | None = None):  # per frame: no temporal state
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, t, h, w, c)
        return x + self.proj(out)


class Downsample(nnx.Module):
    """Halve height and width (3x3 conv, stride 2, zero pad right/bottom), and with `temporal`
    also the frames (causal 3x1x1 conv, stride 2). On the first chunk (one frame) the temporal
    conv is skipped; later chunks see the last frame of the chunk before."""

    def __init__(self, dim: int, temporal: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.spatial = nnx.Conv(dim, dim, (3, 3), strides=2, padding=[(0, 1), (0, 1)], **conv)
        self.time_conv = (nnx.Conv(dim, dim, (3, 1, 1), strides=(2, 1, 1), padding="VALID", **conv)
                          if temporal else None)

    def __call__(self, x, cache: FrameCache):
        b, t, h, w, c = x.shape
        x = self.spatial(x.reshape(b * t, h, w, c))
        x = x.reshape(b, t, *x.shape[1:])
        if self.time_conv is None:
            return x
        previous = cache.last()
        cache.keep(x[:, -1:])
        if previous is None:
            return x
        return self.time_conv(jnp.concatenate([previous, x], axis=1))


class Upsample(nnx.Module):
    """Double height and width (nearest, then a 3x3 conv to `dim // 2` channels), and with
    `temporal` also the frames (causal 3x1x1 conv to 2x channels, split into two frames per
    frame). On the first chunk the temporal step is skipped (one frame stays one frame)."""

    def __init__(self, dim: int, temporal: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.spatial = nnx.Conv(dim, dim // 2, (3, 3), padding=[(1, 1), (1, 1)], **conv)
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), **conv) if temporal else None

    def __call__(self, x, cache: FrameCache):
        if self.time_conv is not None:
            if cache.first:  # the state for the next chunk: zero frames, as if nothing came before
                cache.keep(jnp.zeros((x.shape[0], self.time_conv.history, *x.shape[2:]), x.dtype))
            else:
                b, t, h, w, c = x.shape
                x = self.time_conv(x, cache).reshape(b, t, h, w, 2, c)
                x = jnp.moveaxis(x, 4, 2).reshape(b, 2 * t, h, w, c)
        b, t, h, w, c = x.shape
        x = jnp.repeat(jnp.repeat(x.reshape(b * t, h, w, c), 2, axis=1), 2, axis=2)
        x = self.spatial(x)
        return x.reshape(b, t, *x.shape[1:])


def _middle(dim: int, **kw) -> nnx.List:
    return nnx.List([ResidualBlock(dim, dim, **kw), AttentionBlock(dim, **kw), ResidualBlock(dim, dim, **kw)])


class Encoder(nnx.Module):
    """Video chunk `(b, t, h, w, 3)` -> `(b, t', h/8, w/8, 2 * z_dim)` (mean and log-variance)."""

    def __init__(self, config: WanVAEConfig, **kw):
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = CausalConv3d(3, dims[0], (3, 3, 3), **kw)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, **kw))
                in_dim = out_dim
            if i < len(config.dim_mult) - 1:
                layers.append(Downsample(out_dim, config.temporal_downsample[i], **kw))
        self.downsamples = nnx.List(layers)
        self.middle = _middle(dims[-1], **kw)
        self.norm_out = RMSNorm(dims[-1], param_dtype=kw["param_dtype"])
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, (3, 3, 3), **kw)

    def __call__(self, x, cache: FrameCache):
        x = self.conv_in(x, cache)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, cache)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


class Decoder(nnx.Module):
    """Latent chunk `(b, t, h, w, z_dim)` -> video `(b, t', 8h, 8w, 3)` (t' = t on the first chunk, else 4t)."""

    def __init__(self, config: WanVAEConfig, **kw):
        mult = config.dim_mult
        dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal = config.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(config.z_dim, dims[0], (3, 3, 3), **kw)
        self.middle = _middle(dims[0], **kw)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the upsampler before halved the channels
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, **kw))
                in_dim = out_dim
            if i < len(mult) - 1:
                layers.append(Upsample(out_dim, temporal[i], **kw))
        self.upsamples = nnx.List(layers)
        self.norm_out = RMSNorm(dims[-1], param_dtype=kw["param_dtype"])
        self.conv_out = CausalConv3d(dims[-1], 3, (3, 3, 3), **kw)

    def __call__(self, x, cache: FrameCache):
        x = self.conv_in(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


def _run_chunks(module, first_chunk, later_chunks):
    """`module(chunk, cache)` over the first chunk `(b, t0, ...)`, then over `later_chunks`
    `(n, b, t, ...)` in a scan carrying the cache; outputs joined along frames."""
    cache = FrameCache(None)
    first = module(first_chunk, cache)
    if later_chunks.shape[0] == 0:
        return first

    def step(states, chunk):
        cache = FrameCache(states)
        out = module(chunk, cache)
        return cache.states, out

    _, rest = jax.lax.scan(step, cache.states, later_chunks)
    rest = jnp.moveaxis(rest, 0, 1)
    rest = rest.reshape(rest.shape[0], -1, *rest.shape[3:])
    return jnp.concatenate([first, rest.astype(first.dtype)], axis=1)


class WanVAE(nnx.Module):
    """Wan2.1's causal video VAE; see the module docstring for shapes and chunking.

    dtype: compute dtype of the convolutions (None: `param_dtype`, so bf16 params compute in bf16
    rather than promoted to the float32 the decoder's input is cast to); norms run in float32.
    param_dtype: dtype the params are held in.
    """

    def __init__(self, config: WanVAEConfig = WanVAEConfig(), *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.config = config
        dtype = param_dtype if dtype is None else dtype  # flax would promote to the inputs' float32
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        z = config.z_dim
        self.encoder = Encoder(config, **kw)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, (1, 1, 1), **kw)
        self.post_quant_conv = CausalConv3d(z, z, (1, 1, 1), **kw)
        self.decoder = Decoder(config, **kw)

    def _stats(self):
        mean = jnp.asarray(self.config.latents_mean, jnp.float32)
        std = jnp.asarray(self.config.latents_std, jnp.float32)
        return mean, std

    def encode(self, video: jax.Array, *, normalize: bool = True) -> jax.Array:
        """video `(batch, frames, height, width, 3)` in [-1, 1], frames = 1 + 4k, height and width
        multiples of 8 -> float32 latents `(batch, 1 + k, height / 8, width / 8, z_dim)`.

        Deterministic: the posterior mean (no sampling). normalize=True (default) returns
        `(mean - latents_mean) / latents_std`, the latents the Wan DiT is trained on and
        `decode` takes; normalize=False returns the raw posterior mean (diffusers'
        `encode(x).latent_dist.mean`)."""
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"video must be (batch, frames, height, width, 3); got shape {video.shape}")
        b, t, h, w, _ = video.shape
        if (t - 1) % FRAMES_PER_CHUNK:
            raise ValueError(f"video frames must be 1 + {FRAMES_PER_CHUNK}k (1, 5, 9, ..., 81); got {t}")
        if h % SPATIAL_FACTOR or w % SPATIAL_FACTOR or not h or not w:
            raise ValueError(f"video height and width must be positive multiples of {SPATIAL_FACTOR}; got {h}x{w}")
        later = video[:, 1:].reshape(b, (t - 1) // FRAMES_PER_CHUNK, FRAMES_PER_CHUNK, h, w, 3)
        stats = _run_chunks(self.encoder, video[:, :1], jnp.moveaxis(later, 1, 0))
        mean = self.quant_conv(stats)[..., :self.config.z_dim].astype(jnp.float32)
        if not normalize:
            return mean
        latents_mean, latents_std = self._stats()
        return (mean - latents_mean) / latents_std

    def decode(self, latents: jax.Array, *, normalized: bool = True) -> jax.Array:
        """latents `(batch, latent_frames, h, w, z_dim)` -> float32 video
        `(batch, 1 + 4 * (latent_frames - 1), 8h, 8w, 3)` clipped to [-1, 1], one latent frame
        per chunk. normalized=True (default): `latents` are normalised as `encode` returns them;
        False: raw posterior latents (diffusers' `decode`)."""
        z = self.config.z_dim
        if latents.ndim != 5 or latents.shape[-1] != z or 0 in latents.shape:
            raise ValueError(f"latents must be (batch, latent_frames, height, width, z_dim={z}), non-empty; "
                             f"got shape {latents.shape}")
        latents = latents.astype(jnp.float32)
        if normalized:
            latents_mean, latents_std = self._stats()
            latents = latents * latents_std + latents_mean
        x = self.post_quant_conv(latents)
        video = _run_chunks(self.decoder, x[:, :1], jnp.moveaxis(x[:, 1:, None], 1, 0))
        return jnp.clip(video.astype(jnp.float32), -1.0, 1.0)
