"""benchmarks/teacher_step_profile.py on the CPU, as a script (XLA's HLO dump must be set before JAX
starts): a tiny teacher recipe trains 3 steps under the profiler; the step's optimized HLO and the
trace land in OUT/trace and the step program's ops are found in the trace by category."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_of_a_tiny_teacher_recipe(tmp_path):
    config = tmp_path / "teacher.json"
    config.write_text((ROOT / "train" / "configs" / "teacher.json").read_text())  # no shipped weights
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "teacher_step_profile.py"), "--out", str(tmp_path / "out"),
         "--config", str(config), "--steps", "3", "data.procedural.frames=2", "data.procedural.height=32",
         "data.procedural.width=32", "data.batch_size=2", "model.overrides.num_layers=1",
         "model.compute_dtype=float32"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}"})
    assert run.returncode == 0, run.stderr[-3000:]
    trace = tmp_path / "out" / "trace"
    assert (trace / "trace.xplane.pb").is_file()
    assert "jit_step" in (trace / "module.hlo.txt").read_text().splitlines()[0]
    row = re.search(r"\| step program \| ([\d.]+) .*\| ([\d.]+) \|$", run.stdout, re.M)
    assert row, run.stdout
    matmul_ms, total_ms = map(float, row.groups())
    assert 0 < matmul_ms < total_ms
    assert re.search(r"logged step \(median of \d+ log lines.*\): [\d.]+ ms", run.stdout)

    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "teacher_step_profile.py"), "--out",
                              str(tmp_path / "x"), "--steps", "1"], capture_output=True, text=True, timeout=120,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}"})
    assert refused.returncode == 2 and "--steps must be at least 2" in refused.stderr
