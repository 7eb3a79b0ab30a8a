"""Mask-prediction cost against the cuDNN dense forward, on the default device.

For each sequence length N (B=1, H=12, D=128, bf16 random q/k/v, SparseConfig defaults:
hybrid rule, q blocks 128, k blocks 64), in one run:

* pooling: the fp32 block means of q and k (`pool_blocks`, both);
* pooled scores: pooling + `pool(Q) pool(K)^T` + softmax;
* predict_mask: the block mask (`predict_mask`, XLA);
* kv lists: `predict_block_index`, forward lists only (what a forward-only call computes:
  under jit the unused transposed lists are dropped). On a GPU with at most 128 k blocks
  (N <= 8192) this is the three fused kernels of `pallas_kernels.triton`,
  otherwise the XLA path;
* all lists: the same with the transposed (backward) lists too;
* fwd lists / all lists, in one jit: `predict_block_index` (forward lists only, or all
  lists) for 8 different (q, k) in one jitted function (unrolled, no loop), per
  prediction: the device time from the first kernel's start to the last kernel's end in a
  profiler trace (launch gaps included), and the wall time of the call / 8. The wall time
  also holds Python's handling of the call's 16 or 32 outputs, which a model never returns,
  and where that exceeds the kernels' time the wall time measures the host instead;
* XLA path, in one jit: the same (all lists) with `mask_to_block_index(predict_mask(...))`,
  the path without the fused kernels, for comparison in the same run;
* cuDNN dense forward: `jax.nn.dot_product_attention(..., implementation="cudnn")`
  (on the largest prefix whose length is a multiple of 8, which cuDNN needs).

Each is a separate jitted function. Times are medians over repeats after warm-up; each
repeat runs the call back to back enough times to last >= 20 ms, then waits with
`jax.block_until_ready`. Calls are dispatched asynchronously, so a stage whose device
time is below Python's per-call dispatch cost (order 10 us) is timed at that cost: use
the in-jit columns, or a profiler trace (--trace) for the device time of the shortest
stages. The table (ms and % of the dense forward) is printed last and written to --out
(default $OUT/mask_prediction.md when OUT is set).

Usage: python benchmarks/mask_prediction.py [--seq 8192 32760 75600] [--reps 20] [--trace]
       python benchmarks/mask_prediction.py --small   # tiny N, runs on CPU (smoke test;
                                                      # dense is then XLA's, not cuDNN)
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile

import jax
import jax.numpy as jnp
from bench_timing import median_time

from pallas_kernels.block_index import mask_to_block_index
from pallas_kernels.blocks import default_sm_scale, num_blocks
from sparge_jax.config import SparseConfig
from sparge_jax.masks import pool_blocks, pooled_scores, predict_block_index, predict_mask


def xla_path_lists(q, k, config: SparseConfig = SparseConfig()):
    """The XLA path: `mask_to_block_index(predict_mask(...))`."""
    return mask_to_block_index(predict_mask(q, k, config))


def timed_fns(config: SparseConfig, dense_impl: str | None, scale: float) -> dict:
    """Name -> jitted function of (q, k, v), in table order; "dense" last."""
    bq, bk, scale = config.kernel.block_q, config.kernel.block_k, config.kernel.sm_scale
    return {
        "pooling": jax.jit(lambda q, k, v: (pool_blocks(q, bq), pool_blocks(k, bk))),
        "pooled scores": jax.jit(lambda q, k, v: pooled_scores(q, k, block_q=bq, block_k=bk, sm_scale=scale)),
        "predict_mask": jax.jit(lambda q, k, v: predict_mask(q, k, config)),
        "kv lists": jax.jit(lambda q, k, v: predict_block_index(q, k, config)[:2]),
        "all lists": jax.jit(lambda q, k, v: predict_block_index(q, k, config)),
        "dense": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=dense_impl)),
    }


IN_JIT = {"fwd lists, in one jit": lambda q, k: predict_block_index(q, k, SparseConfig())[:2],
          "all lists, in one jit": lambda q, k: predict_block_index(q, k, SparseConfig()),
          "XLA path, in one jit": xla_path_lists}
IN_JIT_CALLS = 8


def device_events(fn, *args, calls: int = 20) -> list:
    """The device's kernel events ("X" events: name, ts, dur in us) of `calls` calls of
    `fn(*args)` in a profiler trace, in start order."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        (path,) = glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in processes.items() if "GPU" in name or "TPU" in name}
    return sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in device), key=lambda e: e["ts"])


