"""One denoising step of Wan2.1-T2V-1.3B at 480p on a GPU: dense vs block-sparse self-attention.

Random weights (bf16 params and compute), batch 1, latents 21x60x104x16 -> 21x30x52 = 32760
tokens, 512 text tokens. A step is one jitted model call plus the Euler update
`x - dt * v`. Modes: dense (cuDNN attention through `jax.nn.dot_product_attention`) and sparse
with `SparseConfig(rule="topk")` keeping 10% / 5% of the k blocks of every q-block row (90% /
95% block sparsity; q blocks 128, k blocks 64; masks predicted inside the step). Every layer
runs in the named mode. Times: median of --reps calls after --warmup calls. Also printed: the
relative difference of each sparse velocity to the dense one (random weights, so only a sanity
check). The table is printed last.

Usage: python benchmarks/wan_step.py [--reps 5] [--warmup 2] [--frames 21 --height 60 --width 104]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparge_jax.config import SparseConfig
from sparge_jax.models import WAN_CONFIGS, WanModel

MODES = {"dense": None, "sparse 90%": 0.10, "sparse 95%": 0.05}


def make_step(graphdef, mode: str):
    @jax.jit
    def step(state, latents, timestep, context, dt):
        model = nnx.merge(graphdef, state)
        velocity, _ = model(latents, timestep, context, attention_mode=mode)
        return (latents.astype(jnp.float32) - dt * velocity).astype(latents.dtype), velocity

    return step


def median_seconds(fn, args, reps: int, warmup: int) -> tuple[float, float, jax.Array]:
    """(compile+first call seconds, median seconds of `reps` calls, last output)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        out = jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return first, float(np.median(samples)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=60)
    parser.add_argument("--width", type=int, default=104)
    args = parser.parse_args()

    base = WAN_CONFIGS["t2v-1.3b"]
    model = WanModel(base, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    state = nnx.state(model)
    keys = jax.random.split(jax.random.key(1), 2)
    latents = jax.random.normal(keys[0], (1, args.frames, args.height, args.width, base.in_dim), jnp.bfloat16)
    context = jax.random.normal(keys[1], (1, 512, base.text_dim), jnp.bfloat16)
    timestep = jnp.array([900.0], jnp.float32)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"device {jax.devices()[0].device_kind}; t2v-1.3b, {tokens} tokens, bf16", flush=True)

    rows, outputs = [], {}
    for name, keep in MODES.items():
        config = base if keep is None else base.replace(sparse=SparseConfig(rule="topk", topk=keep))
        graphdef = nnx.graphdef(nnx.eval_shape(
            lambda: WanModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)))
        step = make_step(graphdef, "dense" if keep is None else "sparse")
        try:
            first, median, out = median_seconds(step, (state, latents, timestep, context, 0.05), args.reps,
                                                args.warmup)
        except Exception as error:  # report and go on to the next mode
            print(f"{name}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            rows.append((name, float("nan"), float("nan")))
            continue
        outputs[name] = np.asarray(out[1], np.float32)
        print(f"{name}: first call (compile) {first:.1f} s, median {median * 1e3:.1f} ms", flush=True)
        rows.append((name, first, median))

    dense = outputs.get("dense")
    dense_ms = rows[0][2] * 1e3
    print("\n| mode | step time (ms, median) | speed-up vs dense | rel. diff of velocity vs dense |")
    print("|---|---|---|---|")
    for name, _, median in rows:
        diff = "n/a"
        if dense is not None and name in outputs and name != "dense":
            diff = f"{np.linalg.norm(outputs[name] - dense) / np.linalg.norm(dense):.3f}"
        print(f"| {name} | {median * 1e3:.1f} | {dense_ms / (median * 1e3):.2f}x | {diff} |")


if __name__ == "__main__":
    main()
