"""Sample Wan latents with sparse self-attention: `python -m sparge_jax.tools.sample`.

    python -m sparge_jax.tools.sample --checkpoint wan/ --prompt "a red fox in the snow" --out fox.mp4 \
        --num-frames 81 --height 480 --width 832 --steps 50 --dense-steps 10 --compare-dense
    python -m sparge_jax.tools.sample --checkpoint ckpt/ --context prompt.npy --out latents.npy \
        --latent-shape 21 60 104 --steps 50 --solver unipc --shift 5 --guidance 5 \
        --negative-context negative.npy --dense-steps 10 --seed 0 --compare-dense

Reads a converted checkpoint (`python -m convert`) and the prompt (encoded by the converted umT5
text encoder) or precomputed umT5 text embeddings (.npy `(text_len, text_dim)` or
`(1, text_len, text_dim)`, or .safetensors), prints per-step times and writes the final latents
`(1, frames, height, width, channels)` as .npy, or, for a video --out (.mp4, ...), the video
the converted VAE decodes from them (sparge_jax.tools.text_to_video says where the text encoder and
VAE are found). With --compare-dense it also runs every step dense from the same noise, writes
`<out>_dense.npy` (a video: `<out>_dense.mp4` and dense | sparse side by side in
`<out>_dense_vs_sparse.mp4`, with the videos' PSNR / SSIM) and prints PSNR / relative L2 error
of the sparse latents vs dense. Text-to-video only. On a GPU the model call is compiled with
cuBLASLt GEMMs, whose epilogues fuse the FFN's bias + GELU (`sparge_jax.compile_options`: 6 % off
a 1.3B 480p sparse step on an H200); --triton-gemm compiles it with XLA's default Triton GEMMs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sparge_jax.cli import HelpFormatter, exit_on_user_error
from sparge_jax.compile_options import model_call_options
from sparge_jax.context_parallel import CONTEXT_AXIS
from sparge_jax.dtypes import DTYPES
from sparge_jax.method_config import Sparge2Method
from sparge_jax.sampling import SOLVERS, guided, sample, shifted_sigmas
from sparge_jax.tools import text_to_video
from sparge_jax.tools.capture import token_grid
from sparge_jax.tools.compare import rel_l2


def load_embeddings(path: str, key: str | None = None) -> np.ndarray:
    """Text embeddings float32 `(1, text_len, text_dim)` from .npy or .safetensors (tensor `key`,
    or the only tensor)."""
    p = Path(path)
    if p.suffix == ".npy":
        x = np.load(p)
    elif p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(p))
        if key is None and len(tensors) != 1:
            raise ValueError(f"{path} holds {sorted(tensors)}: pick one with --context-key")
        x = tensors[key] if key is not None else next(iter(tensors.values()))
    else:
        raise ValueError(f"embeddings must be .npy or .safetensors; got {path}")
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] != 1:
        raise ValueError(f"embeddings must have shape (text_len, text_dim) or (1, text_len, text_dim); got {x.shape}")
    return x


def read_embeddings(option: str, path: str, key: str | None = None) -> np.ndarray:
    """`load_embeddings` for a command-line option: a missing or unreadable file, or a wrong
    shape, is a ValueError naming `option`."""
    try:
        return load_embeddings(path, key)
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(f"{option}: {error}") from None


def psnr(x: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of x against reference, peak = the reference's value range."""
    x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    mse = np.mean((x - reference) ** 2)
    peak = reference.max() - reference.min()
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def context_mesh(degree: int) -> Mesh | None:
    """A mesh with one "context" axis over the first `degree` devices (None for 1): the
    sampler's `--context-parallel` (`sparge_jax.context_parallel`)."""
    if degree == 1:
        return None
    return jax.make_mesh((degree,), (CONTEXT_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:degree])


