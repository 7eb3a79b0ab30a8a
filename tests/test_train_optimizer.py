"""AdamW schedule (warm-up + cosine), clipping and freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.config import OptimSettings
from train.optimizer import learning_rate_schedule, make_optimizer, trainable_labels


def test_warmup_then_cosine_matches_formula():
    s = OptimSettings(lr=2e-3, warmup_steps=7, final_lr_ratio=0.1)
    total = 31
    sched = learning_rate_schedule(s, total)
    for step in range(total + 1):
        if step < 7:
            want = 2e-3 * step / 7
        else:
            frac = (step - 7) / (total - 7)
            want = 2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + np.cos(np.pi * frac))
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5, atol=1e-10)


def _params(rng):
    return {
        "blocks": {"0": {"self_attn": {"q": {"kernel": jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)}},
                         "ffn": {"kernel": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)}}},
        "head": {"bias": jnp.asarray(rng.standard_normal(3), jnp.float32)},
    }


def test_freezing_keeps_other_params_bitwise(rng):
    params = _params(rng)
    s = OptimSettings(lr=1e-2, warmup_steps=0, trainable="self_attn")
    opt = make_optimizer(s, 10, params)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    new = params
    for _ in range(3):
        updates, state = opt.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    assert np.array_equal(new["blocks"]["0"]["ffn"]["kernel"], params["blocks"]["0"]["ffn"]["kernel"])
    assert np.array_equal(new["head"]["bias"], params["head"]["bias"])
    moved = np.abs(np.asarray(new["blocks"]["0"]["self_attn"]["q"]["kernel"] - params["blocks"]["0"]["self_attn"]["q"]["kernel"]))
    assert moved.min() > 1e-4
    with pytest.raises(ValueError, match="matches no parameter"):
        trainable_labels(params, "nothing_like_this")


def test_first_step_is_clipped_adam(rng):
    """Step 1 of AdamW (no decay) moves each entry by lr * g/(|g|+eps) of the clipped grads."""
    params = _params(rng)
    s = OptimSettings(lr=1e-2, warmup_steps=0, final_lr_ratio=1.0, clip_norm=0.5, eps=1e-8)
    opt = make_optimizer(s, 5, params)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 10, jnp.float32), params)
    updates, _ = opt.update(grads, opt.init(params), params)
    g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)]).astype(np.float64)
    clipped = g * min(1.0, 0.5 / np.linalg.norm(g))
    want = -1e-2 * clipped / (np.abs(clipped) + 1e-8)  # bias-corrected m/sqrt(v) at step 1
    got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(updates)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
