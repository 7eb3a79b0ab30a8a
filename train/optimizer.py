"""optax AdamW with warm-up + cosine decay and global-norm clipping; which parameters train (`optim.trainable`)."""

from __future__ import annotations

import re

import jax
import optax

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
    """Clip by global norm, then AdamW. The train step applies it to the trainable params only
    (`optim.trainable`; `train.model.select`): frozen params get no gradient, no update and no
    optimizer state."""
    return optax.chain(
        optax.clip_by_global_norm(settings.clip_norm),
        optax.adamw(
            learning_rate_schedule(settings, total_steps),
            b1=settings.b1,
            b2=settings.b2,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
        ),
    )