def in_jit_time(predict, seq: int, heads: int, head_dim: int, reps: int) -> tuple[float, float]:
    """Seconds per `predict(q, k)` when 8 of them (different q, k) run inside one jitted
    function: (device span, wall). The span is the median over calls of first kernel start to
    last kernel end (NaN without a GPU or TPU trace).

    The 8 pairs are separate arguments: slices of one stacked array would make XLA copy
    them before a kernel that is not fused with the slice (a Pallas call)."""
    keys = jax.random.split(jax.random.key(seq + 1), 2 * IN_JIT_CALLS)
    xs = [jax.random.normal(key, (1, seq, heads, head_dim), jnp.bfloat16) for key in keys]
    fn = jax.jit(lambda *xs: [predict(xs[2 * i], xs[2 * i + 1]) for i in range(IN_JIT_CALLS)])
    wall = median_time(fn, *xs, reps=reps) / IN_JIT_CALLS
    events = device_events(fn, *xs, calls=10)
    if not events:
        return float("nan"), wall
    spans, start, end = [], events[0]["ts"], events[0]["ts"] + events[0]["dur"]
    for e in events[1:]:  # calls are separated by the host's wait (> 50 us), kernels of one call are not
        if e["ts"] > end + 50:
            spans.append(end - start)
            start = e["ts"]
        end = max(end, e["ts"] + e["dur"])
    spans = sorted(spans + [end - start])
    return spans[len(spans) // 2] * 1e-6 / IN_JIT_CALLS, wall


def device_kernel_times(config: SparseConfig, seq: int, heads: int, head_dim: int, calls: int = 20) -> list:
    """(kernel name, launches per prediction, device us per prediction) of one jitted
    `predict_block_index` (all lists), from a profiler trace of `calls` calls; busiest first."""
    kq, kk = jax.random.split(jax.random.key(seq + 2))
    q = jax.random.normal(kq, (1, seq, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(kk, (1, seq, heads, head_dim), jnp.bfloat16)
    total, count = collections.Counter(), collections.Counter()
    for e in device_events(jax.jit(lambda q, k: predict_block_index(q, k, config)), q, k, calls=calls):
        total[e["name"]] += e.get("dur", 0)
        count[e["name"]] += 1
    return [(name, count[name] / calls, us / calls) for name, us in total.most_common()]


def run_seq(seq: int, heads: int, head_dim: int, reps: int, dense_impl: str | None) -> dict:
    config = SparseConfig()
    kq, kk, kv = jax.random.split(jax.random.key(seq), 3)
    q, k, v = (jax.random.normal(x, (1, seq, heads, head_dim), jnp.bfloat16) for x in (kq, kk, kv))
    dense_seq = seq - seq % 8
    fns = timed_fns(config, dense_impl, default_sm_scale(head_dim))
    times = {}
    for name, fn in fns.items():
        if name == "dense":
            for label, predict in IN_JIT.items():
                times[label + ", device"], times[label + ", wall"] = in_jit_time(predict, seq, heads, head_dim, reps)
        args = (q[:, :dense_seq], k[:, :dense_seq], v[:, :dense_seq]) if name == "dense" else (q, k, v)
        times[name] = median_time(fn, *args, reps=reps)
    blocks = (num_blocks(seq, config.kernel.block_q), num_blocks(seq, config.kernel.block_k))
    mask = fns["predict_mask"](q, k, v)
    kept = float(jnp.mean(mask.astype(jnp.float32)))
    print(f"N={seq}: {blocks[0]}x{blocks[1]} block scores per head, {100 * kept:.1f} % kept; "
          + ", ".join(f"{name} {t * 1e3:.4f} ms" for name, t in times.items()), flush=True)
    return dict(N=seq, dense_seq=dense_seq, blocks=blocks, times=times)


def table(rows, dense_label: str) -> str:
    names = [n for n in rows[0]["times"] if n != "dense"]
    lines = [f"| N | blocks (q x k) | {dense_label} ms | " + " | ".join(f"{n} ms (% dense)" for n in names) + " |",
             "|---" * (3 + len(names)) + "|"]
    for r in rows:
        dense = r["times"]["dense"]
        n_label = f"{r['N']}" + (f" (dense at {r['dense_seq']})" if r["dense_seq"] != r["N"] else "")
        cells = [f"{r['times'][n] * 1e3:.4f} ({100 * r['times'][n] / dense:.1f} %)" for n in names]
        lines.append(f"| {n_label} | {r['blocks'][0]} x {r['blocks'][1]} | {dense * 1e3:.4f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=None,
                        help="default 8192 32760 75600 (--small: 1001 2048)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="tiny N and XLA dense attention: a CPU smoke test")
    parser.add_argument("--trace", action="store_true",
                        help="also list the device kernels of one predict_block_index, all lists (profiler trace)")
    parser.add_argument("--out", default=os.path.join(os.environ["OUT"], "mask_prediction.md")
                        if "OUT" in os.environ else None)
    args = parser.parse_args()
    seqs = args.seq or ([1001, 2048] if args.small else [8192, 32760, 75600])
    reps = min(args.reps, 5) if args.small else args.reps
    dense_impl = None if args.small else "cudnn"
    dense_label = "XLA dense fwd" if args.small else "cuDNN dense fwd"
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    rows = [run_seq(seq, args.heads, args.head_dim, reps, dense_impl) for seq in seqs]
    if args.trace:
        for seq in seqs:
            kernels = device_kernel_times(SparseConfig(), seq, args.heads, args.head_dim)
            print(f"N={seq}: device kernels of one predict_block_index (all lists) "
                  f"({sum(n for _, n, _ in kernels):.0f} launches, {sum(t for _, _, t in kernels):.1f} us)")
            for name, launches, us in kernels[:25]:
                print(f"  {us:8.2f} us  {launches:4.1f}x  {name[:110]}")
    text = (f"Mask prediction vs dense forward, B=1 H={args.heads} D={args.head_dim} bf16, SparseConfig() "
            f"(hybrid, 128x64 blocks), on {jax.devices()[0].device_kind}; medians of {reps} repeats.\n\n"
            + table(rows, dense_label))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
