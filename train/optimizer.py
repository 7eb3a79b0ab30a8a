"""optax AdamW with warm-up + cosine decay and global-norm clipping, an optional EMA of the
trained params (`optim.ema_decay`); which parameters train (`optim.trainable`)."""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparge_jax.dtypes import DTYPES
from train.config import OptimSettings


def learning_rate_schedule(settings: OptimSettings, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine to `lr * final_lr_ratio`
    at `total_steps`."""
    warmup = min(settings.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=settings.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=settings.lr * settings.final_lr_ratio,
    )


def path_string(path) -> str:
    """'/'-joined key path of a pytree leaf, e.g. 'blocks/0/self_attn/q/kernel'."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def trainable_labels(params, pattern: str | None):
    """Pytree like `params` of "train" / "freeze" labels: a leaf trains when its path matches
    `pattern` (re.search) or when pattern is None. Raises ValueError when nothing matches."""
    if pattern is None:
        return jax.tree.map(lambda _: "train", params)
    regex = re.compile(pattern)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if regex.search(path_string(path)) else "freeze", params
    )
    if "train" not in jax.tree.leaves(labels):
        raise ValueError(f"optim.trainable={pattern!r} matches no parameter path")
    return labels


def make_optimizer(settings: OptimSettings, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW, then (with `optim.ema_decay`) `params_ema`. The train
    step applies it to the trainable params only (`optim.trainable`; `train.model.select`):
    frozen params get no gradient, no update, no optimizer state and no EMA."""
    adamw = optax.adamw(
        learning_rate_schedule(settings, total_steps),
        b1=settings.b1,
        b2=settings.b2,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        mu_dtype=DTYPES[settings.mu_dtype],
    )
    ema = () if settings.ema_decay is None else (params_ema(settings.ema_decay),)
    return optax.chain(optax.clip_by_global_norm(settings.clip_norm), adamw, *ema)


class ParamsEmaState(NamedTuple):
    """count: int32 scalar, EMA updates done; ema: float32 EMA of the params (their tree)."""

    count: jax.Array
    ema: optax.Params


def ema_decay_at(decay: float, count: jax.Array) -> jax.Array:
    """The decay of EMA update number `count` (0 for the first): min(decay, (1 + t) / (10 + t)),
    float32. The warm-up keeps the first averages from being dominated by the initial params
    (0.1 at t = 0, 0.5 at t = 8, 0.9 at t = 80, 0.99 at t = 890)."""
    t = count.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def params_ema(decay: float) -> optax.GradientTransformation:
    """Keeps a float32 exponential moving average of the params its updates lead to, updates
    unchanged: last in a chain, so that `params + updates` are the new params. It starts at the
    initial params and, with d = `ema_decay_at(decay, t)` for update t, does
    ema <- d * ema + (1 - d) * (params + updates). Its state lies among the optimizer's
    (`ParamsEmaState`; read it with `ema_of`): sharded like the params and checkpointed with
    them, and left unchanged by a step the non-finite guard skips."""

    def init(params):
        ema = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)  # own buffers: the step donates both
        return ParamsEmaState(jnp.zeros([], jnp.int32), ema)

    def update(updates, state, params):
        d = ema_decay_at(decay, state.count)
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(jnp.float32), state.ema, new)
        return updates, ParamsEmaState(optax.safe_increment(state.count), ema)

    return optax.GradientTransformation(init, update)


def ema_of(opt_state) -> optax.Params | None:
    """The EMA tree `params_ema` keeps in `opt_state` (None at the leaves it does not average),
    or None when the optimizer keeps none."""
    state = optax.tree_utils.tree_get(opt_state, ParamsEmaState.__name__)
    return None if state is None else state.ema
