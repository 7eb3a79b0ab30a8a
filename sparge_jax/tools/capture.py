"""Capture the self-attention Q/K/V of every Wan block during one forward pass.

The captured tensors are what the sparse core sees: after the q/k/v projections, the
RMS qk-norm and RoPE, `(batch, seq, heads, head_dim)`. Used by `sparge_jax.tools.pictures`
and `benchmarks/methods.py`-style comparisons on real activations.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.blocks import num_blocks
from sparge_jax.config import SparseConfig
from sparge_jax.masks import make_plan
from sparge_jax.nn import recording_qkv


def capture_qkv(model, latents, timestep, context, *, layers=None, reduce=None, **call_kwargs) -> dict[str, Any]:
    """Run `model` once with dense attention and return {"L<i>": (q, k, v)} of the
    self-attention of blocks `layers` (all by default): what each `SparseAttention` sows as
    "qkv" within `sparge_jax.nn.recording_qkv` (taken off the model again: it is left as it
    was). Traceable (eager or under `jax.jit`). Other arguments as `WanModel.__call__`.

    reduce: `(q, k, v, layer) -> pytree` computed inside the forward (e.g. `sparsity_reduction`);
    {"L<i>": its value} is returned instead, and under `jax.jit` no layer's q, k, v outlive
    that layer."""
    layers = range(len(model.blocks)) if layers is None else layers
    with recording_qkv(reduce):
        model(latents, timestep, context, attention_mode="dense", scan_layers=False, **call_kwargs)
    sown = nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))
    values = {f"L{i}": sown["blocks"][i]["self_attn"]["qkv"][0] for i in layers}
    return {name: tuple(qkv) for name, qkv in values.items()} if reduce is None else values


def token_grid(latent_shape, patch_size) -> tuple[int, int, int]:
    """Latent `(frames, height, width)` -> token grid after patching."""
    if any(n % p for n, p in zip(latent_shape, patch_size)):
        raise ValueError(f"latent shape {tuple(latent_shape)} must be a multiple of patch_size {tuple(patch_size)}")
    return tuple(int(n // p) for n, p in zip(latent_shape, patch_size))


def skipped_fraction(q, k, v, config: SparseConfig, grid, *, layer: int, state=None,
                     key: jax.Array | None = None) -> jax.Array:
    """float32 scalar: the fraction of (q block, k block) pairs that `config.method` (at `layer`)
    skips on q `(batch, seq_q, heads, head_dim)`, k, v `(batch, seq_k, heads, head_dim)`, mean
    over batch and heads, counting the blocks that hold tokens only. Traceable.

    grid: token grid `(frames, height, width)`. state: provider state going into the call (SVG2
    centroids), None: start afresh. key: PRNG key of the providers that draw; None:
    `jax.random.key(layer)`, as `WanModel` uses."""
    plan, _ = make_plan(q, k, v, config.method, config.kernel, grid=grid, layer=layer, state=state,
                        key=jax.random.key(layer) if key is None else key)
    nq, nk = num_blocks(q.shape[1], config.kernel.block_q), num_blocks(k.shape[1], config.kernel.block_k)
    kept = plan.mask[..., :nq, :nk]
    # the skipped count over the total: 1 - kept / total can come out a little below 0 where every block is kept
    # (XLA multiplies by the reciprocal of the total)
    return (kept.size - jnp.count_nonzero(kept)).astype(jnp.float32) / kept.size


def sparsity_reduction(config: SparseConfig, grid, dense_layers=(), *, states=None, key: jax.Array | None = None):
    """`(q, k, v, layer) -> float32 scalar` for `capture_qkv(reduce=...)`: the `skipped_fraction`
    of `config.method` at that layer, 0 for the layers in `dense_layers` (they run dense).
    states: per layer index, the provider state going into the call (SVG2 centroids); None:
    afresh. key: as `skipped_fraction`'s."""
    def reduce(q, k, v, layer):
        if layer in dense_layers:
            return jnp.zeros((), jnp.float32)
        return skipped_fraction(q, k, v, config, grid, layer=layer, key=key,
                                state=None if states is None else states[layer])

    return reduce


def save_qkv(path, captured: dict[str, tuple], grid=None) -> None:
    """Write captured layers as an .npz of `q_<layer>`, `k_<layer>`, `v_<layer>` float32 arrays,
    and the token grid `(frames, height, width)` they were captured on as `grid` (int64, when given)."""
    arrays = {f"{p}_{name}": np.asarray(x, np.float32) for name, qkv in captured.items() for p, x in zip("qkv", qkv)}
    if grid is not None:
        arrays["grid"] = np.asarray(grid, np.int64)
    np.savez(path, **arrays)