def velocity_fn(model, mesh: Mesh | None = None, *, triton_gemm: bool = False):
    """A jitted `(x, timestep, context, mode, method_state) -> (velocity, method_state)` over
    the model's current weights (`WanModel.__call__` threads the state: SVG2 keeps its centroids).
    With a `context_mesh` the weights are replicated over it and the model runs context parallel.
    Compiled with `model_call_options(triton_gemm)`: on a GPU cuBLASLt GEMMs, whose epilogues
    fuse the FFN's bias + GELU (`sparge_jax.compile_options`), unless `triton_gemm`."""
    graphdef, weights = nnx.split(model)
    if mesh is not None:
        weights = jax.device_put(weights, NamedSharding(mesh, PartitionSpec()))

    @functools.partial(jax.jit, static_argnames=("mode",), compiler_options=model_call_options(triton_gemm))
    def run(weights, x, t, context, mode, method_state):
        return nnx.merge(graphdef, weights)(x, t, context, method_state, attention_mode=mode)

    fresh = (None,) * len(model.blocks)  # the form the model returns: no retrace after step 0

    def call(x, t, context, mode, method_state):
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            return run(weights, x, t, context, mode, fresh if method_state is None else method_state)

    return call


def run_sampler(velocity, noise, context, negative, sigmas, *, solver: str, guidance: float,
                dense_steps: int, all_dense: bool = False,
                record: dict | None = None) -> tuple[np.ndarray, list[float], bool]:
    """One sampling run; returns (latents, per-step wall seconds, whether the mask providers
    kept state across steps). Steps < dense_steps (or all steps when all_dense) use dense
    self-attention. Guidance 1 skips the unconditional pass. The providers' state (SVG2's
    centroids) starts afresh with this run and is carried from step to step.
    record: {step: None} to fill with that step's model inputs (latents, timestep, context,
    provider state going in)."""
    times: list[float] = []
    start = [time.perf_counter()]
    state = [None]

    def call(x, t, ctx, mode, i):
        if record is not None and i in record:
            record[i] = (x, t, ctx, state[0])
        out, state[0] = velocity(x, t, ctx, mode, state[0])
        return out

    def v(x, s, i):
        mode = "dense" if all_dense or i < dense_steps else "sparse"
        t = jnp.full((x.shape[0],), 1000.0 * s, jnp.float32)
        if guidance == 1.0:
            return call(x, t, context, mode, i)
        both = call(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([context, negative]), mode, i)
        return guided(both[: x.shape[0]], both[x.shape[0]:], guidance)

    def on_step(i, x):
        x.block_until_ready()
        now = time.perf_counter()
        times.append(now - start[0])
        start[0] = now

    out = sample(v, noise, sigmas, solver=solver, on_step=on_step)
    stateful = state[0] is not None and any(layer is not None for layer in state[0])
    return np.asarray(out), times, stateful


