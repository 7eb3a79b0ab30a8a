"""Device check and timing of the Mosaic GPU block-sparse backward (run on an H100).

Prints, per case, the relative L2 error of dq/dk/dv against `jax.vjp` of the jnp
reference (small shapes) and then a timing table: our backward (delta precompute
included, and the dQ / dK-dV kernels alone) against the backward of cuDNN dense
attention (`jax.vjp` of `jax.nn.dot_product_attention(implementation="cudnn")`).
Masks keep a fixed number of k blocks per q-block row, chosen at random.

Usage: python benchmarks/mosaic_gpu_backward_bench.py [--seq 32760] [--heads 12] [--check]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mosaic_gpu import flash_backward as mgb
from pallas_kernels.block_index import mask_to_block_index
from pallas_kernels.blocks import default_sm_scale, num_blocks
from pallas_kernels.reference import reference_attention_with_lse

BLOCK_Q, BLOCK_K = 128, 64


def fixed_density_mask(key, batch, heads, nq, nk, kept):
    """Bool `(batch, heads, nq, nk)` keeping exactly `kept` random k blocks per row."""
    ranks = jnp.argsort(jax.random.uniform(key, (batch, heads, nq, nk)), axis=-1)
    return ranks < kept


def median_time(fn, *args, reps=20):
    """Median wall time (s) of `fn(*args)` after two warm-up calls, synchronised each call."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


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


def check(seq_q, seq_k, heads, head_dim, dtype, density, seed):
    """Relative L2 errors of (dq, dk, dv) against the reference's vjp."""
    key = jax.random.key(seed)
    q, k, v, dout = inputs(key, 1, seq_q, seq_k, heads, head_dim, dtype)
    nq, nk = num_blocks(seq_q, BLOCK_Q), num_blocks(seq_k, BLOCK_K)
    mask = jax.random.uniform(jax.random.fold_in(key, 1), (1, heads, nq, nk)) < density
    mask = mask.at[:, :, 0].set(False).at[:, :, -1].set(True)
    out, lse = reference_attention_with_lse(q, k, v, mask)
    f32 = lambda x: x.astype(jnp.float32)
    ref_fn = lambda q, k, v: reference_attention_with_lse(f32(q), f32(k), f32(v), mask)[0]
    ref = jax.vjp(ref_fn, q, k, v)[1](f32(dout))
    got = jax.jit(mgb.backward, static_argnames=("block_q", "block_k", "sm_scale"))(
        q, k, v, out, lse, dout, mask_to_block_index(mask),
        block_q=BLOCK_Q, block_k=BLOCK_K, sm_scale=default_sm_scale(head_dim),
    )
    return [rel_l2(g, r) for g, r in zip(got, ref)]


def timing(seq, heads, head_dim, dtype, sparsity, seed=0):
    """Seconds: (ours, dq kernel, dkv kernel, cudnn dense backward) and our backward TFLOP/s."""
    key = jax.random.key(seed)
    q, k, v, dout = inputs(key, 1, seq, seq, heads, head_dim, dtype)
    nq, nk = num_blocks(seq, BLOCK_Q), num_blocks(seq, BLOCK_K)
    kept = max(1, round(nk * (1 - sparsity)))
    index = mask_to_block_index(fixed_density_mask(jax.random.fold_in(key, 1), 1, heads, nq, nk, kept))
    scale = default_sm_scale(head_dim)
    # Stand-ins for the forward's residuals: any finite lse/out exercise the same work.
    out = jax.random.normal(jax.random.fold_in(key, 2), q.shape, dtype)
    lse = jnp.full((1, heads, seq), 5.0, jnp.float32) + jax.random.uniform(jax.random.fold_in(key, 3), (1, heads, seq))
    kw = dict(block_q=BLOCK_Q, block_k=BLOCK_K, sm_scale=scale)
    ours = jax.jit(lambda *a: mgb.backward(*a, **kw))
    t_ours = median_time(ours, q, k, v, out, lse, dout, index)
    lse2, delta = jax.jit(lambda o, d, l: mgb._row_terms(o, d, l, nq * BLOCK_Q))(out, dout, lse)
    kw_i = dict(kw, interpret=False)
    side_in = mgb.side_inputs(q, k, v, dout, BLOCK_Q, BLOCK_K)
    t_dq = median_time(jax.jit(lambda *a: mgb._dq(*a, side_in, **kw_i)), q, k, v, dout, lse2, delta, index)
    t_dkv = median_time(jax.jit(lambda *a: mgb._dkv(*a, side_in, **kw_i)), q, k, v, dout, lse2, delta, index)

    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    vjp_fn = jax.jit(lambda q, k, v: jax.vjp(dense, q, k, v)[1])(q, k, v)
    t_cudnn = median_time(jax.jit(lambda fn, d: fn(d)), vjp_fn, dout)
    flops = 2.5 * 4 * kept * nq * BLOCK_Q * BLOCK_K * head_dim * heads
    return t_ours, t_dq, t_dkv, t_cudnn, flops / t_ours / 1e12


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[32760])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.95])
    parser.add_argument("--check", action="store_true", help="also run the small correctness checks")
    args = parser.parse_args()
    print(jax.devices()[0].device_kind)
    if args.check:
        for seq_q, seq_k, heads, d, dtype in [
            (1000, 776, 2, 128, jnp.bfloat16), (1000, 776, 2, 64, jnp.float16), (4096, 4096, 4, 128, jnp.bfloat16)
        ]:
            errs = check(seq_q, seq_k, heads, d, dtype, 0.5, seed=seq_q + d)
            print(f"check sq={seq_q} sk={seq_k} h={heads} d={d} {jnp.dtype(dtype).name}: "
                  f"dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e}", flush=True)
    rows = []
    for seq in args.seq:
        for sp in args.sparsity:
            rows.append((seq, sp, *timing(seq, args.heads, 128, jnp.bfloat16, sp)))
            print(rows[-1], flush=True)
    print(f"{'N':>6} {'sparsity':>8} {'ours ms':>8} {'dq ms':>7} {'dkv ms':>7} {'cudnn ms':>8} {'speedup':>7} {'TFLOP/s':>7}")
    for seq, sp, t, tdq, tdkv, tc, tf in rows:
        print(f"{seq:>6} {sp:>8.2f} {t*1e3:>8.3f} {tdq*1e3:>7.3f} {tdkv*1e3:>7.3f} {tc*1e3:>8.3f} {tc/t:>7.2f} {tf:>7.1f}")


if __name__ == "__main__":
    main()
