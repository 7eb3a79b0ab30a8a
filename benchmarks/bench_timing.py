"""Device timing shared by the benchmarks: median seconds per call after warm-up.

Each repeat runs the call back to back enough times to last >= 20 ms, then waits with
`jax.block_until_ready`, so calls are dispatched asynchronously: a call whose device time
is below Python's per-call dispatch cost (order 10 us) is timed at that cost."""

from __future__ import annotations

import time

import jax
import numpy as np


def median_time(fn, *args, reps: int = 10) -> float:
    """Median seconds per call of `fn(*args)` after warm-up."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    inner = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return float(np.median(samples))
