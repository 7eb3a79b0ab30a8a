"""Wan2.1 VAE decode of a 480p (480x832), 81-frame video: `sparge_jax` (JAX) next to diffusers'
`AutoencoderKLWan` (PyTorch) on the same device, in the same run.

Both decode random latents (1, 21 latent frames, 60x104, 16 channels) with the full-size Wan2.1
config and random weights (each framework's own initialisation: the weights differ, the work does
not), one latent frame per chunk as the original does (diffusers without tiling or slicing). For
each dtype (bf16 and fp32: params and compute), each framework runs in its own subprocess so its
peak memory is its own: JAX's `peak_bytes_in_use` (with XLA_PYTHON_CLIENT_PREALLOCATE=false) and
torch's `max_memory_allocated`; for JAX also the peak right after compilation (autotuning
included) and the temp buffers XLA plans for one call. Times: first call (JAX: with
compilation), then the median of --reps calls after --warmup calls. The table is printed last.

On the GPU machine (from the repository root). The image has torch but not diffusers: carry its
wheel and importlib_metadata (the image has diffusers' other needs: huggingface-hub 1.33, safetensors,
regex, requests, pillow, filelock, zipp). Once, here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.1

then run with `.whl` carried:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=.:/tmp/site && python3 benchmarks/vae_speed.py

`--small` (a base_dim-8 VAE, a 1+4-frame 32x48 video) checks the code path on a CPU in seconds; the
torch column is left out, with a note, where torch or diffusers is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RESULT = "RESULT "
FULL = dict(base_dim=96, latent_frames=21, height=60, width=104)
SMALL = dict(base_dim=8, latent_frames=2, height=4, width=6)


def _median_seconds(call, reps: int, warmup: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `reps` calls after `warmup` more)."""
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return first, samples[len(samples) // 2]


def jax_worker(size: dict, dtype: str, reps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparge_jax.models import WanVAE, WanVAEConfig

    dt = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[dtype]
    model = WanVAE(WanVAEConfig(base_dim=size["base_dim"]), rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt)
    graphdef, state = nnx.split(model)
    del model

    @jax.jit
    def decode(state, latents):
        return nnx.merge(graphdef, state).decode(latents, normalized=False)

    shape = (1, size["latent_frames"], size["height"], size["width"], 16)
    latents = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    peak_gib = lambda: (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / 2**30
    t0 = time.perf_counter()
    compiled = decode.lower(state, latents).compile()
    compile_s = time.perf_counter() - t0
    # Peak so far (compilation's autotuning included) and the buffers XLA plans for one call.
    compile_peak, temp = peak_gib(), compiled.memory_analysis().temp_size_in_bytes / 2**30
    first, median = _median_seconds(lambda: jax.block_until_ready(compiled(state, latents)), reps, warmup)
    video = compiled(state, latents)
    peak = peak_gib()
    return dict(first_s=compile_s + first, median_s=median, peak_gib=peak, compile_peak_gib=compile_peak,
                temp_gib=temp,
                shape=list(video.shape), device=str(jax.devices()[0].device_kind),
                finite=bool(jnp.isfinite(video).all()))


def torch_worker(size: dict, dtype: str, reps: int, warmup: int) -> dict:
    import torch
    from diffusers import AutoencoderKLWan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = AutoencoderKLWan(base_dim=size["base_dim"]).to(device=device, dtype=dt).eval()
    latents = torch.randn(1, 16, size["latent_frames"], size["height"], size["width"],
                          generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dt)

    def call():
        with torch.no_grad():
            out = model.decode(latents).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, median = _median_seconds(call, reps, warmup)
    video = call()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return dict(first_s=first, median_s=median, peak_gib=peak, compile_peak_gib=None, temp_gib=None,
                shape=list(video.permute(0, 2, 3, 4, 1).shape),
                device=name, finite=bool(torch.isfinite(video).all()))


def run_worker(framework: str, dtype: str, args) -> dict | str:
    """One measurement in a subprocess; its result dict, or the reason it has none."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--dtypes", dtype,
               "--reps", str(args.reps), "--warmup", str(args.warmup)] + (["--small"] if args.small else [])
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"failed (exit {done.returncode}): {tail[0]}"


def _torch_missing() -> str | None:
    import importlib.util

    for name in ("torch", "diffusers"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small VAE and video (checks the code path on a CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = SMALL if args.small else FULL
    if args.worker:
        worker = jax_worker if args.worker == "jax" else torch_worker
        print(RESULT + json.dumps(worker(size, args.dtypes[0], args.reps, args.warmup)), flush=True)
        return
    frames = 1 + 4 * (size["latent_frames"] - 1)
    print(f"Wan2.1 VAE decode: {frames} frames of {8 * size['height']}x{8 * size['width']}, base_dim "
          f"{size['base_dim']}, random weights")
    missing = _torch_missing()
    rows = []
    for dtype in args.dtypes:
        for framework in ("jax", "torch"):
            result = (f"skipped: {missing}" if framework == "torch" and missing
                      else run_worker(framework, dtype, args))
            print(framework, dtype, result, flush=True)
            rows.append((framework, dtype, result))
    print()
    # JAX only: "after compile" is the peak before the first call (compilation and autotuning),
    # "XLA temp" the scratch buffers the compiled decode plans for one call.
    print("| framework | dtype | first call s | decode s (median) | peak GiB | peak after compile GiB "
          "| XLA temp GiB | device |")
    print("|---|---|---|---|---|---|---|---|")
    gib = lambda value: "n/a" if value is None or value != value else f"{value:.2f}"
    for framework, dtype, r in rows:
        if isinstance(r, str):
            print(f"| {framework} | {dtype} | {r} | | | | | |")
            continue
        print(f"| {framework} | {dtype} | {r['first_s']:.2f} | {r['median_s']:.3f} | {gib(r['peak_gib'])} "
              f"| {gib(r['compile_peak_gib'])} | {gib(r['temp_gib'])} | {r['device']} |")


if __name__ == "__main__":
    main()
