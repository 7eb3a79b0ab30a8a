"""Wan2.1 flow-matching noise schedule: shifted sigmas, noisy latents, model timesteps."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparge_jax.sampling import shift_sigma

NUM_TRAIN_TIMESTEPS = 1000


def sample_sigma(key: jax.Array, shift: float) -> jax.Array:
    """A float32 scalar shifted sigma from s ~ U[0, 1)."""
    return shift_sigma(jax.random.uniform(key, (), jnp.float32), shift)


def noisy_latents(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_t = (1 - sigma) x0 + sigma noise; x0/noise `(batch, ...)`, sigma `(batch,)`."""
    s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1 - s) * x0 + s * noise


def timesteps(sigma: jax.Array) -> jax.Array:
    """The model's timestep input, sigma * 1000, `(batch,)` float32."""
    return sigma.astype(jnp.float32) * NUM_TRAIN_TIMESTEPS
