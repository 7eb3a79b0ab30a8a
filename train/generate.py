"""Sampling and attention statistics of a trained model held as `ModelParts` + params.

`generate` runs the project's sampler (`sparge_jax.sampling`: shifted sigmas, UniPC or Euler,
classifier-free guidance with a zero negative context) over a whole batch, one jitted model
call per step. `attention_concentration` measures how peaked each layer's attention is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparge_jax.tools.capture import capture_qkv, sparsity_reduction, token_grid
from sparge_jax.config import SparseConfig
from sparge_jax.masks.sparge import pooled_scores
from sparge_jax.sampling import guided, sample, shifted_sigmas
from train.model import ModelParts, velocity_fn
from train.schedule import noisy_latents, timesteps


def make_velocity(parts: ModelParts, mode: str, compute_dtype):
    """Jitted `(params, x, t, context) -> velocity` float32 with self-attention `mode`."""

    @jax.jit
    def run(params, x, t, context):
        return velocity_fn(parts, params, mode, compute_dtype)(x, t, {"context": context})

    return run


def guided_velocity(velocity, params, context: jax.Array, guidance: float):
    """`(x, s, i) -> velocity` float32 for `sparge_jax.sampling.sample`: `velocity` from
    `make_velocity` at noise level s under `context` `(batch, L, D)`. Guidance 1 runs the
    conditional pass only; otherwise the batch doubles with a zero (unconditional) context."""
    negative = jnp.zeros_like(context)

    def v(x, s, i):
        t = jnp.full((x.shape[0],), 1000.0 * s, jnp.float32)
        if guidance == 1.0:
            return velocity(params, x, t, context)
        both = velocity(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([context, negative]))
        return guided(both[: x.shape[0]], both[x.shape[0]:], guidance)

    return v


def generate(velocity, params, noise: jax.Array, context: jax.Array, *, steps: int, shift: float,
             guidance: float, solver: str = "unipc", on_prediction=None) -> np.ndarray:
    """Latents float32 `(batch, F, H, W, C)` sampled from `noise` (same shape) under `context`
    `(batch, L, D)`; `velocity` from `make_velocity` (guidance: see `guided_velocity`).
    `on_prediction(i, sigma, x0)`, when given, is called at each step with the (guided) clean
    prediction x0 = x - sigma v float32 `(batch, F, H, W, C)` that the step starts from."""
    v = guided_velocity(velocity, params, context, guidance)
    if on_prediction is not None:
        v = reporting_predictions(v, on_prediction)
    return np.asarray(sample(v, noise, shifted_sigmas(steps, shift), solver=solver))


def reporting_predictions(velocity, on_prediction):
    """`velocity` `(x, s, i) -> v` that also calls `on_prediction(i, s, x - s v)`."""

    def v(x, s, i):
        out = velocity(x, s, i)
        on_prediction(i, s, x - s * out)
        return out

    return v


def mass_fraction(probs: np.ndarray, mass: float = 0.9) -> np.ndarray:
    """Per row of `probs` `(..., n)` (rows summing to 1): the fraction of the n entries that the
    largest ones need to hold `mass` of the row. Uniform rows give ~mass; peaked rows less."""
    p = -np.sort(-np.asarray(probs, np.float64), axis=-1)
    needed = np.sum(np.cumsum(p, axis=-1) - p < mass, axis=-1)
    return needed / p.shape[-1]


def _dense_call(parts: ModelParts, params: dict, batch: dict, sigma, noise, dtype):
    """(model with `params` cast to `dtype`, its call arguments x_t, timestep, context, and the
    keyword ones) for `capture_qkv`: x_t = (1 - sigma) x0 + sigma noise of `batch`, cast to `dtype`
    as `train.model.velocity_fn` casts the step's inputs."""
    model = parts.merge(params, dtype)
    x0 = jnp.asarray(batch["latents"], jnp.float32)
    if noise is None:
        noise = jax.random.normal(jax.random.key(1), x0.shape, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x0.shape[:1])
    extra = {name: jnp.asarray(batch[name], dtype) for name in ("clip_fea", "y") if name in batch}
    args = (noisy_latents(x0, noise, sigma).astype(dtype), timesteps(sigma), jnp.asarray(batch["context"], dtype))
    return model, args, extra


def capture_layers(parts: ModelParts, params: dict, batch: dict, sigma, noise=None, *,
                   dtype=jnp.float32) -> dict[str, tuple]:
    """Self-attention (q, k, v) of every layer (`sparge_jax.tools.capture.capture_qkv`, dense
    forward with the params and inputs in `dtype`) on x_t = (1 - sigma) x0 + sigma noise of
    `batch` ("latents" x0 `(B, F, H, W, C)`, "context", and "clip_fea" / "y" when present) at
    model timestep 1000 sigma. The model's layers compute in the dtype it was built with (the
    training compute dtype), so q, k, v come out in that one.

    sigma: a float, or per example `(B,)`. noise: like x0; None draws it from key 1.
    Traceable. Holds every layer's q, k, v: `layer_sparsity` measures without them."""
    model, args, extra = _dense_call(parts, params, batch, sigma, noise, dtype)
    return capture_qkv(model, *args, **extra)


def layer_sparsity(parts: ModelParts, params: dict, batch: dict, sigma, noise=None, *,
                   dtype=jnp.float32) -> jax.Array:
    """`(num_layers,)` float32: per layer, what `block_sparsity` counts on the q, k, v that
    `capture_layers` (same arguments) would capture, measured inside the dense forward: each
    self-attention call reduces its q, k, v to that scalar (`sparsity_reduction`), so under
    `jax.jit` one layer's q, k, v are alive at a time. Layers in `config.dense_layers` give 0."""
    config = parts.config
    grid = token_grid(jnp.shape(batch["latents"])[1:4], config.patch_size)
    reduce = sparsity_reduction(config.sparse, grid, config.dense_layers, key=jax.random.key(0))
    model, args, extra = _dense_call(parts, params, batch, sigma, noise, dtype)
    per_layer = capture_qkv(model, *args, reduce=reduce, **extra)
    return jnp.stack([per_layer[f"L{i}"] for i in range(config.num_layers)])


def block_sparsity(captured: dict[str, tuple], config: SparseConfig, latent_shape, patch_size,
                   dense_layers=()) -> float:
    """Mean over layers, clips and heads of the fraction of (q block, k block) pairs that
    `config.method` skips on the captured q, k, v (`sparsity_reduction`, PRNG key 0); the
    layers in `dense_layers` (block indices, run dense) count as skipping nothing."""
    reduce = sparsity_reduction(config, token_grid(latent_shape[:3], patch_size), dense_layers, key=jax.random.key(0))
    return sum(float(reduce(*qkv, int(name[1:]))) for name, qkv in captured.items()) / len(captured)


def attention_concentration(parts: ModelParts, params: dict, batch: dict, sigma: float, *, block_q: int,
                            block_k: int, mass: float = 0.9) -> list[float]:
    """Per layer: mean over rows, heads and clips of the fraction of k blocks whose pooled
    attention (`pooled_scores` of the block means of q and k, as the sparse rules see it)
    holds `mass` of the row, on the dense model at noise level `sigma` (x_t from fixed noise)."""
    captured = capture_layers(parts, params, batch, sigma)
    out = []
    for layer in range(len(captured)):
        q, k, _ = captured[f"L{layer}"]
        scores = pooled_scores(q, k, block_q=block_q, block_k=block_k)
        out.append(float(np.mean(mass_fraction(np.asarray(scores), mass))))
    return out