PROG = "python -m sparge_jax.tools.sample"
CPU_COST = """cost of the defaults: 50 steps x 2 passes (guidance) at 21x60x104 latents = 32,760 tokens; for
the 1.3B model that is roughly 3e16 FLOPs, i.e. hours to days on a CPU. For a quick check on a CPU
use a small checkpoint (`sparge-convert --init tiny DIR`) and e.g. --latent-shape 3 8 16 --steps 4."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=CPU_COST,
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="converted checkpoint dir (config.json + params/), or a folder holding it as transformer/")
    p.add_argument("--context", default=None, help="text embeddings .npy / .safetensors (default: none; give --context or --prompt)")
    p.add_argument("--context-key", default=None, help="tensor name inside a .safetensors file (default: its only tensor)")
    p.add_argument("--negative-context", default=None,
                   help="negative-prompt embeddings (default: zeros of the context's shape)")
    p.add_argument("--out", required=True, help="output: .npy of the latents, or a video (.mp4, ...) decoded by the VAE")
    p.add_argument("--latent-shape", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                   help="latent frames, height, width (default 21 60 104: 480p 81 frames; costly on a CPU, see below)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--solver", choices=SOLVERS, default="unipc", help="ODE solver")
    p.add_argument("--shift", type=float, default=5.0, help="sigma schedule shift")
    p.add_argument("--guidance", type=float, default=5.0,
                   help="classifier-free guidance scale (1: conditional pass only, half the cost)")
    p.add_argument("--dense-steps", type=int, default=0, help="first steps run with dense attention")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="compute dtype of the model (default: the stored params' dtype)")
    p.add_argument("--topk", type=float, default=None, help="override the checkpoint's sparse topk (default: keep it)")
    p.add_argument("--topp", type=float, default=None, help="override the checkpoint's sparse topp (default: keep it)")
    p.add_argument("--method", default=None,
                   help="mask provider of the sparse steps instead of the checkpoint's: a kind (sparge2, spargeattn, "
                        "svg, radial, svg2) with default settings, or a JSON object of a sparge_jax.method_config "
                        "config, e.g. '{\"kind\": \"radial\", \"decay\": 0.01}' (default: the checkpoint's)")
    p.add_argument("--compare-dense", action="store_true", help="also run all-dense and report the difference")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="split the tokens over N devices (Ulysses context parallelism; num_heads and the token "
                        "count must divide by N)")
    p.add_argument("--scan-layers", action="store_true",
                   help="scan runs of alike DiT blocks (WanConfig.scan_layers: shorter compiles, same values)")
    p.add_argument("--residual-dtype", choices=tuple(DTYPES), default="float32",
                   help="dtype the DiT's residual stream is stored in: float32 as Wan2.1 (default), bfloat16 as "
                        "diffusers' bf16 pipeline (half the bytes of every norm and residual add; docs/wan.md)")
    p.add_argument("--triton-gemm", action="store_true",
                   help="compile the model call with XLA's Triton GEMMs, XLA's own default, instead of cuBLASLt "
                        "GEMMs with fused epilogues (GPU only; sparge_jax.compile_options)")
    text_to_video.add_arguments(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1; got {args.steps}")
    if not 1 <= args.context_parallel <= len(jax.devices()):
        p.error(f"--context-parallel must lie in [1, {len(jax.devices())}] (the visible devices); "
                f"got {args.context_parallel}")
    if not Path(args.out).resolve().parent.is_dir():
        p.error(f"--out: the directory {Path(args.out).resolve().parent} does not exist")
    if args.dense_steps < 0 or args.dense_steps > args.steps:
        p.error(f"--dense-steps must lie in [0, --steps]; got {args.dense_steps}")
    text_to_video.check_args(p, args)
    return args


SAMPLER_KINDS = ("sparge2", "spargeattn", "svg", "radial", "svg2")


def parse_method(text: str, num_layers: int):
    """`--method`: a method kind or a JSON object -> a `sparge_jax.method_config` config. SLA
    (anywhere inside it) is refused: a converted checkpoint holds no linear-branch projection."""
    from sparge_jax.config_builder import build_config
    from sparge_jax.method_config import Method
    from sparge_jax.methods import uses_sla

    try:
        fields = json.loads(text) if text.lstrip().startswith("{") else {"kind": text}
    except json.JSONDecodeError as error:
        raise ValueError(f"--method must be a method kind or a JSON object; got {text!r} ({error})") from None
    try:
        method = build_config(Method, fields, where="method")
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"--method {text!r}: {error} (kinds the sampler runs: {', '.join(SAMPLER_KINDS)})") from None
    if any(uses_sla(method, layer) for layer in range(num_layers)):
        raise ValueError(f"--method {text!r}: SLA needs its learnable linear-branch projection, which a converted "
                         f"checkpoint does not hold; the sampler runs {', '.join(SAMPLER_KINDS)}")
    return method


def measured_steps(steps: int, dense_steps: int, count: int = 3) -> list[int]:
    """Up to `count` sparse steps spread over the run (first, middle, last) where the achieved
    sparsity is measured."""
    sparse = range(dense_steps, steps)
    if not sparse:
        return []
    n = min(count, len(sparse))
    return sorted({sparse[round(j * (len(sparse) - 1) / max(n - 1, 1))] for j in range(n)})


def achieved_sparsity(model, record: dict, grid, steps: int, dense_steps: int) -> dict:
    """Block sparsity the sampling run achieved: masks recomputed from the q/k/v the model sees at
    the recorded sparse steps' inputs (with the providers' state of that step). Dense layers and
    dense steps count as 0. Returns {"block_sparsity": over the run, "block_sparsity_sparse_steps":
    over the sparse steps, "layer_block_sparsity": [per layer, over the run], "sparsity_steps":
    the steps measured}."""
    from sparge_jax.tools.capture import capture_qkv, sparsity_reduction

    config = model.config
    sparse_layers = [i for i in range(config.num_layers) if i not in config.dense_layers]

    @nnx.jit
    def measure(model, x, t, ctx, state):
        """{"L<i>": skipped fraction} of the sparse layers, each reduced inside one compiled forward."""
        reduce = sparsity_reduction(config.sparse, grid, config.dense_layers, states=state)
        return capture_qkv(model, x, t, ctx, layers=sparse_layers, reduce=reduce)

    per_layer = np.zeros(config.num_layers)
    for x, t, ctx, state in record.values():
        for name, value in measure(model, x, t, ctx, state).items():
            per_layer[int(name[1:])] += float(value) / len(record)
    sparse_share = (steps - dense_steps) / steps
    return {"block_sparsity": float(per_layer.mean() * sparse_share),
            "block_sparsity_sparse_steps": float(per_layer.mean()),
            "layer_block_sparsity": [float(v * sparse_share) for v in per_layer],
            "sparsity_steps": sorted(record)}


def method_label(sparse) -> str:
    """How the sparse steps choose blocks: the provider config, or the SpargeAttention2 rule."""
    method = sparse.method
    return f"sparge2 rule (topk={method.topk}, topp={method.topp})" if isinstance(method, Sparge2Method) else str(method)


def nothing_skipped_reason(config, grid, steps: int, dense_steps: int) -> str:
    """Why a run's sparse attention kept every block, in words."""
    sparse = config.sparse
    kernel = sparse.kernel
    tokens = int(np.prod(grid))
    if dense_steps == steps:
        return "every step is dense (--dense-steps equals --steps)"
    if len(config.dense_layers) == config.num_layers:
        return "every layer is listed in the checkpoint's dense_layers"
    if tokens <= kernel.block_k or tokens <= kernel.block_q:
        return (f"the sequence ({tokens} tokens, grid {tuple(grid)}) fits in one block (block_q {kernel.block_q}, "
                f"block_k {kernel.block_k}); use a larger --latent-shape")
    return (f"the method's settings ({method_label(sparse)}) keep every block at this size ({tokens} tokens, "
            f"{-(-tokens // kernel.block_q)}x{-(-tokens // kernel.block_k)} blocks); use a larger --latent-shape "
            f"or a sparser --method / --topk")


