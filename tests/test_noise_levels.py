"""benchmarks/noise_levels.py: the changed attributes against their definitions, the noise level
and training share formulas against their definitions (d' and a Monte Carlo of the shifted
draws), and the script on small clips."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from noise_levels import ATTRIBUTES, changed, main, share_above, sigma_at  # noqa: E402

from sparge_jax.sampling import shift_sigma, shifted_sigmas  # noqa: E402
from train.procedural import ClipSpec, draw_attributes, start_regions  # noqa: E402

SMALL = ["data.procedural.frames=4", "data.procedural.height=32", "data.procedural.width=32"]


def test_changed_changes_only_its_attribute():
    spec = ClipSpec(frames=4, height=32, width=32, start_region=True)
    for index in range(20):
        a = draw_attributes(spec, 0, "train", index)
        for attribute in ATTRIBUTES:
            b = changed(a, attribute, spec)
            differing = {k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))}
            expected = {"colour": {"colour"}, "shape": {"shape"}, "size change": {"change", "growth"},
                        "direction": {"direction", "velocity"}, "start region": {"position"}}[attribute]
            assert differing == expected, (attribute, differing)
        np.testing.assert_allclose(changed(a, "direction", spec)["velocity"][0], -a["velocity"][0], atol=1e-9)
        moved = changed(a, "start region", spec)
        assert start_regions(moved, spec)[0] % 3 == (start_regions(a, spec)[0] % 3 + 1) % 3  # next column
        assert start_regions(moved, spec)[0] // 3 == start_regions(a, spec)[0] // 3  # same row


@pytest.mark.parametrize("distance", [3.0, 86.0, 207.0])
def test_sigma_at_gives_the_asked_d_prime(distance):
    for d_prime in (1.0, 4.0):
        sigma = sigma_at(distance, d_prime)
        assert abs((1 - sigma) * distance / sigma - d_prime) < 1e-9


def test_share_above_matches_the_shifted_draws():
    u = np.random.default_rng(0).uniform(size=400_000)
    for shift in (1.0, 3.0, 12.0):
        draws = shift_sigma(u, shift)
        for sigma in (0.5, 0.95, 0.99):
            assert abs(share_above(sigma, shift) - (draws > sigma).mean()) < 3e-3


def test_script_on_small_clips(capsys):
    result = main([*SMALL, "--clips", "6", "--shifts", "1", "8"])  # overrides first: --shifts takes a list
    assert set(result) == set(ATTRIBUTES)
    for r in result.values():
        assert r["median_distance"] > 0 and r["sigma_4"] < r["sigma_1"] < 1
        assert r["share_above_sigma_1"][8] > r["share_above_sigma_1"][1] > 0
        assert r["steps_above_sigma_1"][8] == int((shifted_sigmas(20, 8)[:-1] > r["sigma_1"]).sum())
    assert "| attribute | shift 1 | shift 8 |" in capsys.readouterr().out
