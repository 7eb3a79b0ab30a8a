"""Every mask provider at matched sparsity on one 1.3B-shaped layer at 480p, on a GPU.

Q/K/V: `video_like_qkv` on the 480p latent token grid (21, 30, 52) = 32760 tokens, B=1,
H=12, D=128, bf16. For each method the knob is bisected until the block sparsity of its
exact part is within 1 point of --sparsity. Per method: the plan time (mask prediction,
jitted `make_plan`; SVG2 timed with centroids passed back, as in steady-state sampling),
the attention time (`attend_plan`: permutations, block-sparse kernel, SLA's linear branch),
their sum, the cuDNN dense time, and the relative L2 error of the output against an fp32
dense reference computed in query chunks. SLA's projection is the least-squares fit
(`sparge_jax.tools.compare.fit_projection`) on a query subset; error is over all queries.
Times are medians after warm-up.

With `--qkv captured.npz --layer L<i>` (written by `python -m sparge_jax.tools.pictures --checkpoint
... --save-qkv`) the layer's captured activations replace the synthetic ones (give --grid).

The "(upstream)" rows (`--methods ... "SLA (upstream)"`, or `--upstream` for all of them) run the
upstream-compatible configurations (`<Method>.upstream(...)`, docs/methods.md) with their own
knob bisected: SpargeAttn's cdfthreshd (simthreshd1 0.3, smooth_k), SLA's topk (linear branch
over all keys), Sparse VideoGen's sparsity, Radial's decay_factor, Sparse VideoGen2's
top_p_kmeans (64 / 128 clusters, 10 initial iterations, as the SVG2 row). "SVG (upstream)"
computes Sparse VideoGen's output (its token-level band, a `TokenBand` that only the xla
kernels take: on a GPU its attention time is the xla fallback's); "SVG (upstream, blocks)"
runs the whole blocks touching that band on the default kernels (`token_band=False`).

Usage: PYTHONPATH=. python benchmarks/methods.py [--sparsity 0.85] [--reps 7] [--out methods.md]
The table is printed last and written to --out (default $OUT/methods.md when OUT is set).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.blocks import default_sm_scale, num_blocks
from sparge_jax.tools.compare import SWEEPS, fit_projection, method_config, video_like_qkv
from sparge_jax.config import KernelConfig
from sparge_jax.masks import make_plan
from sparge_jax.method_config import RadialMethod, SLAMethod, SpargeAttnMethod, SVG2Method, SVGMethod
from sparge_jax.methods import attend_plan
from sparge_jax.sla_linear import linear_block_attention

GRID_480P = (21, 30, 52)
HEADS, HEAD_DIM = 12, 128
# knob search interval per method (sparsity falls as the knob grows, except where noted)
KNOB_RANGE = {"SpargeAttention2": (0.005, 1.0), "SpargeAttn": (0.05, 1.0), "SLA": (0.005, 1.0),
              "SVG": (0.02, 10.0), "Radial": (0.002, 1.0), "SVG2": (0.05, 1.0),
              "SpargeAttn (upstream)": (0.05, 1.0), "SLA (upstream)": (0.005, 1.0),
              "SVG (upstream)": (0.001, 0.99), "SVG (upstream, blocks)": (0.001, 0.99),
              "Radial (upstream)": (0.002, 1.0), "SVG2 (upstream)": (0.05, 1.0)}
GEOMETRIC = ("SVG", "Radial", "Radial (upstream)")
# upstream-compatible configurations, by knob value and sequence length
UPSTREAM = {
    "SpargeAttn (upstream)": lambda x, seq: SpargeAttnMethod.upstream(simthreshd1=0.3, cdfthreshd=x),
    "SLA (upstream)": lambda x, seq: SLAMethod.upstream(topk=x),
    "SVG (upstream)": lambda x, seq: SVGMethod.upstream(sparsity=x),
    "SVG (upstream, blocks)": lambda x, seq: SVGMethod.upstream(sparsity=x, token_band=False),
    "Radial (upstream)": lambda x, seq: RadialMethod.upstream(decay_factor=x),
    "SVG2 (upstream)": lambda x, seq: SVG2Method.upstream(
        num_q_centroids=max(2, min(64, seq // 48)), num_k_centroids=max(2, min(128, seq // 24)), top_p_kmeans=x,
        min_kc_ratio=0.0, kmeans_iter_init=10, kmeans_iter_step=2),
}


def bench_config(name: str, knob: float, config: KernelConfig, seq: int):
    """(method config, KernelConfig) of row `name` at `knob`."""
    if name in UPSTREAM:
        return UPSTREAM[name](knob, seq), config
    return method_config(name, knob, config, seq).method, config


def median_time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def dense_reference(q, k, v, chunk: int = 2048) -> jax.Array:
    """fp32 softmax attention, computed `chunk` queries at a time."""
    scale = default_sm_scale(q.shape[-1])
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

    @jax.jit
    def rows(qc):
        s = jnp.einsum("bqhd,bkhd->bhqk", qc.astype(jnp.float32), kf) * scale
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vf)

    return jnp.concatenate([rows(q[:, i:i + chunk]) for i in range(0, q.shape[1], chunk)], axis=1)


def plan_sparsity(plan, config, seq) -> float:
    n = num_blocks(seq, config.block_q), num_blocks(seq, config.block_k)
    return 1.0 - float(jnp.mean(plan.mask[..., :n[0], :n[1]].astype(jnp.float32)))


def match_knob(name, q, k, v, config, target: float, grid, iters: int = 12):
    """Bisect the method's knob to reach `target` block sparsity; returns (method, cfg, plan, state, sparsity)."""
    lo, hi = KNOB_RANGE[name]
    best = None
    for _ in range(iters):
        mid = (lo * hi) ** 0.5 if name in GEOMETRIC else (lo + hi) / 2
        method, cfg = bench_config(name, mid, config, q.shape[1])
        plan, state = make_plan(q, k, v, method, cfg, grid=grid, key=jax.random.key(0))
        s = plan_sparsity(plan, cfg, q.shape[1])
        if best is None or abs(s - target) < abs(best[-1] - target):
            best = (method, cfg, plan, state, s)
        if abs(s - target) <= 0.01:
            break
        lo, hi = (mid, hi) if s > target else (lo, mid)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.85)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--grid", type=int, nargs=3, default=GRID_480P, metavar=("F", "H", "W"),
                        help="latent token grid (a small one for a CPU smoke run)")
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--qkv", default=None, help=".npz of captured q_<layer>/k_<layer>/v_<layer>")
    parser.add_argument("--layer", default="L0", help="layer name inside --qkv")
    parser.add_argument("--methods", nargs="+", choices=list(SWEEPS) + list(UPSTREAM), default=list(SWEEPS))
    parser.add_argument("--upstream", action="store_true", help="also run the upstream-compatible rows")
    parser.add_argument("--out", default=os.path.join(os.environ["OUT"], "methods.md") if "OUT" in os.environ else None)
    args = parser.parse_args()
    grid = tuple(args.grid)
    if args.qkv:
        data = np.load(args.qkv)
        q, k, v = (jnp.asarray(data[f"{p}_{args.layer}"], jnp.bfloat16) for p in "qkv")
    else:
        q, k, v = video_like_qkv(grid, args.heads, args.head_dim, key=jax.random.key(0), dtype=jnp.bfloat16)
    seq = q.shape[1]
    config = KernelConfig()
    dense = dense_reference(q, k, v)
    implementation = "cudnn" if jax.default_backend() == "gpu" else None
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation))
    dense_ms = 1e3 * median_time(cudnn, q, k, v, reps=args.reps)
    rows = []
    for name in args.methods + ([m for m in UPSTREAM if m not in args.methods] if args.upstream else []):
        method, cfg, plan, state, sparsity = match_knob(name, q, k, v, config, args.sparsity, grid)
        plan_fn = jax.jit(lambda q, k, v, state: make_plan(q, k, v, method, cfg, grid=grid, state=state,
                                                           key=jax.random.key(0)))
        plan_ms = 1e3 * median_time(plan_fn, q, k, v, state, reps=args.reps)
        if plan.linear_mask is None:
            attend = jax.jit(lambda q, k, v, plan: attend_plan(q, k, v, plan, cfg))
            out = attend(q, k, v, plan)
        else:
            sub = slice(0, 4096)
            sparse_plan = plan._replace(linear_mask=None)
            sparse_out = jax.jit(lambda q, k, v, p: attend_plan(q, k, v, p, cfg))(q, k, v, sparse_plan)
            linear = linear_block_attention(q, k, v, plan.linear_mask, block_q=cfg.block_q, block_k=cfg.block_k,
                                            feature_map_name=method.feature_map)
            w, b = fit_projection(sparse_out[:, sub], linear[:, sub], dense[:, sub])
            w, b = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
            attend = jax.jit(lambda q, k, v, plan: attend_plan(q, k, v, plan, cfg, feature_map_name=method.feature_map,
                                                               linear_projection=lambda x: x @ w + b))
            out = attend(q, k, v, plan)
        attn_ms = 1e3 * median_time(attend, q, k, v, plan, reps=args.reps)
        err = float(jnp.linalg.norm((out.astype(jnp.float32) - dense).ravel()) / jnp.linalg.norm(dense.ravel()))
        fields = {key: val for key, val in vars(method).items() if key != "kind"}
        rows.append((name, fields, sparsity, plan_ms, attn_ms, err))
        print(f"{name}: sparsity {sparsity:.3f} plan {plan_ms:.2f} ms attention {attn_ms:.2f} ms error {err:.4f}",
              flush=True)
    device = jax.devices()[0].device_kind
    source = f"captured {args.qkv}:{args.layer}" if args.qkv else "synthetic video_like_qkv"
    lines = [f"{source}; B={q.shape[0]}, H={q.shape[2]}, D={q.shape[3]}, N={seq} (grid {grid}), bf16, blocks 128x64, {device}; "
             f"target block sparsity {args.sparsity:.2f}; cuDNN dense forward {dense_ms:.2f} ms.", "",
             "| method | config | block sparsity | plan ms | attention ms | total ms | speed-up vs cuDNN | rel. L2 error |",
             "|---|---|---|---|---|---|---|---|"]
    for name, fields, s, p_ms, a_ms, err in rows:
        config_text = ", ".join(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
                                for key, val in fields.items())
        lines.append(f"| {name} | {config_text} | {s:.3f} | {p_ms:.2f} | {a_ms:.2f} | {p_ms + a_ms:.2f} | "
                     f"{dense_ms / (p_ms + a_ms):.2f}x | {err:.4f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
