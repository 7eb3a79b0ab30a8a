"""Wan2.1 flow-matching noise schedule: shifted sigmas, noisy latents, model timesteps."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparge_jax.sampling import shift_sigma

NUM_TRAIN_TIMESTEPS = 1000


def sample_sigma(key: jax.Array, shift: float, pure_noise_share: float = 0.0) -> jax.Array:
    """A float32 scalar shifted sigma from s ~ U[0, 1); with `pure_noise_share` p > 0, sigma is 1
    (pure noise) with probability p instead, decided by a draw from `fold_in(key, 1)`, so the other
    draws are those of p = 0."""
    sigma = shift_sigma(jax.random.uniform(key, (), jnp.float32), shift)
    if pure_noise_share == 0:
        return sigma
    pure = jax.random.uniform(jax.random.fold_in(key, 1), (), jnp.float32) < pure_noise_share
    return jnp.where(pure, jnp.float32(1.0), sigma)


def noisy_latents(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_t = (1 - sigma) x0 + sigma noise; x0/noise `(batch, ...)`, sigma `(batch,)`."""
    s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1 - s) * x0 + s * noise


def timesteps(sigma: jax.Array) -> jax.Array:
    """The model's timestep input, sigma * 1000, `(batch,)` float32."""
    return sigma.astype(jnp.float32) * NUM_TRAIN_TIMESTEPS
