"""Split against fused Mosaic GPU block-sparse backward, and fwd+bwd against cuDNN (H100/H200).

Per N and sparsity (masks keep a fixed number of random k blocks per q-block row; B=1,
bf16): the backward with the split kernels (dQ and dK/dV, also timed alone) and with the
fused dQ/dK/dV kernel (`flash_backward.backward(..., fused=True)`), delta/lse precompute
included, on the residuals of our forward; our forward+backward with each; cuDNN dense
backward (the `jax.vjp` function of `jax.nn.dot_product_attention(implementation="cudnn")`)
and forward+backward; and the largest |fused - split| of dq, dk, dv on the same inputs,
next to the largest |split| of each. Times: `bench_timing.median_time` (median of 10
repeats after warm-up). With --check, both paths are first compared with the reference's
vjp (relative L2) at small shapes; --interpret runs only those checks, smaller, on CPU
through interpret mode.

Usage (repository root): PYTHONPATH=.:benchmarks python benchmarks/mosaic_gpu_backward_bench.py
    [--seq 32760 75600] [--sparsity 0 0.95] [--heads 12] [--check] [--interpret]
The table is printed last.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from bench_timing import median_time

from pallas_kernels.block_index import mask_to_block_index
from pallas_kernels.blocks import default_sm_scale, num_blocks
from pallas_kernels.mosaic_gpu import flash_backward as mgb
from pallas_kernels.mosaic_gpu import forward
from pallas_kernels.reference import reference_attention_with_lse

BLOCK_Q, BLOCK_K = 128, 64
KW = dict(block_q=BLOCK_Q, block_k=BLOCK_K)
CHECKS = [(1000, 776, 2, 128, jnp.bfloat16), (1000, 776, 2, 64, jnp.float16), (4096, 4096, 4, 128, jnp.bfloat16)]
INTERPRET_CHECKS = [(197, 131, 1, 128, jnp.bfloat16), (176, 200, 1, 64, jnp.float16)]


def fixed_density_mask(key, batch, heads, nq, nk, kept):
    """Bool `(batch, heads, nq, nk)` keeping exactly `kept` random k blocks per row."""
    ranks = jnp.argsort(jax.random.uniform(key, (batch, heads, nq, nk)), axis=-1)
    return ranks < kept


def inputs(key, batch, seq_q, seq_k, heads, head_dim, dtype):
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (batch, seq_q, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, seq_k, heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, seq_k, heads, head_dim), dtype)
    dout = jax.random.normal(kd, (batch, seq_q, heads, head_dim), dtype)
    return q, k, v, dout


def rel_l2(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


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
    for fused in (False, True):
        got = jax.jit(lambda *a: mgb.backward(*a, sm_scale=default_sm_scale(head_dim), interpret=interpret,
                                              fused=fused, **KW))(q, k, v, out, lse, dout, index)
        errors[fused] = [rel_l2(g, r) for g, r in zip(got, ref)]
    return errors


def timing(seq, heads, head_dim, dtype, sparsity, cudnn, seed=0):
    """One table row (dict): times in ms and fused-vs-split differences; `cudnn`: (bwd, fwd+bwd) seconds."""
    key = jax.random.key(seed)
    q, k, v, dout = inputs(key, 1, seq, seq, heads, head_dim, dtype)
    nq, nk = num_blocks(seq, BLOCK_Q), num_blocks(seq, BLOCK_K)
    kept = max(1, round(nk * (1 - sparsity)))
    index = mask_to_block_index(fixed_density_mask(jax.random.fold_in(key, 1), 1, heads, nq, nk, kept))
    scale = default_sm_scale(head_dim)
    fwd = jax.jit(lambda q, k, v, i: forward(q, k, v, i, sm_scale=scale, **KW))
    out, lse = fwd(q, k, v, index)
    row = dict(N=seq, sparsity=sparsity, kept=kept)
    grads = {}
    for name, fused in (("split", False), ("fused", True)):
        bwd = jax.jit(lambda *a, fused=fused: mgb.backward(*a, sm_scale=scale, fused=fused, **KW))
        fwd_bwd = jax.jit(lambda q, k, v, do, i, bwd=bwd: bwd(q, k, v, *fwd(q, k, v, i), do, i))
        grads[name] = bwd(q, k, v, out, lse, dout, index)
        row[f"{name}_bwd"] = median_time(bwd, q, k, v, out, lse, dout, index)
        row[f"{name}_fb"] = median_time(fwd_bwd, q, k, v, dout, index)
    lse2, delta = jax.jit(lambda o, d, l: mgb._row_terms(o, d, l, nq * BLOCK_Q))(out, dout, lse)
    side_in = mgb.side_inputs(q, k, v, dout, BLOCK_Q, BLOCK_K)
    kernel_kw = dict(KW, sm_scale=scale, interpret=False)
    for name, kernel in (("dq", mgb._dq), ("dkv", mgb._dkv)):
        fn = jax.jit(lambda *a, kernel=kernel: kernel(*a, side_in, **kernel_kw))
        row[name] = median_time(fn, q, k, v, dout, lse2, delta, index)
    row["cudnn_bwd"], row["cudnn_fb"] = cudnn
    for i, name in enumerate(("dq", "dk", "dv")):
        row[f"{name}_diff"] = max_abs(grads["fused"][i].astype(jnp.float32) - grads["split"][i].astype(jnp.float32))
        row[f"{name}_max"] = max_abs(grads["split"][i])
    return row


def cudnn_times(seq, heads, head_dim, dtype, seed=0):
    """Seconds of cuDNN dense attention: (backward alone, forward+backward)."""
    q, k, v, dout = inputs(jax.random.key(seed), 1, seq, seq, heads, head_dim, dtype)
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=default_sm_scale(head_dim),
                                                         implementation="cudnn")
    vjp_fn = jax.jit(lambda q, k, v: jax.vjp(dense, q, k, v)[1])(q, k, v)
    t_bwd = median_time(jax.jit(lambda fn, d: fn(d)), vjp_fn, dout)
    t_fb = median_time(jax.jit(lambda q, k, v, d: jax.vjp(dense, q, k, v)[1](d)), q, k, v, dout)
    return t_bwd, t_fb


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[32760, 75600])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.95])
    parser.add_argument("--check", action="store_true", help="first compare both paths with the reference")
    parser.add_argument("--interpret", action="store_true", help="only the checks, small, in interpret mode (CPU)")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind)
    if args.check or args.interpret:
        for seq_q, seq_k, heads, d, dtype in INTERPRET_CHECKS if args.interpret else CHECKS:
            errors = check(seq_q, seq_k, heads, d, dtype, 0.5, seed=seq_q + d, interpret=args.interpret)
            for fused, errs in errors.items():
                print(f"check {'fused' if fused else 'split'} sq={seq_q} sk={seq_k} h={heads} d={d} "
                      f"{jnp.dtype(dtype).name}: dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e}", flush=True)
    if args.interpret:
        return
    rows = []
    for seq in args.seq:
        cudnn = cudnn_times(seq, args.heads, 128, jnp.bfloat16)
        for sp in args.sparsity:
            rows.append(timing(seq, args.heads, 128, jnp.bfloat16, sp, cudnn))
            print(rows[-1], flush=True)
    print(f"\nB=1, H={args.heads}, D=128, bf16, mask blocks q {BLOCK_Q} x k {BLOCK_K}; "
          "speed-ups: split / fused time, cuDNN / ours\n" + table(rows))


if __name__ == "__main__":
    main()
