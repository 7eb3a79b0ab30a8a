"""Capture the self-attention Q/K/V of every Wan block during one forward pass.

The captured tensors are what the sparse core sees: after the q/k/v projections, the
RMS qk-norm and RoPE, `(batch, seq, heads, head_dim)`. Used by `sparge_jax.tools.pictures`
and `benchmarks/methods.py`-style comparisons on real activations.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from pallas_kernels.reference import num_blocks
from sparge_jax.config import SparseConfig
from sparge_jax.masks import make_plan
from sparge_jax.nn import SparseAttention


@contextlib.contextmanager
def _recording(modules: dict[int, str], store: dict):
    """Within the block, `project_qkv` of the listed modules (by id) also stores its result."""
    original = SparseAttention.project_qkv

    def recording(self, x, context=None, *, rope=None):
        out = original(self, x, context, rope=rope)
        if context is None and id(self) in modules:
            store[modules[id(self)]] = out
        return out

    SparseAttention.project_qkv = recording
    try:
        yield store
    finally:
        SparseAttention.project_qkv = original


def capture_qkv(model, latents, timestep, context, *, layers=None, **call_kwargs) -> dict[str, tuple]:
    """Run `model` once with dense attention (eagerly) and return {"L<i>": (q, k, v)} of the
    self-attention of blocks `layers` (all by default). Other arguments as `WanModel.__call__`."""
    layers = range(len(model.blocks)) if layers is None else layers
    modules = {id(model.blocks[i].self_attn): f"L{i}" for i in layers}
    with _recording(modules, {}) as store:
        jax.block_until_ready(model(latents, timestep, context, attention_mode="dense", **call_kwargs))
    return {name: store[name] for name in modules.values()}


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
