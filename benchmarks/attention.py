"""Block-sparse attention (Mosaic GPU kernels) against cuDNN dense attention, on a GPU.

For each sequence length N and sparsity: forward and forward+backward time of
`block_sparse_attention` (backend "mosaic_gpu", mask lists precomputed) and of
`jax.nn.dot_product_attention(..., implementation="cudnn")` (dense bf16), both in this
run; TFLOP/s counted on computed blocks (forward 4·q·k·d per kept 128x64 block, fwd+bwd
3.5x that; dense: all blocks); speed-up = cuDNN time / our time. Plus the mask-prediction
overhead as `sparse_attention` pays it: the time of `sparse_attention(q, k, v, config=cfg)`
(which predicts the mask: `predict_block_index`) minus that of the same attention on the
same lists computed beforehand, forward (the forward lists) and forward+backward (all
lists), as fractions of the cuDNN forward and forward+backward. `cfg` is
`MASK_CONFIG`: the default hybrid rule's work (pooling, scores, both cuts, all lists)
keeping half the k blocks, so that both calls keep the GPU busy (a call much shorter than
the host's per-call work would time the host; `benchmarks/mask_prediction.py` breaks the
prediction down). Masks keep the same number of random k blocks in every q-block row.
cuDNN does not take lengths that are not multiples of 8; for those its time is taken on
the largest prefix that is. Times are medians over repeats after warm-up (each repeat runs the call
enough times back to back to last >= 20 ms, then waits with `jax.block_until_ready`).

Usage: python benchmarks/attention.py [--seq 8192 32760 75600] [--sparsity 0 50 80 90 95]
       [--variants] [--out results.md]
The table is printed last and written to --out (default $OUT/attention.md when OUT is set).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from bench_timing import median_time

from pallas_kernels import mosaic_gpu
from pallas_kernels.block_index import mask_to_block_index
from pallas_kernels.blocks import default_sm_scale, num_blocks
from sparge_jax.attention import block_sparse_attention, sparse_attention
from sparge_jax.config import SparseConfig
from sparge_jax.masks import predict_block_index

BLOCK_Q, BLOCK_K = 128, 64
# Mask prediction timed in place: hybrid (both cuts computed) keeping half the k blocks.
MASK_CONFIG = SparseConfig(rule="hybrid", topk=0.5, topp=1e-6, backend="mosaic_gpu")


def fixed_density_mask(key, heads: int, nq: int, nk: int, kept: int) -> jax.Array:
    """Bool `(1, heads, nq, nk)` keeping exactly `kept` random k blocks in every row."""
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (1, heads, nq, nk)), axis=-1), axis=-1)
    return ranks < kept


def kept_blocks(nk: int, sparsity: float) -> int:
    """k blocks kept per q-block row at `sparsity` percent (at least one)."""
    return max(1, round(nk * (1 - sparsity / 100)))


def random_inputs(seq: int, heads: int, head_dim: int):
    """bf16 q, k, v, dout `(1, seq, heads, head_dim)` and a key for the masks, all from `seq`."""
    kq, kk, kv, kd, km = jax.random.split(jax.random.key(seq), 5)
    q, k, v, do = (jax.random.normal(x, (1, seq, heads, head_dim), jnp.bfloat16) for x in (kq, kk, kv, kd))
    return q, k, v, do, km


def dense_fns(scale: float):
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    fwd = jax.jit(dense)
    fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(dense, q, k, v)[1](do))
    return fwd, fwd_bwd


def sparse_fns(scale: float):
    def attend(q, k, v, index):
        return block_sparse_attention(q, k, v, index, BLOCK_Q, BLOCK_K, scale, "mosaic_gpu", False)

    fwd = jax.jit(attend)
    fwd_bwd = jax.jit(lambda q, k, v, do, index: jax.vjp(lambda q, k, v: attend(q, k, v, index), q, k, v)[1](do))
    return fwd, fwd_bwd


def mask_overhead(q, k, v, do, scale: float, reps: int) -> tuple[float, float]:
    """Seconds `sparse_attention` spends predicting its mask (MASK_CONFIG): forward, and
    forward+backward, each the difference of the predicting call and the same attention on
    lists computed beforehand and passed in (median of 5 alternate measurements). Both calls
    take the same arguments, so their host work differs only by the prediction's launches.
    `scale`: the default softmax scale, which `sparse_attention` uses for MASK_CONFIG."""
    cfg = MASK_CONFIG
    index = jax.jit(predict_block_index, static_argnums=2)(q, k, cfg)
    given = lambda q, k, v, index: block_sparse_attention(q, k, v, index, cfg.kernel.block_q, cfg.kernel.block_k,
                                                          scale, cfg.kernel.backend, False)
    predicting = lambda q, k, v, index: sparse_attention(q, k, v, config=cfg)  # index unused
    fwd_bwd = lambda f: jax.jit(lambda q, k, v, do, index: jax.vjp(lambda *x: f(*x, index), q, k, v)[1](do))
    overheads = []
    for wrap, args in ((jax.jit, (q, k, v, index)), (fwd_bwd, (q, k, v, do, index))):
        with_prediction, without = wrap(predicting), wrap(given)
        diffs = [median_time(with_prediction, *args, reps=reps) - median_time(without, *args, reps=reps)
                 for _ in range(5)]
        overheads.append(sorted(diffs)[2])
    return overheads[0], overheads[1]


def run_seq(seq: int, heads: int, head_dim: int, sparsities, reps: int, variants: bool):
    q, k, v, do, km = random_inputs(seq, heads, head_dim)
    scale = default_sm_scale(head_dim)
    nq, nk = num_blocks(seq, BLOCK_Q), num_blocks(seq, BLOCK_K)

    dense_fwd, dense_fwd_bwd = dense_fns(scale)
    # cuDNN refuses lengths that are not multiples of 8: time it on the largest such prefix.
    dense_seq = seq - seq % 8
    dense_args = [x[:, :dense_seq] for x in (q, k, v, do)]
    if dense_seq != seq:
        print(f"N={seq}: cuDNN dense timed at N={dense_seq} (it does not take this length)", flush=True)
    t_dense = median_time(dense_fwd, *dense_args[:3], reps=reps)
    t_dense_fb = median_time(dense_fwd_bwd, *dense_args, reps=reps)
    t_mask, t_mask_fb = mask_overhead(q, k, v, do, scale, reps)
    dense_flops = 4.0 * seq * seq * head_dim * heads
    print(f"N={seq}: cuDNN fwd {t_dense * 1e3:.3f} ms ({dense_flops / t_dense / 1e12:.0f} TFLOP/s), "
          f"fwd+bwd {t_dense_fb * 1e3:.3f} ms; mask prediction in sparse_attention: fwd {t_mask * 1e6:.1f} us, "
          f"fwd+bwd {t_mask_fb * 1e6:.1f} us", flush=True)

    sparse_fwd, sparse_fwd_bwd = sparse_fns(scale)
    rows, variant_rows = [], []
    for sparsity in sparsities:
        kept = kept_blocks(nk, sparsity)
        index = mask_to_block_index(fixed_density_mask(km, heads, nq, nk, kept))
        flops = 4.0 * kept * nq * BLOCK_Q * BLOCK_K * head_dim * heads
        t_fwd = median_time(sparse_fwd, q, k, v, index, reps=reps)
        t_fb = median_time(sparse_fwd_bwd, q, k, v, do, index, reps=reps)
        rows.append(dict(
            N=seq, sparsity=sparsity, kept=kept, fwd_ms=t_fwd * 1e3, fwd_tflops=flops / t_fwd / 1e12,
            fwd_speedup=t_dense / t_fwd, fb_ms=t_fb * 1e3, fb_tflops=3.5 * flops / t_fb / 1e12,
            fb_speedup=t_dense_fb / t_fb, cudnn_fwd_ms=t_dense * 1e3, cudnn_fb_ms=t_dense_fb * 1e3,
            cudnn_fwd_tflops=dense_flops / t_dense / 1e12, cudnn_fb_tflops=3.5 * dense_flops / t_dense_fb / 1e12,
            mask_pct=100 * t_mask / t_dense, mask_fb_pct=100 * t_mask_fb / t_dense_fb,
        ))
        print(rows[-1], flush=True)
        if variants:
            for kps in (64, 128):
                for pingpong in (False, True):
                    fn = jax.jit(lambda q, k, v, i, kps=kps, pp=pingpong: mosaic_gpu.forward(
                        q, k, v, i, block_q=BLOCK_Q, block_k=BLOCK_K, sm_scale=scale, keys_per_step=kps, pingpong=pp))
                    t = median_time(fn, q, k, v, index, reps=reps)
                    variant_rows.append((seq, sparsity, kps, pingpong, t * 1e3, flops / t / 1e12))
                    print("variant", variant_rows[-1], flush=True)
    return rows, variant_rows


def table(rows) -> str:
    head = ("| N | sparsity % | kept/row | fwd ms | fwd TFLOP/s | fwd speed-up | fwd+bwd ms | fwd+bwd TFLOP/s "
            "| fwd+bwd speed-up | cuDNN fwd ms (TFLOP/s) | cuDNN fwd+bwd ms (TFLOP/s) | mask pred % of cuDNN fwd "
            "| mask pred % of cuDNN fwd+bwd |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['sparsity']:g} | {r['kept']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
            f"{r['fwd_speedup']:.2f}x | {r['fb_ms']:.3f} | {r['fb_tflops']:.0f} | {r['fb_speedup']:.2f}x | "
            f"{r['cudnn_fwd_ms']:.3f} ({r['cudnn_fwd_tflops']:.0f}) | {r['cudnn_fb_ms']:.3f} ({r['cudnn_fb_tflops']:.0f}) | "
            f"{r['mask_pct']:.2f} | {r['mask_fb_pct']:.2f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32760, 75600])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0, 50, 80, 90, 95])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--variants", action="store_true", help="also time forward kernel variants (keys/step, ping-pong)")
    parser.add_argument("--out", default=os.path.join(os.environ["OUT"], "attention.md") if "OUT" in os.environ else None)
    args = parser.parse_args()
    device = jax.devices()[0].device_kind
    rows, variant_rows = [], []
    for seq in args.seq:
        r, vr = run_seq(seq, args.heads, args.head_dim, args.sparsity, args.reps, args.variants)
        rows += r
        variant_rows += vr
    text = f"{device}, B=1, H={args.heads}, D={args.head_dim}, bf16, mask blocks q {BLOCK_Q} x k {BLOCK_K}\n\n"
    if variant_rows:
        text += "| N | sparsity % | keys/step | ping-pong | fwd kernel ms | TFLOP/s |\n|---|---|---|---|---|---|\n"
        text += "\n".join(f"| {n} | {s:g} | {kps} | {pp} | {t:.3f} | {tf:.0f} |" for n, s, kps, pp, t, tf in variant_rows)
        text += "\n\n"
    text += table(rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
