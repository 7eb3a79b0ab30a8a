"""One denoising step of a Wan2.1 DiT: dense, block-sparse and "floor" step times, where the time
goes, and the compile time with and without `WanConfig.scan_layers`.

    python benchmarks/wan_step.py [--preset t2v-1.3b|t2v-14b] [--resolution 480p|720p] [--reps 5]
        [--modes dense "dense -nt" ...] [--scan-layers] [--residual-dtype float32|bfloat16] [--xla KEY=VALUE ...]
    python benchmarks/wan_step.py --small     # the tiny preset on a few tokens (CPU; tests the code paths)
    python benchmarks/wan_step.py --compile-only [--preset t2v-14b --resolution 720p]
                                              # compile times only, per mode with and without scan_layers,
                                              # from abstract params (no weights allocated; any backend)

Random weights (bf16 params and compute; --small: float32), batch 1, 512 text tokens (--small:
5), 81 frames: latents 21x60x104 at 480p (32760 tokens), 21x90x160 at 720p (75600 tokens). A
step is one jitted model call plus the Euler update `x - dt * v`; every layer runs in the named
mode. Modes: dense (cuDNN attention where it applies); sparse 90% / 95% (Sparge2 Top-k keeping
10% / 5% of the k blocks of every q-block row, masks predicted inside the step); floor (one k
block per row: everything but attention, near enough). A mode name ending in " -nt" is that
mode compiled with Triton GEMMs off (`sparge_jax.compile_options.TRITON_GEMM_OFF`, the sampler's
default on GPUs: cuBLASLt GEMMs, so XLA can fuse the FFN's bias + GELU into the up-projection's
epilogue; no effect on CPU); its velocity is compared with the mode's own when that ran before
it. --xla KEY=VALUE: an XLA compile option for every mode (e.g. `xla_allow_excess_precision=false`:
XLA keeps the bfloat16 roundings the code asks for instead of removing f32 -> bf16 -> f32 round
trips). --scan-layers: every mode with `WanConfig.scan_layers` (one block compiled instead of every
layer's copy); without it the layers are unrolled and "sparse 95%" is timed scanned too.
--residual-dtype: the dtype every mode's model stores its residual stream in (`WanModel`'s
`residual_dtype`: float32 as Wan2.1, the default; bfloat16 as diffusers' bf16 pipeline); run with
and without it to compare. Each mode's line lists the GEMMs of its compiled step
(`floor_kernels.gemm_summary`: the cuBLASLt epilogue, or the fusion holding the dot), so a " -nt"
run shows whether BIAS_GELU fused.
Times: per call, the median of --reps calls after --warmup calls, each waited for (host
overhead included: ~20 ms of the 1.3B 480p floor's 183 ms on an H200), with the median time a
call took to return to Python (its dispatch: near the whole call when the host waits for the
device inside it); in a loop, --reps
steps back to back as the sampler runs them (each step's latents the next one's input, only the
last waited for), per step; compile: lowering + XLA compile of the step, measured apart from
the calls.
The breakdown (benchmarks/step_profile.py) sums a profiler trace of --profile-calls calls per
category (matmul, attention, norm/modulation, RoPE, copies/casts, other), in ms per step.
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from floor_kernels import gemm_summary
from step_profile import breakdown_table, op_breakdown

from sparge_jax.compile_options import TRITON_GEMM_OFF
from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.dtypes import DTYPES
from sparge_jax.method_config import Sparge2Method
from sparge_jax.models import WAN_CONFIGS, WanModel
from sparge_jax.tools.compare import rel_l2
from train.config import parse_value

RESOLUTIONS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}
SMALL_LATENTS = (2, 8, 12)
# Kept fraction of k blocks per row (None: dense attention); floor keeps one block (at least one).
MODES = {"dense": None, "sparse 90%": 0.10, "sparse 95%": 0.05, "floor": 1e-9}
NO_TRITON = " -nt"  # mode name suffix: compiled with TRITON_GEMM_OFF
MODE_NAMES = (*MODES, *(name + NO_TRITON for name in MODES))
SCAN_MODE = "sparse 95%"


def mode_config(base, keep: float | None, scan: bool, small: bool):
    """The preset's `WanConfig` for one mode (`MODES`), scanned or not."""
    config = base.replace(scan_layers=scan)
    if keep is None:
        return config
    kernel = base.sparse.kernel if small else KernelConfig()
    method = Sparge2Method(rule="topk", topk=keep, topk_count="ceil" if keep > 1e-6 else "floor")
    return config.replace(sparse=SparseConfig(method, kernel))


def mode_step(build, base, name: str, scan: bool, small: bool, xla_options: dict | None = None):
    """The jitted step of mode `name` (`MODE_NAMES`: a `MODES` key, " -nt" compiled with
    `TRITON_GEMM_OFF`), scanned or not, compiled with `xla_options` as well; `build(config)`
    makes the model."""
    mode = name.removesuffix(NO_TRITON)
    config = mode_config(base, MODES[mode], scan, small)
    options = {**(TRITON_GEMM_OFF if name.endswith(NO_TRITON) else {}), **(xla_options or {})}
    return make_step(nnx.graphdef(nnx.eval_shape(lambda: build(config))), "dense" if MODES[mode] is None else "sparse",
                     options or None)


