"""Wan's shifted flow-matching schedule and the distillation objective against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparge_jax.sampling import shift_sigma
from train.config import ObjectiveSettings
from train.objective import distillation_loss, sample_noise
from train.schedule import noisy_latents, timesteps


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_shift_matches_formula(rng, shift):
    s = rng.uniform(0, 1, 257)
    want = shift * s / (1 + (shift - 1) * s)
    np.testing.assert_allclose(np.asarray(shift_sigma(jnp.asarray(s, jnp.float32), shift)), want, rtol=1e-6, atol=1e-7)


def test_sampled_sigmas_follow_the_shifted_uniform(rng):
    shift = 5.0
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 20000)
    sigma, noise = sample_noise(jax.random.key_data(keys), jnp.zeros((20000, 3), jnp.float32), shift)
    sigma = np.asarray(sigma, np.float64)
    u = (np.arange(200000) + 0.5) / 200000  # midpoint quadrature of E[shift(u)] and its quartiles
    assert abs(sigma.mean() - shift_sigma(u, shift).mean()) < 0.01
    np.testing.assert_allclose(np.quantile(sigma, [0.25, 0.5, 0.75]), shift_sigma(np.array([0.25, 0.5, 0.75]), shift), atol=0.02)
    assert 0 <= sigma.min() and sigma.max() < 1
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02


def test_pure_noise_share_replaces_that_share_of_the_draws_by_sigma_one(rng):
    keys = jax.random.key_data(jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 20000))
    x0 = jnp.zeros((20000, 3), jnp.float32)
    plain_sigma, plain_noise = (np.asarray(a) for a in sample_noise(keys, x0, 3.0))
    sigma, noise = (np.asarray(a) for a in sample_noise(keys, x0, 3.0, pure_noise_share=0.3))
    pure = sigma == 1.0
    assert abs(pure.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 20000)  # binomial, 4 standard deviations
    np.testing.assert_array_equal(sigma[~pure], plain_sigma[~pure])  # the other draws are the plain ones
    np.testing.assert_array_equal(noise, plain_noise)
    assert plain_sigma.max() < 1


def test_noisy_latents_and_timesteps(rng):
    x0, eps = rng.standard_normal((2, 3, 5, 7, 4)), rng.standard_normal((2, 3, 5, 7, 4))
    sigma = rng.uniform(0, 1, 2)
    got = noisy_latents(jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), jnp.asarray(sigma, jnp.float32))
    want = (1 - sigma[:, None, None, None, None]) * x0 + sigma[:, None, None, None, None] * eps
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(timesteps(jnp.asarray(sigma, jnp.float32))), sigma * 1000, rtol=1e-6)


def _linear_velocity(weight, seen):
    """A velocity model v = x_t @ weight + t/1000 that records its inputs."""
    def fn(x_t, t, batch):
        seen.append((np.asarray(x_t, np.float64), np.asarray(t, np.float64)))
        return x_t @ weight + (t / 1000)[:, None, None, None, None]
    return fn


@pytest.mark.parametrize("distill_weight,flow_weight,pure_noise_share",
                         [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.7, 0.3, 0.0), (0.0, 1.0, 0.99)])
def test_loss_matches_numpy(rng, distill_weight, flow_weight, pure_noise_share):
    settings = ObjectiveSettings(distill_weight=distill_weight, flow_weight=flow_weight, shift=3.0,
                                 pure_noise_share=pure_noise_share)
    x0 = rng.standard_normal((3, 2, 4, 6, 5))
    w_student, w_teacher = rng.standard_normal((5, 5)) * 0.5, rng.standard_normal((5, 5)) * 0.5
    seen_student, seen_teacher = [], []
    batch = {"latents": jnp.asarray(x0, jnp.float32), "context": jnp.asarray(rng.standard_normal((3, 7, 8)), jnp.float32)}
    keys = jax.random.key_data(jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3))
    loss, metrics = distillation_loss(
        _linear_velocity(jnp.asarray(w_student, jnp.float32), seen_student),
        _linear_velocity(jnp.asarray(w_teacher, jnp.float32), seen_teacher),
        batch, keys, settings,
    )
    (x_t, t), = seen_student
    assert len(seen_teacher) == (1 if distill_weight > 0 else 0), "the teacher runs only when distilling"
    sigma = t / 1000
    assert (sigma == 1).any() == (pure_noise_share > 0)  # 3 examples at share 0.99: all but surely
    s = sigma[:, None, None, None, None]
    eps = (x_t - (1 - s) * x0) / s  # the noise implied by x_t
    v_s = x_t @ w_student + s
    v_t = x_t @ w_teacher + s
    want = distill_weight * np.mean((v_s - v_t) ** 2) + flow_weight * np.mean((v_s - (eps - x0)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=2e-4)
    assert float(metrics["loss"]) == float(loss)
    # the same keys give the same draws one example at a time (micro-batch independence)
    sigma0, noise0 = sample_noise(keys[:1], batch["latents"][:1], settings.shift, settings.pure_noise_share)
    np.testing.assert_allclose(float(sigma0[0]), sigma[0], rtol=1e-6)


def _context_velocity(weight, bias):
    """v = x_t @ weight + t/1000 + bias * mean(context): a model whose velocity depends on its
    context, so the guided velocity differs from the conditional one."""
    def fn(x_t, t, batch):
        cond = jnp.mean(batch["context"], axis=(1, 2))[:, None, None, None, None]
        return x_t @ weight + (t / 1000)[:, None, None, None, None] + bias * cond
    return fn


@pytest.mark.matmul_precision("highest")  # a float64 oracle; on a GPU float32 matmuls default to TF32
@pytest.mark.parametrize("flow_weight", [0.0, 0.5])
def test_guided_distillation_matches_numpy(rng, flow_weight):
    g = 4.0
    settings = ObjectiveSettings(distill_weight=1.0, flow_weight=flow_weight, shift=3.0, distill_guidance=g)
    x0 = rng.standard_normal((3, 2, 4, 6, 5))
    context = rng.standard_normal((3, 7, 8)) + 0.5
    w_s, w_t = rng.standard_normal((5, 5)) * 0.5, rng.standard_normal((5, 5)) * 0.5
    b_s, b_t = rng.standard_normal(5), rng.standard_normal(5)
    batch = {"latents": jnp.asarray(x0, jnp.float32), "context": jnp.asarray(context, jnp.float32)}
    keys = jax.random.key_data(jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3))
    loss, metrics = distillation_loss(_context_velocity(jnp.asarray(w_s, jnp.float32), jnp.asarray(b_s, jnp.float32)),
                                      _context_velocity(jnp.asarray(w_t, jnp.float32), jnp.asarray(b_t, jnp.float32)),
                                      batch, keys, settings)
    sigma, noise = (np.asarray(a, np.float64) for a in sample_noise(keys, batch["latents"], settings.shift))
    s = sigma[:, None, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    c = context.mean(axis=(1, 2))[:, None, None, None, None]

    def velocity(w, b, cond):
        return x_t @ w + s + b * cond

    guided_s = g * velocity(w_s, b_s, c) - (g - 1) * velocity(w_s, b_s, 0.0)
    guided_t = g * velocity(w_t, b_t, c) - (g - 1) * velocity(w_t, b_t, 0.0)
    distill = np.mean((guided_s - guided_t) ** 2)
    flow = np.mean((velocity(w_s, b_s, c) - (noise - x0)) ** 2)
    np.testing.assert_allclose(float(metrics["distill_loss"]), distill, rtol=2e-4)
    np.testing.assert_allclose(float(loss), distill + flow_weight * flow, rtol=2e-4)
    assert abs(distill - np.mean((velocity(w_s, b_s, c) - velocity(w_t, b_t, c)) ** 2)) > 0.1 * distill


@pytest.mark.parametrize("guidance", [None, 5.0])
def test_no_gradient_reaches_the_teacher(rng, guidance):
    x0 = jnp.asarray(rng.standard_normal((2, 1, 2, 2, 3)), jnp.float32)
    keys = jax.random.key_data(jax.random.split(jax.random.key(1), 2))
    settings = ObjectiveSettings(distill_guidance=guidance)

    def loss(ws, wt):
        f = lambda w: (lambda x, t, b: x * w + jnp.mean(b["context"]))
        return distillation_loss(f(ws), f(wt), {"latents": x0, "context": x0}, keys, settings)[0]

    g_student, g_teacher = jax.grad(loss, argnums=(0, 1))(jnp.float32(1.3), jnp.float32(0.4))
    assert float(g_teacher) == 0.0 and abs(float(g_student)) > 1e-3
