"""Helpers for the training tests that start `python -m train` subprocesses on localhost."""

import atexit
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from train.config import DEFAULT_CONFIG

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"(?:process (\d+): )?final loss (\S+) after (\d+) steps; param checksum (\S+)")
# A small, fast model and data for subprocess runs (fp32 so results compare tightly).
SMALL = ["data.synthetic_latent_shape=[2,6,6]", "data.synthetic_text_len=5", "model.compute_dtype=float32",
         "optim.warmup_steps=1", "model.overrides.num_layers=1"]


# One persistent XLA compilation cache for the subprocesses of a test session (a resumed run
# reuses the programs compiled by the first one), where they keep every program they compile.
# On a CPU-only JAX it is the suite's (tests/conftest.py), which the pytest-xdist workers share:
# the subprocesses of one worker find the programs those of the other compiled (tests/
# test_train_{faults,resume}.py run the same ones), and the workers' in-process runs of the same
# settings theirs. Otherwise (a GPU machine) a directory of this process, removed at exit.
COMPILE_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR")
if not COMPILE_CACHE:
    COMPILE_CACHE = tempfile.mkdtemp(prefix="sparge-train-xla-cache-")
    atexit.register(shutil.rmtree, COMPILE_CACHE, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, devices: int = 1, **popen) -> subprocess.Popen:
    """`python -m train --no-progress --config train/configs/tiny.json *args` on CPU with
    `devices` fake devices (the tiny config, not the CLI's default demo)."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip(),
        JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "train", "--no-progress", "--config", str(DEFAULT_CONFIG), *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )


def finish(proc: subprocess.Popen, timeout: float = 150) -> list[tuple[float, float]]:
    """Wait (bounded) and return the (loss, checksum) summary lines; fail with the output."""
    code, out = outcome(proc, timeout)
    assert code == 0, f"exit {code}:\n{out[-4000:]}"
    found = [(float(m[2]), float(m[4])) for m in SUMMARY.finditer(out)]
    assert found, out[-4000:]
    return found


def outcome(proc: subprocess.Popen, timeout: float = 150) -> tuple[int, str]:
    """(exit status, output) of a run that may fail; bounded wait."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"training timed out:\n{out[-4000:]}")
    return proc.returncode, out
