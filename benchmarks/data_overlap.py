"""Training step time with the next batch read in the background (`data.prefetch=true`) and
read serially (`false`), back to back, plus the time to read one batch on its own.

    python benchmarks/data_overlap.py [--config train/configs/teacher.json] [--steps 12] [--rounds 2] [key=value ...]

Runs the trainer `--rounds` times per setting, alternating (on, off, on, off, ...) so that both
see the same machine load, `--steps` steps each, every step logged, no checkpoints or held-out
evaluations; the first `--skip` steps of each run (compilation) are left out. Prints the median
`step_time` per setting (docs/training.md: from asking for the step's batch to its metrics on
the host, the sparsity probe excluded) and the median of `--reads` reads of one batch
(`BatchLoader.read`, host NumPy: what prefetching can hide). With a sparse student every logged
step also runs the sparsity probe between reading and stepping, which a read in the background
overlaps too: measure with a dense student (the teacher config) or read the numbers with that in mind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax

from train.config import load_config
from train.loop import batch_loader, data_source, train
from train.model import abstract_model
from train.sharding import make_mesh

TEACHER = Path(__file__).resolve().parents[1] / "train" / "configs" / "teacher.json"


def read_time(cfg, reads: int) -> float:
    """Median seconds of `BatchLoader.read` of one step's batch (steps 1..reads; step 0 compiles),
    waited for where the source makes jax Arrays (clips rendered on the accelerator)."""
    parts, _ = abstract_model(cfg.model)
    loader = batch_loader(cfg, data_source(cfg, parts.config), make_mesh(cfg.mesh))
    jax.block_until_ready(loader.read(0))
    times = []
    for step in range(1, reads + 1):
        tick = time.perf_counter()
        jax.block_until_ready(loader.read(step))
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def step_times(cfg_path, overrides, prefetch: bool, steps: int, skip: int) -> list[float]:
    metrics = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    cfg = load_config(cfg_path, [*overrides, f"steps={steps}", "log_every=1", "eval_every=0", "checkpoint.dir=null",
                                 f"data.prefetch={str(prefetch).lower()}", f"metrics_path={metrics}"])
    train(cfg, progress=False)
    return [json.loads(line)["step_time"] for line in metrics.read_text().splitlines()][skip:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TEACHER))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="first steps of each run left out (compilation)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    load_before = os.getloadavg()[0]
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for prefetch in (True, False):
            run = step_times(args.config, args.overrides, prefetch, args.steps, args.skip)
            print(f"run with data.prefetch={str(prefetch).lower():5} step_time median {1000 * statistics.median(run):7.1f} ms",
                  flush=True)
            times[prefetch] += run
    read = read_time(load_config(args.config, args.overrides), args.reads)
    for prefetch in (True, False):
        print(f"data.prefetch={str(prefetch).lower():5} step_time median {1000 * statistics.median(times[prefetch]):7.1f} ms"
              f"  (min {1000 * min(times[prefetch]):.1f}, max {1000 * max(times[prefetch]):.1f}, {len(times[prefetch])} steps)")
    print(f"one batch read (BatchLoader.read) median {1000 * read:7.1f} ms")
    print(f"machine load (1-min average) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
          f"on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
