"""AdamW schedule (warm-up + cosine), clipping, and which parameters train."""

import jax
import jax.numpy as jnp
import numpy as np
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


def test_trainable_labels_follow_the_parameter_paths(rng):
    """The step differentiates, updates and keeps optimizer state for the "train" leaves only
    (tests/test_train_teacher.py); `optim.trainable` picks them by path."""
    params = _params(rng)
    assert trainable_labels(params, "self_attn") == {
        "blocks": {"0": {"self_attn": {"q": {"kernel": "train"}}, "ffn": {"kernel": "freeze"}}},
        "head": {"bias": "freeze"},
    }
    assert trainable_labels(params, r"ffn|head/b") == {
        "blocks": {"0": {"self_attn": {"q": {"kernel": "freeze"}}, "ffn": {"kernel": "train"}}},
        "head": {"bias": "train"},
    }
    assert set(jax.tree.leaves(trainable_labels(params, None))) == {"train"}
    with pytest.raises(ValueError, match="matches no parameter"):
        trainable_labels(params, "nothing_like_this")


def test_first_step_is_clipped_adam(rng):
    """Step 1 of AdamW (no decay) moves each entry by lr * g/(|g|+eps) of the clipped grads."""
    params = _params(rng)
    s = OptimSettings(lr=1e-2, warmup_steps=0, final_lr_ratio=1.0, clip_norm=0.5, eps=1e-8)
    opt = make_optimizer(s, 5)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 10, jnp.float32), params)
    updates, _ = opt.update(grads, opt.init(params), params)
    g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)]).astype(np.float64)
    clipped = g * min(1.0, 0.5 / np.linalg.norm(g))
    want = -1e-2 * clipped / (np.abs(clipped) + 1e-8)  # bias-corrected m/sqrt(v) at step 1
    got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(updates)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
