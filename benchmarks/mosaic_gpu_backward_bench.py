"""Split against fused Mosaic GPU block-sparse backward, the automatic choice between them,
and fwd+bwd against cuDNN (H100/H200).

Per N (B=1, bf16, D=128; masks keep a fixed number of k blocks per q-block row):
  * the sweep (first table): the backward with the split kernels (dQ and dK/dV), with the
    fused dQ/dK/dV kernel (`flash_backward.backward(..., fused=True)`) and with the default
    `fused=None` ("auto", `flash_backward.auto_fused`: fused where a head's fp32 dQ slice fits,
    else a `lax.cond` on the mask's kept density),
    on uniformly random masks at each `--sweep` sparsity and on band masks (each row keeps the
    k blocks around its diagonal, video attention's locality) at each `--band` sparsity: where
    fused overtakes split, and whether auto runs the faster one;
  * the last table, random masks at each `--sparsity`: also the dQ and dK/dV kernels alone, our
    forward+backward with each backward, cuDNN dense backward (the `jax.vjp` function of
    `jax.nn.dot_product_attention(implementation="cudnn")`) and forward+backward, and the
    largest |fused - split| of dq, dk, dv on the same inputs, next to the largest |split| of each.
Backward times include the delta/lse precompute, on the residuals of our forward. Times:
`bench_timing.median_time` (median of 10 repeats after warm-up). Each function is compiled
once per N: the masks are arguments. With --check, the three paths are first compared with the
reference's vjp (relative L2) at small shapes; --interpret runs only those checks, smaller, on
CPU through interpret mode.

Usage (repository root): PYTHONPATH=.:benchmarks python benchmarks/mosaic_gpu_backward_bench.py
    [--seq 32760 75600] [--sweep 0 0.5 0.75 0.9 0.95] [--band 0.95] [--sparsity 0 0.95]
    [--heads 12] [--check] [--interpret]
`--sweep`, `--band` or `--sparsity` with no values skips that part. The table is printed last.
Runtime of the defaults with --check on an H200, estimated from the H200 times of the last
table: ~35 s of timed calls (each timing is 12 calls, or 10 x 20 ms below 20 ms: 18 backward
and 10 other timings per N, the N=75600 ones ~27 s), plus 46 Mosaic GPU kernel compilations
(the earlier version, which compiled per row, had 53) and start-up: about 2 minutes.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from bench_timing import median_time

from pallas_kernels.block_index import mask_to_block_index
from pallas_kernels.blocks import default_sm_scale, num_blocks
from pallas_kernels.mosaic_gpu import flash_backward as mgb
from pallas_kernels.mosaic_gpu import forward
from pallas_kernels.reference import reference_attention_with_lse
from sparge_jax.tools.compare import rel_l2

BLOCK_Q, BLOCK_K = 128, 64
KW = dict(block_q=BLOCK_Q, block_k=BLOCK_K)
CHECKS = [(1000, 776, 2, 128, jnp.bfloat16), (1000, 776, 2, 64, jnp.float16), (4096, 4096, 4, 128, jnp.bfloat16)]
INTERPRET_CHECKS = [(197, 131, 1, 128, jnp.bfloat16), (176, 200, 1, 64, jnp.float16)]
PATHS = {"split": False, "fused": True, "auto": None}  # backward(fused=...) of each path


def fixed_density_mask(key, batch, heads, nq, nk, kept):
    """Bool `(batch, heads, nq, nk)` keeping exactly `kept` random k blocks per row."""
    ranks = jnp.argsort(jax.random.uniform(key, (batch, heads, nq, nk)), axis=-1)
    return ranks < kept


def band_mask(batch, heads, nq, nk, kept):
    """Bool `(batch, heads, nq, nk)`: row i keeps the `kept` k blocks centred on its diagonal
    (the window shifted inside the sequence at its ends), so neighbouring rows, and the q lists
    of neighbouring k blocks, overlap."""
    centre = (jnp.arange(nq) * BLOCK_Q + BLOCK_Q // 2) // BLOCK_K
    start = jnp.clip(centre - kept // 2, 0, nk - kept)[:, None]
    cols = jnp.arange(nk)
    return jnp.broadcast_to((cols >= start) & (cols < start + kept), (batch, heads, nq, nk))


def inputs(key, batch, seq_q, seq_k, heads, head_dim, dtype):
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (batch, seq_q, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, seq_k, heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, seq_k, heads, head_dim), dtype)
    dout = jax.random.normal(kd, (batch, seq_q, heads, head_dim), dtype)
    return q, k, v, dout


def max_abs(x):
    return float(jnp.abs(x.astype(jnp.float32)).max())


def check(seq_q, seq_k, heads, head_dim, dtype, density, seed, interpret):
    """{fused: relative L2 errors of (dq, dk, dv) against the reference's vjp}."""
    key = jax.random.key(seed)
    q, k, v, dout = inputs(key, 1, seq_q, seq_k, heads, head_dim, dtype)
    nq, nk = num_blocks(seq_q, BLOCK_Q), num_blocks(seq_k, BLOCK_K)
    mask = jax.random.uniform(jax.random.fold_in(key, 1), (1, heads, nq, nk)) < density
    mask = mask.at[:, :, 0].set(False).at[:, :, -1].set(True)
    out, lse = reference_attention_with_lse(q, k, v, mask)
    f32 = lambda x: x.astype(jnp.float32)
    ref_fn = lambda q, k, v: reference_attention_with_lse(f32(q), f32(k), f32(v), mask)[0]
    ref = jax.vjp(ref_fn, q, k, v)[1](f32(dout))
    index = mask_to_block_index(mask)
    errors = {}
    for name, fused in PATHS.items():
        got = jax.jit(lambda *a: mgb.backward(*a, sm_scale=default_sm_scale(head_dim), interpret=interpret,
                                              fused=fused, **KW))(q, k, v, out, lse, dout, index)
        errors[name] = [rel_l2(g, r) for g, r in zip(got, ref)]
    return errors


def seq_rows(seq, heads, sweep, band, full, head_dim=128, dtype=jnp.bfloat16, seed=0):
    """The rows (dicts, times in seconds) of one N: one per random mask at each sparsity of
    `sweep` and `full` and per band mask at each of `band`, each with the three backward paths
    and auto's pick; the random ones at `full` sparsities also with the last table's columns."""
    key = jax.random.key(seed)
    q, k, v, dout = inputs(key, 1, seq, seq, heads, head_dim, dtype)
    nq, nk = num_blocks(seq, BLOCK_Q), num_blocks(seq, BLOCK_K)
    scale = default_sm_scale(head_dim)
    fwd = jax.jit(lambda q, k, v, i: forward(q, k, v, i, sm_scale=scale, **KW))
    bwds = {name: jax.jit(functools.partial(mgb.backward, sm_scale=scale, fused=fused, **KW))
            for name, fused in PATHS.items()}
    fwd_bwds = {name: jax.jit(lambda q, k, v, do, i, bwd=bwds[name]: bwd(q, k, v, *fwd(q, k, v, i), do, i))
                for name in ("split", "fused")}
    side_in = mgb.side_inputs(q, k, v, dout, BLOCK_Q, BLOCK_K)
    kernel_kw = dict(KW, sm_scale=scale, interpret=False)
    kernels = {name: jax.jit(lambda *a, kernel=kernel: kernel(*a, side_in, **kernel_kw))
               for name, kernel in (("dq", mgb._dq), ("dkv", mgb._dkv))}
    row_terms = jax.jit(lambda o, d, l: mgb._row_terms(o, d, l, nq * BLOCK_Q))
    cudnn = cudnn_times(seq, heads, head_dim, dtype, seed) if full else None
    rows = []
    cases = [("random", sp) for sp in sorted(set(sweep) | set(full))] + [("band", sp) for sp in band]
    for kind, sparsity in cases:
        kept = max(1, round(nk * (1 - sparsity)))
        if kind == "random":
            mask = fixed_density_mask(jax.random.fold_in(key, 1), 1, heads, nq, nk, kept)
        else:
            mask = band_mask(1, heads, nq, nk, kept)
        index = mask_to_block_index(mask)
        out, lse = fwd(q, k, v, index)
        args = (q, k, v, out, lse, dout, index)
        row = dict(N=seq, mask=kind, sparsity=sparsity, kept=kept,
                   auto_fused=bool(mgb.auto_fused(seq, head_dim, index)))
        for name, bwd in bwds.items():
            row[f"{name}_bwd"] = median_time(bwd, *args)
        if kind == "random" and sparsity in full:
            for name, fn in fwd_bwds.items():
                row[f"{name}_fb"] = median_time(fn, q, k, v, dout, index)
            lse2, delta = row_terms(out, dout, lse)
            for name, fn in kernels.items():
                row[name] = median_time(fn, q, k, v, dout, lse2, delta, index)
            row["cudnn_bwd"], row["cudnn_fb"] = cudnn
            grads = {name: bwds[name](*args) for name in ("split", "fused")}
            for i, name in enumerate(("dq", "dk", "dv")):
                diff = grads["fused"][i].astype(jnp.float32) - grads["split"][i].astype(jnp.float32)
                row[f"{name}_diff"], row[f"{name}_max"] = max_abs(diff), max_abs(grads["split"][i])
        rows.append(row)
        print(row, flush=True)
    return rows


def cudnn_times(seq, heads, head_dim, dtype, seed=0):
    """Seconds of cuDNN dense attention: (backward alone, forward+backward)."""
    q, k, v, dout = inputs(jax.random.key(seed), 1, seq, seq, heads, head_dim, dtype)
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=default_sm_scale(head_dim),
                                                         implementation="cudnn")
    vjp_fn = jax.jit(lambda q, k, v: jax.vjp(dense, q, k, v)[1])(q, k, v)
    t_bwd = median_time(jax.jit(lambda fn, d: fn(d)), vjp_fn, dout)
    t_fb = median_time(jax.jit(lambda q, k, v, d: jax.vjp(dense, q, k, v)[1](d)), q, k, v, dout)
    return t_bwd, t_fb


