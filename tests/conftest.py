"""Shared test setup: 64-bit off, `gpu`/`tpu` markers skip without the hardware."""

import jax
import numpy as np
import pytest


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


@pytest.fixture
def rng():
    """A fresh numpy Generator per test; its seed is printed (shown when the test fails)."""
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)
