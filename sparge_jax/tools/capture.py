"""Capture the self-attention Q/K/V of every Wan block during one forward pass.

The captured tensors are what the sparse core sees: after the q/k/v projections, the
RMS qk-norm and RoPE, `(batch, seq, heads, head_dim)`. Used by `sparge_jax.tools.pictures`
and `benchmarks/methods.py`-style comparisons on real activations.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from pallas_kernels.blocks import num_blocks
from sparge_jax.config import SparseConfig
from sparge_jax.masks import make_plan
from sparge_jax.nn import recording_qkv


def capture_qkv(model, latents, timestep, context, *, layers=None, **call_kwargs) -> dict[str, tuple]:
    """Run `model` once with dense attention and return {"L<i>": (q, k, v)} of the
    self-attention of blocks `layers` (all by default): what each `SparseAttention` sows as
    "qkv" within `sparge_jax.nn.recording_qkv` (taken off the model again: it is left as it
    was). Traceable (eager or under `jax.jit`). Other arguments as `WanModel.__call__`."""
    layers = range(len(model.blocks)) if layers is None else layers
    with recording_qkv():
        model(latents, timestep, context, attention_mode="dense", scan_layers=False, **call_kwargs)
    sown = nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))
    return {f"L{i}": tuple(sown["blocks"][i]["self_attn"]["qkv"][0]) for i in layers}


def token_grid(latent_shape, patch_size) -> tuple[int, int, int]:
    """Latent `(frames, height, width)` -> token grid after patching."""
    if any(n % p for n, p in zip(latent_shape, patch_size)):
        raise ValueError(f"latent shape {tuple(latent_shape)} must be a multiple of patch_size {tuple(patch_size)}")
    return tuple(int(n // p) for n, p in zip(latent_shape, patch_size))


def layer_block_sparsity(captured: dict[str, tuple], config: SparseConfig, grid, *, states=None,
                         key: jax.Array | None = None) -> dict[str, float]:
    """{layer name "L<i>": fraction of (q block, k block) pairs that `config.method` (at that
    layer) skips on the captured q, k, v, mean over batch and heads}.

    grid: token grid `(frames, height, width)`. states: {layer name: provider state going into
    the call (SVG2 centroids)}, None: start afresh. key: PRNG key of the providers that draw;
    None: `jax.random.key(i)` for layer i, as `WanModel` uses."""
    out = {}
    for name, (q, k, v) in captured.items():
        layer = int(name[1:])
        plan, _ = make_plan(q, k, v, config.method, config.kernel, grid=grid, layer=layer,
                            state=None if states is None else states.get(name),
                            key=jax.random.key(layer) if key is None else key)
        nq, nk = num_blocks(q.shape[1], config.kernel.block_q), num_blocks(k.shape[1], config.kernel.block_k)
        out[name] = 1.0 - float(np.mean(np.asarray(plan.mask)[..., :nq, :nk]))
    return out


def save_qkv(path, captured: dict[str, tuple], grid=None) -> None:
    """Write captured layers as an .npz of `q_<layer>`, `k_<layer>`, `v_<layer>` float32 arrays,
    and the token grid `(frames, height, width)` they were captured on as `grid` (int64, when given)."""
    arrays = {f"{p}_{name}": np.asarray(x, np.float32) for name, qkv in captured.items() for p, x in zip("qkv", qkv)}
    if grid is not None:
        arrays["grid"] = np.asarray(grid, np.int64)
    np.savez(path, **arrays)