def sweep_table(rows) -> str:
    """Every row: the three backward paths, auto's pick and its time over the faster path's."""
    lines = [
        "| N | mask | sparsity | kept k blocks / row | split bwd ms | fused bwd ms | fused speed-up | auto bwd ms "
        "| auto runs | auto / faster |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split, fused, auto = (r[f"{name}_bwd"] for name in PATHS)
        lines.append(
            f"| {r['N']} | {r['mask']} | {r['sparsity']:.2f} | {r['kept']} | {split * 1e3:.3f} | {fused * 1e3:.3f} "
            f"| {split / fused:.3f}x | {auto * 1e3:.3f} | {'fused' if r['auto_fused'] else 'split'} "
            f"| {auto / min(split, fused):.3f} |"
        )
    return "\n".join(lines)


def table(rows) -> str:
    lines = [
        "| N | sparsity | split bwd ms (dQ / dK-dV kernels) | fused bwd ms | fused speed-up | cuDNN bwd ms "
        "| split fwd+bwd ms (x cuDNN) | fused fwd+bwd ms (x cuDNN) | cuDNN fwd+bwd ms "
        "| max abs fused-split dq / dk / dv (max abs split) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = {key: r[key] * 1e3 for key in ("split_bwd", "dq", "dkv", "fused_bwd", "cudnn_bwd", "split_fb",
                                            "fused_fb", "cudnn_fb")}
        diffs = " / ".join(f"{r[n + '_diff']:.2e} ({r[n + '_max']:.2g})" for n in ("dq", "dk", "dv"))
        lines.append(
            f"| {r['N']} | {r['sparsity']:.2f} | {ms['split_bwd']:.3f} ({ms['dq']:.3f} / {ms['dkv']:.3f}) "
            f"| {ms['fused_bwd']:.3f} | {r['split_bwd'] / r['fused_bwd']:.3f}x | {ms['cudnn_bwd']:.3f} "
            f"| {ms['split_fb']:.3f} ({r['cudnn_fb'] / r['split_fb']:.3f}x) "
            f"| {ms['fused_fb']:.3f} ({r['cudnn_fb'] / r['fused_fb']:.3f}x) | {ms['cudnn_fb']:.3f} | {diffs} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[32760, 75600])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.0, 0.5, 0.75, 0.9, 0.95],
                        help="sparsities of the random masks of the sweep (none: no sweep rows of their own)")
    parser.add_argument("--band", type=float, nargs="*", default=[0.95],
                        help="sparsities of the band (diagonal window) masks of the sweep (none: no band masks)")
    parser.add_argument("--sparsity", type=float, nargs="*", default=[0.0, 0.95],
                        help="sparsities of the random masks of the last table (none: no last table, no cuDNN)")
    parser.add_argument("--check", action="store_true", help="first compare the three paths with the reference")
    parser.add_argument("--interpret", action="store_true", help="only the checks, small, in interpret mode (CPU)")
    args = parser.parse_args(argv)
    print(jax.devices()[0].device_kind)
    if args.check or args.interpret:
        for seq_q, seq_k, heads, d, dtype in INTERPRET_CHECKS if args.interpret else CHECKS:
            errors = check(seq_q, seq_k, heads, d, dtype, 0.5, seed=seq_q + d, interpret=args.interpret)
            for name, errs in errors.items():
                print(f"check {name} sq={seq_q} sk={seq_k} h={heads} d={d} "
                      f"{jnp.dtype(dtype).name}: dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e}", flush=True)
    if args.interpret:
        return
    rows = [row for seq in args.seq for row in seq_rows(seq, args.heads, args.sweep, args.band, args.sparsity)]
    setup = f"B=1, H={args.heads}, D=128, bf16, mask blocks q {BLOCK_Q} x k {BLOCK_K}"
    print(f"\n{setup}; auto runs fused where a head's fp32 dQ slice is at most {mgb.FUSED_DQ_SLICE_BYTES >> 20} MiB, "
          f"else from kept density {mgb.FUSED_MIN_DENSITY} (flash_backward.FUSED_DQ_SLICE_BYTES, FUSED_MIN_DENSITY); "
          "fused speed-up: split / fused time; auto / faster: auto's time over the faster path's\n" + sweep_table(rows))
    full = [r for r in rows if "cudnn_bwd" in r]
    if full:
        print(f"\n{setup}; speed-ups: split / fused time, cuDNN / ours\n" + table(full))


if __name__ == "__main__":
    main()