def loaded_line(checkpoint: str, model, compute_dtype: str | None) -> str:
    """The confirmation of what was loaded: path, preset, stored dtype, parameter count, and the
    mask provider of the sparse steps."""
    from sparge_jax.models import preset_of

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    stored = str(leaves[0].dtype)
    preset = preset_of(model.config)
    sparse = model.config.sparse
    return (f"loaded weights from {Path(checkpoint).resolve()}: preset {preset or 'none (an architecture of its own)'}"
            f", {sum(x.size for x in leaves):,} parameters in {stored}, computing in {compute_dtype or stored}; "
            f"sparse steps use {method_label(sparse)}, blocks {sparse.kernel.block_q}x{sparse.kernel.block_k}")


def read_t2v_config(checkpoint: str, latent_shape, *, runs: str):
    """(stored `WanConfig`, token grid) of `--checkpoint` (a text-to-video model) for latents of
    `--latent-shape`; a ValueError naming the option otherwise. runs: the command, for the
    message ("this sampler is")."""
    from sparge_jax.models import read_wan_config

    try:
        stored = read_wan_config(checkpoint)
    except ValueError as error:
        raise ValueError(f"--checkpoint: {error}") from None
    if stored.model_type != "t2v":
        raise ValueError(f"--checkpoint {checkpoint} holds an {stored.model_type} model; {runs} "
                         "text-to-video only: give a t2v checkpoint")
    try:
        grid = token_grid(latent_shape, stored.patch_size)
    except ValueError as error:
        raise ValueError(f"--latent-shape: {error}") from None
    return stored, grid


def read_context(path: str, key: str | None, text_dim: int) -> jax.Array:
    """The `--context` embeddings `(1, text_len, text_dim)`; a ValueError naming the option."""
    context = jnp.asarray(read_embeddings("--context", path, key))
    if context.shape[-1] != text_dim:
        raise ValueError(f"--context must have text_dim {text_dim} channels; got shape {context.shape}")
    return context


