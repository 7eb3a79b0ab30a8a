"""Where a teacher-training step's time goes (GPU; runs on the CPU too, e.g. in the tests).

    python benchmarks/teacher_step_profile.py --out OUT [--config train/configs/teacher.json]
        [--steps 60] [key=value overrides ...]

Runs `--steps` steps of the training config `--config` (default: the teacher's recipe, with the
shipped weights, no held-out evaluations, a log line every 10 steps) under `jax.profiler`, with
XLA dumping the optimized HLO of the trainer's step (`jit_step`). Keeps the trace and that HLO in
OUT/trace (`trace.xplane.pb`, `module.hlo.txt`: the layout `python benchmarks/step_profile.py
--trace OUT/trace --calls STEPS` reads) and prints the step program's kernel time per step by
category (`step_profile.profile_breakdown`) next to the logged wall time of a step: what the
difference holds is everything else the loop waits for (the clips' rendering, the host's
dispatch and logging). On a GPU it also prints the device streams' time per step by the program
that launched it (`step_profile.device_program_seconds`: the step, the clips' rendering, copies),
so the difference can be split. On one H200 (2026-12-03, session 21, study size, batch 16,
`data.procedural.render_on=accelerator`): 29.3 ms of the step program's kernels in a logged 46.8 ms
(52.8 before the clips stayed on the GPU; docs/teacher.md says where the rest goes). On the CPU the ops are
host events and the comparison means little (the tests run it there for its plumbing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax.profiler import ProfileData
from step_profile import breakdown_table, device_program_seconds, profile_breakdown, trace_file

from train.config import load_config
from train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train" / "configs" / "teacher.json"


def main(argv=None) -> dict:
    """Returns {"kernels": seconds per step by category (`profile_breakdown`), "logged_step_s": median of
    the logged step times, "programs": device stream seconds of the run by program, {} on the CPU}."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be at least 2 (the first one compiles); got {args.steps}")
    # XLA reads its flags when the backend starts: this is a script's first JAX work (not for a
    # process that has run JAX already, e.g. pytest's: there the dump is missing and it says so)
    dump = Path(tempfile.mkdtemp())
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={dump}",
                                        "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=jit_step"]).strip()
    trace_dir = args.out / "trace"
    shutil.rmtree(trace_dir, ignore_errors=True)
    raw = args.out / "raw_trace"
    shutil.rmtree(raw, ignore_errors=True)
    metrics = args.out / "metrics.jsonl"
    weights = [f"model.weights={ROOT / 'train' / 'teacher'}"] if args.config == CONFIG else []
    cfg = load_config(args.config, [*weights, "eval_every=0", "log_every=10", *args.overrides,
                                    f"steps={args.steps}", f"metrics_path={metrics}"])
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with jax.profiler.trace(str(raw), profiler_options=options):
        train(cfg, progress=False)
    modules = sorted(dump.glob("*jit_step*after_optimizations.txt"), key=lambda path: path.stat().st_mtime)
    if not modules:
        raise SystemExit(f"no optimized HLO of jit_step in {dump}: JAX had started before this script set "
                         "XLA_FLAGS (run it as a script)")
    trace_dir.mkdir(parents=True)
    shutil.move(trace_file(raw), trace_dir / "trace.xplane.pb")
    shutil.rmtree(raw)
    shutil.copyfile(modules[-1], trace_dir / "module.hlo.txt")
    shutil.rmtree(dump)
    profile = ProfileData.from_file(str(trace_dir / "trace.xplane.pb"))  # tens of MB: read once
    seconds, _ = profile_breakdown(profile, (trace_dir / "module.hlo.txt").read_text(), args.steps)
    logged = [json.loads(line)["step_time"] for line in metrics.read_text().splitlines()]
    step_s = float(np.median(logged[1:] or logged))
    print("Kernels of the step program, ms per step:\n")
    print(breakdown_table({"step program": seconds}))
    print(f"\nlogged step (median of {len(logged)} log lines, the first left out): {step_s * 1000:.1f} ms; "
          f"outside the step program's kernels: {(step_s - seconds['total']) * 1000:.1f} ms")
    programs = device_program_seconds(profile)
    if programs:
        print("\nDevice stream time per step by program (the whole run over --steps; copies: memcpy/memset):")
        per_step = {name: total / args.steps * 1000 for name, total in programs.items()}
        shown = {name: ms for name, ms in per_step.items() if ms >= 0.05 or name.startswith("jit_render")}
        for name, ms in sorted(shown.items(), key=lambda item: -item[1]):
            print(f"  {name:<40} {ms:8.2f} ms")
        rest = [ms for name, ms in per_step.items() if name not in shown]
        if rest:  # e.g. the autotuner's one-fusion programs, compiled and timed once
            print(f"  {f'{len(rest)} programs under 0.05 ms':<40} {sum(rest):8.2f} ms")
    return {"kernels": seconds, "logged_step_s": step_s, "programs": programs}


if __name__ == "__main__":
    main()
