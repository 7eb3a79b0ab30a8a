"""Shared test setup: markers, the per-test device and matmul precision, a seeded `rng`.

Markers (see docs/testing.md; select with `-m`, e.g. `-m gpu`, `-m "not slow"`):
  gpu, tpu                      need that hardware; skipped elsewhere.
  slow                          longer CPU tests (CI runs them too).
  matmul_precision(name)        the test runs under `jax.default_matmul_precision(name)`. Tests
                                that compare float32 results with a float64 or float32 oracle
                                at ~1e-5 state "highest": on a GPU, float32 matmuls otherwise
                                run in TF32 (~1e-3 relative), as the library's users get them
                                by default (README, "Precision").
  cpu(reason)                   the test is about the CPU (Pallas interpret mode, host memory):
                                on a machine with an accelerator it runs with the CPU as
                                default device (`jax.default_device`), the reason says why.
"""

import atexit
import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zlib

# The suite is compile-bound on the CPU: small programs, each compiled once. XLA's LLVM backend at
# optimisation level 0 compiles them about a third faster (tests/test_wan_model.py: 64 s -> 41 s
# on 2 cores) and runs them a little slower; results agree to float32 round-off. Only on a
# CPU-only JAX (no PJRT plugin such as CUDA's, or JAX_PLATFORMS=cpu), so GPU and TPU runs test
# the default compiler; child processes inherit it. Set before JAX starts its backends.
_CPU_ONLY = os.environ.get("JAX_PLATFORMS", "") == "cpu" or not (
    importlib.util.find_spec("jax_plugins") or list(importlib.metadata.entry_points(group="jax_plugins")))
if _CPU_ONLY and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
# On a GPU, XLA times candidate kernels of every matmul/convolution fusion at each compile and keeps
# the fastest; with 14 test workers sharing the card the timings are noisy, so the same test got
# other kernels from run to run and comparisons of two programs at round-off tolerance failed now
# and then (benchmarks/RESULTS.md, issue 23). The suite checks values, not speed: it compiles with
# the default kernels (deterministic from run to run, and faster to compile). Set XLA_FLAGS with
# another --xla_gpu_autotune_level to test the autotuned programs.
if not _CPU_ONLY and "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()

# Many tests compile the same programs again: each `train()` call, CLI subprocess or re-created
# model jits its own functions, so JAX's in-memory cache does not carry across them. On a
# CPU-only JAX the suite shares JAX's persistent compilation cache (keyed by program, options and
# backend) in a temporary directory made by the first process (pytest-xdist's controller) and
# inherited by its workers and their child processes, removed when that process exits. JAX's
# default threshold keeps only programs that took a second or more to compile (about 90 in the
# suite), which hold most of the compile time (tests/test_train_{faults,loop,config}.py: 249 s ->
# 171 s in one process). No size limit: with one, JAX locks the directory for every lookup, which
# cost more than it saved (tests/test_tpu_kernels.py: 59 s -> 73 s; 64 s unlocked). Unlocked, a
# read that meets a half-written entry warns and compiles.
# Set JAX_COMPILATION_CACHE_DIR to choose the directory (kept then), e.g. on a GPU, where it is off.
if _CPU_ONLY and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir = tempfile.mkdtemp(prefix="sparge-jax-test-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _has_platform(platform: str) -> bool:
    try:
        return len(jax.devices(platform)) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    for marker, platform in (("gpu", "gpu"), ("tpu", "tpu")):
        if _has_platform(platform):
            continue
        skip = pytest.mark.skip(reason=f"needs a {platform.upper()}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _marked_device_and_precision(request):
    """Apply the test's `cpu` and `matmul_precision` markers around it (fixtures included)."""
    with contextlib.ExitStack() as stack:
        if request.node.get_closest_marker("cpu") is not None:
            if not _has_platform("cpu"):
                pytest.skip("pinned to the CPU, which this JAX does not expose (JAX_PLATFORMS)")
            stack.enter_context(jax.default_device(jax.devices("cpu")[0]))
        precision = request.node.get_closest_marker("matmul_precision")
        if precision is not None:
            stack.enter_context(jax.default_matmul_precision(*precision.args))
        yield


@pytest.fixture
def rng(request):
    """A numpy Generator per test, seeded from the test's id, so every run draws the same inputs.

    `SPARGE_TEST_SEED=<int>` mixes another number into every seed (to try other inputs); the
    seed is printed (shown when the test fails)."""
    seed = [zlib.crc32(request.node.nodeid.encode()), int(os.environ.get("SPARGE_TEST_SEED", "0"))]
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)
