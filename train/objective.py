"""Velocity distillation (SpargeAttention2): the sparse student matches the frozen dense teacher."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from train.config import ObjectiveSettings
from train.schedule import noisy_latents, sample_sigmas, timesteps

# (latents (B,F,H,W,C), timestep (B,), batch dict) -> velocity (B,F,H,W,C)
VelocityFn = Callable[[jax.Array, jax.Array, dict], jax.Array]


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean squared error in float32 (scalar)."""
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def combine_losses(v_student, v_teacher, flow_target, settings: ObjectiveSettings) -> tuple[jax.Array, dict]:
    """Weighted loss and its parts. `v_teacher` may be None when distill_weight == 0."""
    parts = {}
    loss = jnp.zeros((), jnp.float32)
    if settings.distill_weight > 0:
        parts["distill_loss"] = mse(v_student, v_teacher)
        loss = loss + settings.distill_weight * parts["distill_loss"]
    if settings.flow_weight > 0:
        parts["flow_loss"] = mse(v_student, flow_target)
        loss = loss + settings.flow_weight * parts["flow_loss"]
    return loss, parts


def distillation_loss(
    student: VelocityFn, teacher: VelocityFn, batch: dict, key: jax.Array, settings: ObjectiveSettings
) -> tuple[jax.Array, dict]:
    """Sample sigma (Wan's shifted schedule) and noise, form x_t, and score the student.

    batch: "latents" `(B, F, H, W, C)` clean latents x0 and "context" `(B, L, text_dim)`.
    The teacher's velocity is under stop_gradient; it is not evaluated when
    `settings.distill_weight == 0` (plain flow matching, target eps - x0).
    Returns (scalar float32 loss, dict of float32 metrics).
    """
    x0 = batch["latents"]
    k_sigma, k_noise = jax.random.split(key)
    sigma = sample_sigmas(k_sigma, x0.shape[0], settings.shift)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = noisy_latents(x0, noise, sigma)
    t = timesteps(sigma)
    v_student = student(x_t, t, batch)
    v_teacher = jax.lax.stop_gradient(teacher(x_t, t, batch)) if settings.distill_weight > 0 else None
    loss, parts = combine_losses(v_student, v_teacher, noise - x0, settings)
    return loss, {"loss": loss, **parts, "sigma_mean": jnp.mean(sigma)}
