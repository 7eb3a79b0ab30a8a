"""Run in a subprocess with 8 CPU devices by tests/test_context_parallel.py: the tiny Wan model's
velocity and distillation gradients on (data, fsdp, context, tensor) meshes against one device.

Prints one JSON line {mesh: {"velocity": max abs error, "grads": max abs error, "*_scale": max abs
value}, "svg": {...}}: "svg" is an SVG self-attention (per-head classification) with context 8.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.method_config import SVGMethod
from sparge_jax.nn import SparseAttention
from train.config import MeshSettings, ModelSettings, ObjectiveSettings
from train.model import abstract_model, init_params, velocity_fn
from train.objective import combine_losses, sample_noise
from train.schedule import noisy_latents, timesteps
from train.sharding import make_mesh, param_shardings, replicated

# 8 heads of 8 dims so context 8 divides them; latents 2x8x8 -> 2*4*4 = 32 tokens; 16x16 kernel blocks.
# (remat is covered by the 2-process training test; here it would only add compile time)
MODEL = ModelSettings(preset="tiny", compute_dtype="float32", remat=False, overrides={
    "num_heads": 8, "num_layers": 1, "sparse": {"kernel": {"block_q": 16, "block_k": 16}}})


def run(mesh_settings, batch, keys, params, teacher):
    """(velocity, grads) of the student under `mesh_settings` (None: one device, no mesh)."""
    parts, like = abstract_model(MODEL)
    mesh = make_mesh(mesh_settings, jax.devices()[:np.prod([s for s in vars(mesh_settings).values()])]) \
        if mesh_settings else make_mesh(MeshSettings(1, 1, 1), jax.devices()[:1])
    params, teacher = jax.device_put((params, teacher), (param_shardings(like, mesh),) * 2)

    def loss(params, batch, keys):
        """`train.objective.distillation_loss`'s steps, keeping the student's velocity."""
        settings = ObjectiveSettings()
        sigma, noise = sample_noise(keys, batch["latents"], settings.shift)
        x_t, t = noisy_latents(batch["latents"], noise, sigma), timesteps(sigma)
        v_student = velocity_fn(parts, params, "sparse", jnp.float32)(x_t, t, batch)
        v_teacher = velocity_fn(parts, teacher, "dense", jnp.float32)(x_t, t, batch)
        return combine_losses(v_student, v_teacher, noise - batch["latents"], settings)[0], v_student

    def step(params, batch, keys):
        grads, v = jax.grad(loss, has_aux=True)(params, batch, keys)
        return v, grads

    with jax.set_mesh(mesh):
        v, g = jax.jit(step, out_shardings=(replicated(mesh), replicated(mesh)))(params, batch, keys)
    return np.asarray(v), jax.tree.map(np.asarray, g)


def svg_attention_errors():
    """SVG's self-attention (head classification from sampled rows) on 64 tokens, context 8 vs one device."""
    attention = SparseAttention(64, 8, config=SparseConfig(SVGMethod(), KernelConfig(block_q=16, block_k=16)),
                                layer=0, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(attention)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64)), jnp.float32)
    call = lambda params, x: nnx.merge(graphdef, params)(x, grid=(4, 4, 4))[0]
    reference = jax.jit(call)(params, x)
    with jax.set_mesh(make_mesh(MeshSettings(1, 1, 1, 8))):
        out = jax.jit(call)(params, x)
    return {"velocity": float(jnp.max(jnp.abs(out - reference))), "velocity_scale": float(jnp.max(jnp.abs(reference)))}


def main(meshes):
    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.standard_normal((2, 2, 8, 8, 16)), jnp.float32),
             "context": jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)}
    keys = jax.random.split(jax.random.key(1), 2)
    _, params = init_params(MODEL, 0, None)
    params = jax.tree.map(np.asarray, params)
    teacher = jax.tree.map(lambda p: p * np.float32(1.01), params)  # a teacher a little off the student
    with jax.default_matmul_precision("highest"):
        v0, g0 = run(None, batch, keys, params, teacher)
        out = {}
        for name in meshes:
            data, fsdp, context, tensor = map(int, name.split("x"))
            v, g = run(MeshSettings(data, fsdp, tensor, context), batch, keys, params, teacher)
            errors = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), g, g0))
            scale = jax.tree.leaves(jax.tree.map(lambda a: float(np.max(np.abs(a))), g0))
            out[name] = {"velocity": float(np.max(np.abs(v - v0))), "velocity_scale": float(np.max(np.abs(v0))),
                         "grads": max(errors), "grads_scale": max(scale)}
        out["svg"] = svg_attention_errors()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