def xla_option(text: str) -> tuple[str, Any]:
    """`--xla KEY=VALUE` -> (KEY, VALUE read as the trainer reads a config override: JSON when it
    parses, e.g. false or 3, else the string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--xla takes KEY=VALUE (an XLA option); got {text!r}")
    return key, parse_value(value)


def make_step(graphdef, mode: str, compiler_options: dict | None = None):
    def step(state, latents, timestep, context, dt):
        model = nnx.merge(graphdef, state)
        velocity, _ = model(latents, timestep, context, attention_mode=mode)
        return (latents.astype(jnp.float32) - dt * velocity).astype(latents.dtype), velocity

    return jax.jit(step, compiler_options=compiler_options)


def compile_seconds(step, args) -> tuple[float, object]:
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    return time.perf_counter() - t0, compiled


def compile_only(args, base, build, latent_grid, text_len: int, dtype) -> dict:
    """{"compile": {name: seconds}} of each mode's step per layer and with `scan_layers`, lowered
    from abstract params and inputs (nothing allocated or run)."""
    state = nnx.split(nnx.eval_shape(lambda: build(base)))[1]
    call_args = (state, jax.ShapeDtypeStruct((1, *latent_grid, base.in_dim), dtype),
                 jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1, text_len, base.text_dim), dtype),
                 0.05)
    compiles = {}
    for name in args.modes:
        for scan in (False, True):
            step = mode_step(build, base, name, scan, args.small, dict(args.xla))
            label = f"{name}, scan_layers" if scan else name
            compiles[label], _ = compile_seconds(step, call_args)
            print(f"{label}: compile {compiles[label]:.1f} s", flush=True)
    print(f"\n| step ({jax.devices()[0].device_kind}) | compile (s) |\n|---|---|")
    for label, seconds in compiles.items():
        print(f"| {label} | {seconds:.1f} |")
    return {"compile": compiles}


def median_seconds(compiled, args, reps: int, warmup: int) -> tuple[float, float, jax.Array]:
    """(median seconds of `reps` calls after `warmup` calls, each waited for; median seconds until
    each call returned to Python, its dispatch; last velocity). A dispatch close to the call's
    whole time means the host waited for the device inside the call (it cannot prepare the next)."""
    out = None
    for _ in range(max(warmup, 1)):
        out = jax.block_until_ready(compiled(*args))
    samples, dispatches = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = compiled(*args)
        dispatches.append(time.perf_counter() - t0)
        out = jax.block_until_ready(out)
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples)), float(np.median(dispatches)), out[1]


def loop_seconds(compiled, args, reps: int) -> float:
    """Seconds per step of `reps` steps run back to back as a sampler runs them, each step's latents
    the next one's input and only the last waited for: the host prepares a call while the device
    runs the one before (`sparge_jax.sampling.sample` does not wait between steps), so the host's
    per-call overhead that `median_seconds` includes is hidden."""
    state, latents, *rest = args
    jax.block_until_ready(compiled(state, latents, *rest))
    t0 = time.perf_counter()
    for _ in range(reps):
        latents, _ = compiled(state, latents, *rest)
    jax.block_until_ready(latents)
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> dict:
    """Run the benchmark; returns {"steps": {mode: seconds per call}, "dispatch": {mode: seconds until
    a call returned}, "loop": {mode: seconds per
    step in a loop}, "compile": {name: seconds}, "breakdown": {mode: {category: seconds}},
    "gemms": {mode: Counter of `gemm_summary` kinds}}; with --scan-layers each mode's name ends in
    ", scan_layers"."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("t2v-1.3b", "t2v-14b"), default="t2v-1.3b")
    parser.add_argument("--resolution", choices=tuple(RESOLUTIONS), default="480p")
    parser.add_argument("--small", action="store_true", help="tiny preset, few tokens, float32 (CPU)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile-calls", type=int, default=2, help="calls traced for the breakdown (0: none)")
    parser.add_argument("--modes", nargs="+", choices=MODE_NAMES, default=list(MODES),
                        help=f'modes to time; "<mode>{NO_TRITON}": compiled with Triton GEMMs off')
    parser.add_argument("--scan-layers", action="store_true", help="every mode with WanConfig.scan_layers")
    parser.add_argument("--residual-dtype", choices=tuple(DTYPES), default="float32",
                        help="dtype of the residual stream (WanModel's residual_dtype)")
    parser.add_argument("--trace-out", help="directory: each profiled mode's trace and optimized HLO (DIR/<mode>/)")
    parser.add_argument("--xla", type=xla_option, action="append", default=[], metavar="KEY=VALUE",
                        help="an XLA compile option for every mode (repeatable), e.g. "
                             "xla_allow_excess_precision=false")
    parser.add_argument("--compile-only", action="store_true",
                        help="lower and compile each mode, per layer and scanned, from abstract params; no calls")
    args = parser.parse_args(argv)
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)  # one kernel per random draw at init

    preset = "tiny" if args.small else args.preset
    base = WAN_CONFIGS[preset]
    dtype = jnp.float32 if args.small else jnp.bfloat16
    frames, height, width = SMALL_LATENTS if args.small else RESOLUTIONS[args.resolution]
    text_len = 5 if args.small else 512
    build = lambda config: WanModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                    residual_dtype=DTYPES[args.residual_dtype])
    if args.compile_only:
        return compile_only(args, base, build, (frames, height, width), text_len, dtype)
    state = jax.jit(lambda: nnx.split(build(base))[1])()
    keys = jax.random.split(jax.random.key(1), 2)
    latents = jax.random.normal(keys[0], (1, frames, height, width, base.in_dim), dtype)
    context = jax.random.normal(keys[1], (1, text_len, base.text_dim), dtype)
    call_args = (state, latents, jnp.array([900.0], jnp.float32), context, 0.05)
    tokens = frames * (height // base.patch_size[1]) * (width // base.patch_size[2])
    where = "small" if args.small else args.resolution
    print(f"device {jax.devices()[0].device_kind}; {preset} {where}, {tokens} tokens, {jnp.dtype(dtype).name}, "
          f"residual {args.residual_dtype}", flush=True)

    suffix = ", scan_layers" if args.scan_layers else ""
    steps, dispatches, loops, compiles, breakdowns, velocities, gemms = {}, {}, {}, {}, {}, {}, {}
    for mode in args.modes:
        name = mode + suffix
        step = mode_step(build, base, mode, args.scan_layers, args.small, dict(args.xla))
        try:
            compiles[name], compiled = compile_seconds(step, call_args)
            steps[name], dispatches[name], velocities[name] = median_seconds(compiled, call_args, args.reps,
                                                                             args.warmup)
            loops[name] = loop_seconds(compiled, call_args, args.reps)
        except Exception as error:  # report and go on to the next mode
            print(f"{name}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        gemms[name] = collections.Counter(gemm_summary(compiled.as_text()))
        twin = mode.removesuffix(NO_TRITON) + suffix
        diff = (f", velocity rel. diff to {twin} {rel_l2(velocities[name], velocities[twin]):.2e}"
                if twin != name and twin in velocities else "")
        print(f"{name}: compile {compiles[name]:.1f} s, median {steps[name] * 1e3:.1f} ms (dispatch "
              f"{dispatches[name] * 1e3:.1f} ms), in a loop {loops[name] * 1e3:.1f} ms{diff}; GEMMs "
              + ", ".join(f"{kind} x{count}" for kind, count in sorted(gemms[name].items())), flush=True)
        if args.profile_calls:
            try:
                keep = None if args.trace_out is None else f"{args.trace_out}/{name.replace(' ', '_').replace('%', '')}"
                breakdowns[name] = op_breakdown(compiled, call_args, args.profile_calls, keep)
            except Exception as error:  # e.g. no CUPTI: keep the times
                print(f"{name}: profile failed: {type(error).__name__}: {str(error)[:300]}", flush=True)

    if SCAN_MODE in args.modes and not args.scan_layers:  # the same step with the scanned block stack
        step = mode_step(build, base, SCAN_MODE, True, args.small, dict(args.xla))
        name = f"{SCAN_MODE}, scan_layers"
        compiles[name], compiled = compile_seconds(step, call_args)
        steps[name], dispatches[name], velocity = median_seconds(compiled, call_args, args.reps, args.warmup)
        loops[name] = loop_seconds(compiled, call_args, args.reps)
        if SCAN_MODE in velocities:
            print(f"{name}: compile {compiles[name]:.1f} s, median {steps[name] * 1e3:.1f} ms, velocity rel. diff "
                  f"to per-layer {rel_l2(velocity, velocities[SCAN_MODE]):.2e}", flush=True)

    print("\n| step | per call (ms, median) | speed-up vs dense | in a loop (ms per step) | speed-up vs dense "
          "| compile (s) |")
    print("|---|---|---|---|---|---|")
    for name, seconds in steps.items():
        twin = ("dense" + NO_TRITON if NO_TRITON in name else "dense") + suffix  # dense, compiled alike
        dense, dense_loop = steps.get(twin), loops.get(twin)
        speedup = f"{dense / seconds:.2f}x" if dense else "n/a"
        loop_speedup = f"{dense_loop / loops[name]:.2f}x" if dense_loop else "n/a"
        print(f"| {name} | {seconds * 1e3:.1f} | {speedup} | {loops[name] * 1e3:.1f} | {loop_speedup} "
              f"| {compiles[name]:.1f} |")
    if breakdowns:
        print("\nTime per category, ms per step (share of the traced op time):\n")
        print(breakdown_table(breakdowns))
    return {"steps": steps, "dispatch": dispatches, "loop": loops, "compile": compiles, "breakdown": breakdowns,
            "gemms": gemms}


if __name__ == "__main__":
    main()
