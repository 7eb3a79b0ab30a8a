"""Velocity distillation (SpargeAttention2): the sparse student matches the frozen dense teacher."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sparge_jax.sampling import guided
from train.config import ObjectiveSettings
from train.schedule import noisy_latents, sample_sigma, timesteps

# (latents (B,F,H,W,C), timestep (B,), batch dict) -> velocity (B,F,H,W,C)
VelocityFn = Callable[[jax.Array, jax.Array, dict], jax.Array]


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean squared error in float32 (scalar)."""
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def uncaptioned(batch: dict) -> dict:
    """`batch` with an all-zero "context": the unconditional input of classifier-free guidance."""
    return {**batch, "context": jnp.zeros_like(batch["context"])}


def combine_losses(v_student, v_teacher, flow_target, settings: ObjectiveSettings,
                   distilled: tuple | None = None) -> tuple[jax.Array, dict]:
    """Weighted loss and its parts. `v_teacher` may be None when distill_weight == 0;
    `distilled`: the (student, teacher) velocities the distillation term compares instead of
    (v_student, v_teacher), e.g. the guided ones."""
    parts = {}
    loss = jnp.zeros((), jnp.float32)
    if settings.distill_weight > 0:
        parts["distill_loss"] = mse(*(distilled or (v_student, v_teacher)))
        loss = loss + settings.distill_weight * parts["distill_loss"]
    if settings.flow_weight > 0:
        parts["flow_loss"] = mse(v_student, flow_target)
        loss = loss + settings.flow_weight * parts["flow_loss"]
    return loss, parts


def example_keys(rng: jax.Array, step, count: int) -> jax.Array:
    """The per-example keys `(count, 2)` uint32 of training step `step` (one per example of the
    global batch, in batch order): the training step draws each example's sigma and noise from
    them (`sample_noise`), and so does the block-sparsity probe of `train.batch_sparsity`."""
    return jax.random.split(jax.random.fold_in(rng, step), count)


def sample_noise(keys: jax.Array, x0: jax.Array, shift: float,
                 pure_noise_share: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Per example: sigma `(batch,)` float32 (Wan's shifted schedule; 1 for a `pure_noise_share` of
    the examples, `sample_sigma`) and Gaussian noise like x0, each drawn from that example's key
    (`keys` `(batch, 2)` uint32), so an example's draw does not depend on how the batch is split
    into micro-batches or devices."""

    def one(key, like):
        k_sigma, k_noise = jax.random.split(key)
        return (sample_sigma(k_sigma, shift, pure_noise_share),
                jax.random.normal(k_noise, like.shape, like.dtype))

    return jax.vmap(one)(keys, x0)


def distillation_loss(
    student: VelocityFn, teacher: VelocityFn, batch: dict, keys: jax.Array, settings: ObjectiveSettings
) -> tuple[jax.Array, dict]:
    """Draw sigma and noise per example, form x_t, and score the student.

    batch: "latents" `(B, F, H, W, C)` clean latents x0 and "context" `(B, L, text_dim)`;
    keys: `(B, 2)` uint32, one PRNG key per example.
    The teacher's velocity is under stop_gradient; it is not evaluated when
    `settings.distill_weight == 0` (plain flow matching, target eps - x0). With
    `settings.distill_guidance` g the distillation term compares the guided velocities
    `g v(context) - (g - 1) v(zeros)` (two forwards of each model); the flow term stays on the
    conditional velocity.
    Returns (scalar float32 loss, dict of float32 metrics).
    """
    x0 = batch["latents"]
    sigma, noise = sample_noise(keys, x0, settings.shift, settings.pure_noise_share)
    x_t = noisy_latents(x0, noise, sigma)
    t = timesteps(sigma)
    v_student = student(x_t, t, batch)
    v_teacher = jax.lax.stop_gradient(teacher(x_t, t, batch)) if settings.distill_weight > 0 else None
    distilled = None
    if settings.distill_weight > 0 and settings.distill_guidance is not None:
        blank, g = uncaptioned(batch), settings.distill_guidance
        distilled = (guided(v_student, student(x_t, t, blank), g),
                     guided(v_teacher, jax.lax.stop_gradient(teacher(x_t, t, blank)), g))
    loss, parts = combine_losses(v_student, v_teacher, noise - x0, settings, distilled)
    return loss, {"loss": loss, **parts, "sigma_mean": jnp.mean(sigma)}
