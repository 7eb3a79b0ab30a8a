"""Render block masks, pooled attention maps and a sparsity-vs-error chart to PNG (matplotlib:
the `plots` extra).

    python -m sparge_jax.tools.pictures --out docs/images [--qkv captured.npz]
    python -m sparge_jax.tools.pictures --out pics --checkpoint ckpt/ --context prompt.npy \
        --latent-shape 21 60 104 --timestep 800 --layers 0 15 29 [--save-qkv qkv.npz]

`--qkv` takes an .npz holding `q_<layer>`, `k_<layer>`, `v_<layer>` arrays
`(batch, seq, heads, head_dim)` and the token `grid` they were captured on (files without
it need `--grid`); `--checkpoint` captures them from a converted Wan model on
noise latents at `--timestep` (`sparge_jax.tools.capture`); otherwise two layers of
`video_like_qkv` are used. Writes masks.png (layer x method rows, head columns),
pooled.png (pooled attention per layer/head), sparsity_error.png, lists them, and prints
the points.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparge_jax.cli import HelpFormatter, exit_on_user_error
from sparge_jax.tools.compare import SWEEPS, method_config, method_point, sweep, video_like_qkv
from sparge_jax.config import KernelConfig
from sparge_jax.masks import pooled_scores
from sparge_jax.tools.viz import heat_grid, line_chart, mask_codes, mask_grid, require_matplotlib, save_png

PROG = "python -m sparge_jax.tools.pictures"
PICTURES = ("masks.png", "pooled.png", "sparsity_error.png")

# the knob value of each method drawn in masks.png (mid-range sparsity)
MASK_KNOBS = {"SpargeAttention2": 0.1, "SpargeAttn": 0.85, "SLA": 0.1, "SVG": 1.0, "Radial": 0.25, "SVG2": 0.85}


SYNTHETIC_GRID = (7, 12, 18)


def load_layers(path: str | None, grid, heads: int, head_dim: int, seed: int) -> tuple[dict[str, tuple], tuple]:
    """({layer name: (q, k, v)}, token grid) from an .npz of `q_<layer>`/`k_<layer>`/`v_<layer>`
    (and the `grid` it was captured on, if stored), or synthetic layers. grid: None takes the
    stored grid (synthetic layers: `SYNTHETIC_GRID`); given, it must match the stored one."""
    if path is None:
        grid = SYNTHETIC_GRID if grid is None else tuple(grid)
        return {f"L{i}": video_like_qkv(grid, heads, head_dim, key=jax.random.key(seed + i)) for i in range(2)}, grid
    try:
        data = np.load(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"--qkv: {error}") from None
    names = sorted({m.group(1) for m in (re.fullmatch(r"q_(.+)", n) for n in data.files) if m})
    if not names:
        raise ValueError(f"--qkv {path} holds no q_<layer> arrays; got {data.files}")
    missing = [f"{p}_{n}" for n in names for p in "kv" if f"{p}_{n}" not in data.files]
    if missing:
        raise ValueError(f"--qkv {path} lacks {missing}")
    layers = {n: tuple(jnp.asarray(data[f"{p}_{n}"], jnp.float32) for p in "qkv") for n in names}
    stored = tuple(int(n) for n in data["grid"]) if "grid" in data.files else None
    if grid is None and stored is None:
        raise ValueError(f"--qkv {path} stores no token grid (written before grids were stored): give --grid F H W")
    if grid is not None and stored is not None and tuple(grid) != stored:
        raise ValueError(f"--grid {tuple(grid)} differs from the grid {stored} stored in --qkv {path}; leave --grid out")
    grid = stored if grid is None else tuple(grid)
    seq = next(iter(layers.values()))[0].shape[1]
    if int(np.prod(grid)) != seq:
        raise ValueError(f"--grid {tuple(grid)} holds {int(np.prod(grid))} tokens but the --qkv arrays have {seq}; "
                         "give the token grid they were captured on")
    return layers, grid


def original_order_mask(plan, batch: int, head: int, seq_q: int, seq_k: int, block_q: int, block_k: int) -> np.ndarray:
    """Bool `(q_blocks, k_blocks)` of the plan's mask as seen in the original token order (a block
    pair is set when any of its token pairs is computed exactly)."""
    slot_q = np.argsort(np.asarray(plan.q_order[batch, head])) if plan.q_order is not None else np.arange(seq_q)
    slot_k = np.argsort(np.asarray(plan.k_order[batch, head])) if plan.k_order is not None else np.arange(seq_k)
    tokens = np.asarray(plan.mask[batch, head])[slot_q[:, None] // block_q, slot_k[None, :] // block_k]
    nq, nk = -(-seq_q // block_q), -(-seq_k // block_k)
    padded = np.pad(tokens, ((0, nq * block_q - seq_q), (0, nk * block_k - seq_k)))
    return padded.reshape(nq, block_q, nk, block_k).any(axis=(1, 3))


def render(layers: dict, grid, config: KernelConfig, out: Path, *, methods=None, progress: bool = False) -> list:
    """Write the three PNGs into `out`; returns the sweep points of the first layer.

    methods: names of `SWEEPS` to draw (all by default). progress: a progress bar on stderr. SVG2 masks are drawn in its
    clustered token order (the order the kernel runs), the others in the original order.
    """
    methods = list(methods or SWEEPS)
    out.mkdir(parents=True, exist_ok=True)
    rows, labels, pooled_rows, pooled_labels = [], [], [], []
    bar = tqdm(total=len(layers) * len(methods) + 1, desc="pictures", unit="mask", disable=not progress)
    for lname, (q, k, v) in layers.items():
        heads = q.shape[2]
        for mname in methods:
            bar.update()
            sparsity, error, plan = method_point(q, k, v, method_config(mname, MASK_KNOBS[mname], config, q.shape[1]),
                                                 grid=grid, key=jax.random.key(0))
            if mname == "SVG2":
                mask = np.asarray(plan.mask[0])
            else:
                mask = np.stack([original_order_mask(plan, 0, h, q.shape[1], k.shape[1], config.block_q,
                                                     config.block_k) for h in range(heads)])
            linear = None if plan.linear_mask is None else np.asarray(plan.linear_mask[0])  # SLA's linear blocks
            rows.append([mask_codes(mask[h], None if linear is None else linear[h]) for h in range(heads)])
            labels.append(f"{lname} {mname}{' (clustered)' if mname == 'SVG2' else ''}\n{100 * sparsity:.0f}% skipped")
        scores = np.asarray(pooled_scores(q, k, block_q=config.block_q, block_k=config.block_k)[0])
        pooled_rows.append(list(scores))
        pooled_labels.append(lname)
    cols = [f"head {h}" for h in range(heads)]
    save_png(mask_grid(rows, labels, cols, title="Block masks in token order (SVG2 in its clustered order)"),
             out / "masks.png")
    save_png(heat_grid(pooled_rows, pooled_labels, cols, title="Pooled attention softmax(pool(Q) pool(K)^T)",
                       label="relative to each map's maximum (log)"), out / "pooled.png")
    q, k, v = next(iter(layers.values()))
    bar.set_postfix_str("sparsity-vs-error sweep")
    points = sweep(q, k, v, config, grid=grid, methods=methods, key=jax.random.key(0))
    series = {}
    for p in points:
        xs, ys = series.setdefault(p.method, ([], []))
        xs.append(p.sparsity)
        ys.append(p.error)
    for xs, ys in series.values():
        order = np.argsort(xs)
        xs[:], ys[:] = list(np.asarray(xs)[order]), list(np.asarray(ys)[order])
    chart = line_chart(series, x_label="block sparsity (fraction of blocks skipped)",
                       y_label="relative L2 error vs dense attention", title="Sparsity vs error, same Q/K/V",
                       y_range=(0.0, min(1.0, max(p.error for p in points) * 1.05)))
    save_png(chart, out / "sparsity_error.png")
    bar.update()
    bar.close()
    return points


def capture_from_checkpoint(args) -> tuple[dict, tuple[int, int, int]]:
    """Layers' Q/K/V of a converted Wan model on seeded noise latents, and the token grid."""
    from sparge_jax.tools.capture import capture_qkv, save_qkv
    from sparge_jax.models import load_wan
    from sparge_jax.tools.sample import read_context, read_t2v_config

    if args.context is None:
        raise ValueError("--checkpoint needs --context (text embeddings .npy / .safetensors)")
    config, grid = read_t2v_config(args.checkpoint, args.latent_shape, runs="the capture runs")
    bad = [i for i in args.layers or () if not 0 <= i < config.num_layers]
    if bad:
        raise ValueError(f"--layers must be block indices in [0, {config.num_layers}); got {bad}")
    context = read_context(args.context, None, config.text_dim)
    model = load_wan(args.checkpoint)
    latents = jax.random.normal(jax.random.key(args.seed), (1, *args.latent_shape, model.config.in_dim))
    layers = None if args.layers is None else tuple(args.layers)
    captured = nnx.jit(capture_qkv, static_argnames="layers")(  # one compiled forward, not op by op
        model, latents, jnp.full((1,), args.timestep, jnp.float32), context, layers=layers)
    if args.save_qkv:
        save_qkv(args.save_qkv, captured, grid)
    layers = {name: tuple(x.astype(jnp.float32) for x in qkv) for name, qkv in captured.items()}
    return layers, grid


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", default="docs/images", help="directory to write the PNGs into")
    parser.add_argument("--qkv", default=None,
                        help=".npz with q_<layer>, k_<layer>, v_<layer> arrays (default: synthetic video-like layers)")
    parser.add_argument("--grid", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                        help="token grid (frames, height, width) of the synthetic layers or of --qkv arrays without "
                             "a stored grid (default: the grid stored in --qkv, else 7 12 18)")
    parser.add_argument("--heads", type=int, default=4, help="heads of the synthetic layers")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim of the synthetic layers")
    parser.add_argument("--block-q", type=int, default=64, help="query block size (tokens)")
    parser.add_argument("--block-k", type=int, default=32, help="key block size (tokens)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic layers / the capture's noise")
    parser.add_argument("--methods", nargs="+", choices=list(SWEEPS), default=None,
                        help="methods to draw (default: all)")
    parser.add_argument("--checkpoint", default=None,
                        help="converted Wan checkpoint to capture Q/K/V from (default: none, use --qkv or synthetic)")
    parser.add_argument("--context", default=None, help="text embeddings for --checkpoint (needed with it)")
    parser.add_argument("--latent-shape", type=int, nargs=3, default=(21, 60, 104), metavar=("F", "H", "W"),
                        help="latent frames, height, width of the capture with --checkpoint (the default is the "
                             "480p size: a full forward pass of the model, slow on a CPU)")
    parser.add_argument("--timestep", type=float, default=800.0, help="model timestep in [0, 1000] for --checkpoint")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="blocks to capture with --checkpoint (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--save-qkv", default=None, help="also write the captured Q/K/V as .npz (default: no)")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_matplotlib()  # before any capture or sweep
    if args.checkpoint is not None:
        layers, grid = capture_from_checkpoint(args)
    else:
        layers, grid = load_layers(args.qkv, args.grid, args.heads, args.head_dim, args.seed)
    config = KernelConfig(block_q=args.block_q, block_k=args.block_k, backend="xla")
    out = Path(args.out)
    points = render(layers, grid, config, out, methods=args.methods, progress=not args.no_progress)
    for name in PICTURES:
        print(f"wrote {(out / name).resolve()}")
    if args.save_qkv:
        print(f"wrote {Path(args.save_qkv).resolve()} (captured q/k/v, grid {tuple(grid)})")
    print("| method | knob | sparsity | rel. L2 error |\n|---|---|---|---|")
    for p in points:
        print(f"| {p.method} | {SWEEPS[p.method][1]}={p.knob:g} | {p.sparsity:.3f} | {p.error:.4f} |")


def cli(argv=None) -> None:
    """The command line: user errors are one line on stderr and exit status 2."""
    exit_on_user_error(PROG, main, argv)


if __name__ == "__main__":
    cli()