def main(argv=None) -> dict:
    """Run the CLI; returns the summary it prints (as a dict)."""
    from sparge_jax.models import load_wan

    args = parse_args(argv)
    stored, grid = read_t2v_config(args.checkpoint, args.latent_shape, runs="this sampler is")
    overrides = {name: getattr(args, name) for name in ("topk", "topp") if getattr(args, name) is not None}
    if args.method is not None:
        overrides["method"] = parse_method(args.method, stored.num_layers)
    try:
        sparse = stored.sparse.replace(**overrides)
    except ValueError as error:
        raise ValueError(f"--topk / --topp: {error}") from None
    if args.prompt is not None:
        context, negative = map(jnp.asarray, text_to_video.encode_prompts(args, stored))
    else:
        context = read_context(args.context, args.context_key, stored.text_dim)
        negative = (jnp.asarray(read_embeddings("--negative-context", args.negative_context)) if args.negative_context
                    else jnp.zeros_like(context))
    decoder = text_to_video.VideoDecoder(args, stored) if text_to_video.is_video_path(args.out) else None
    if negative.shape != context.shape:
        raise ValueError(f"--negative-context must have the context's shape {context.shape}; got {negative.shape}")
    model = load_wan(args.checkpoint, dtype=None if args.dtype is None else DTYPES[args.dtype], sparse=sparse,
                     scan_layers=args.scan_layers, residual_dtype=DTYPES[args.residual_dtype])
    config = model.config
    print(loaded_line(args.checkpoint, model, args.dtype))
    noise = jax.random.normal(jax.random.key(args.seed), (1, *args.latent_shape, config.out_dim), jnp.float32)
    # Committed to the device from the start, as the solver's results are from step 1 on: the
    # jitted model call would otherwise compile again at step 1 (its inputs' placement changed).
    mesh = context_mesh(args.context_parallel)
    place = jax.devices()[0] if mesh is None else NamedSharding(mesh, PartitionSpec())
    noise, context, negative = jax.device_put((noise, context, negative), place)
    sigmas = shifted_sigmas(args.steps, args.shift)
    velocity = velocity_fn(model, mesh, triton_gemm=args.triton_gemm)
    kwargs = dict(solver=args.solver, guidance=args.guidance, dense_steps=args.dense_steps)
    record = dict.fromkeys(measured_steps(args.steps, args.dense_steps))
    latents, times, stateful = run_sampler(velocity, noise, context, negative, sigmas, record=record, **kwargs)
    out = Path(args.out)
    if decoder is None:
        np.save(out, latents)
        print(f"wrote latents {latents.shape} {latents.dtype} to {out.resolve()}")
    else:
        frames = decoder.write(out, latents)
    # Compiled: the first step, the first sparse step, and (when the providers carry state,
    # which changes the call's inputs) the second sparse step.
    compiled = {0, args.dense_steps} | ({args.dense_steps + 1} if stateful else set())
    for i, t in enumerate(times):
        mode = "dense" if i < args.dense_steps else "sparse"
        print(f"step {i:3d} ({mode}): {t * 1000:.1f} ms" + (" (includes compilation)" if i in compiled else ""))
    summary = {"out": str(out), "steps": args.steps, "solver": args.solver,
               "mean_step_s": float(np.mean(times[max(compiled) + 1:] or times))}
    if mesh is not None:  # the sparsity is measured on one device, where the model's weights are
        record = jax.device_put(record, jax.devices()[0])
    summary.update(achieved_sparsity(model, record, grid, args.steps, args.dense_steps))
    print(f"achieved block sparsity {100 * summary['block_sparsity']:.1f} % over the run "
          f"({100 * summary['block_sparsity_sparse_steps']:.1f} % in the sparse steps, measured at steps "
          f"{summary['sparsity_steps']}; dense steps {args.dense_steps}, dense layers {list(config.dense_layers)})")
    print("per layer: " + ", ".join(f"L{i} {100 * v:.1f} %" for i, v in enumerate(summary["layer_block_sparsity"])))
    if summary["block_sparsity"] == 0:
        print(f"warning: no block was skipped, the sample is dense attention: "
              f"{nothing_skipped_reason(config, grid, args.steps, args.dense_steps)}", file=sys.stderr)
    if args.compare_dense:
        dense, dense_times, _ = run_sampler(velocity, noise, context, negative, sigmas, all_dense=True, **kwargs)
        if decoder is None:
            dense_path = out.with_name(out.stem + "_dense.npy")
            np.save(dense_path, dense)
            print(f"wrote the all-dense latents to {dense_path.resolve()}")
            summary.update(dense_out=str(dense_path))
        else:
            summary.update(decoder.compare(out, frames, dense))
        summary.update(mean_dense_step_s=float(np.mean(dense_times[1:] or dense_times)),
                       psnr_db=psnr(latents, dense), rel_l2=rel_l2(latents, dense))
    print(json.dumps(summary))
    return summary


def cli(argv=None) -> None:
    """The command line: user errors are one line on stderr and exit status 2."""
    exit_on_user_error(PROG, main, argv)


if __name__ == "__main__":
    cli()
