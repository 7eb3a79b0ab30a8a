"""benchmarks/caption_information.py: the split-half estimate of a grouping's between-group
variance against the known value of Gaussian groups (oracle: the means they were drawn around),
and the script on small clips."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from caption_information import between_group_share, main  # noqa: E402


def test_between_group_share_is_unbiased_for_gaussian_groups():
    gen = np.random.default_rng(0)
    pixels, per_half, sigma = 400, 30, 2.0
    centres = gen.standard_normal((3, pixels)) * np.array([[0.2], [0.5], [1.0]])
    share = np.array([0.2, 0.3, 0.5])
    counts = np.round(share[:, None] * np.array([[2 * per_half, 2 * per_half]])).astype(int)
    sums = np.stack([[(centres[g] + sigma * gen.standard_normal((counts[g, h], pixels))).sum(axis=0)
                      for h in range(2)] for g in range(3)])
    overall = (share[:, None] * centres).sum(axis=0)
    between = float((share * ((centres - overall) ** 2).mean(axis=1)).sum())
    estimate = between_group_share(sums, counts.astype(float), total_var=1.0)
    assert abs(estimate - between) < 0.1 * between, (estimate, between)
    # the plug-in estimate (one half's means, squared) is biased upwards by the noise: sigma^2 / n
    naive = float((share * ((sums[:, 0] / counts[:, :1] - sums[:, 0].sum(0) / counts[:, 0].sum()) ** 2).mean(1)).sum())
    assert naive - between > 0.05
    # a group with no clip in one half is left out
    counts[2, 1] = 0
    assert np.isfinite(between_group_share(sums, counts.astype(float), 1.0))


def test_script_runs_on_small_clips(capsys):
    shares = main(["--clips", "48", "data.procedural.height=64", "data.procedural.width=64", "data.procedural.frames=4"])
    assert set(shares) == {"colour", "shape", "size change", "direction", "start region", "direction | start region",
                           "start region | direction"}
    assert shares["colour"] > 0.0 and all(np.isfinite(v) for v in shares.values())
    assert "| direction | start region |" in capsys.readouterr().out
