"""benchmarks/place_learning.py: the toy clips against their definition (the named cell of a 3 x 3
grid is 1, the rest 0), and the script for a few steps (both variants start from the same
weights, so their step-0 losses are equal; a curriculum whose pure-noise steps cover the run is
pure-noise training)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from place_learning import clips, main  # noqa: E402


def test_clips_fill_the_named_cell():
    x = clips(np.array([0, 4, 8, 5]), grid=6)  # 12 x 12 latent cells: 4 x 4 per grid cell
    assert x.shape == (4, 1, 12, 12, 4)
    for i, (rows, cols) in enumerate([(slice(0, 4), slice(0, 4)), (slice(4, 8), slice(4, 8)),
                                      (slice(8, 12), slice(8, 12)), (slice(4, 8), slice(8, 12))]):
        expected = np.zeros((12, 12))
        expected[rows, cols] = 1
        np.testing.assert_array_equal(x[i, 0, :, :, 0], expected)
        np.testing.assert_array_equal(x[i, 0, :, :, 3], expected)


@pytest.mark.slow
def test_script_runs_both_variants_from_the_same_start_and_scores_them_at_pure_noise(capsys):
    pure = main(["--steps", "50", "--grid", "3"])
    assert set(pure) == {"relative positions only", "coordinate channels"}
    plain, placed = pure.values()
    assert len(plain) == 2 and abs(plain[0] - placed[0]) < 1e-3 * plain[0] and plain[0] > 1.0  # untrained: worse than the blind mean
    assert plain[1] < plain[0] and placed[1] < placed[0]
    assert "| step | relative positions only | coordinate channels |" in capsys.readouterr().out
    # a curriculum whose pure-noise steps are all of the run is pure-noise training, scored the same way
    curriculum = main(["--steps", "50", "--grid", "3", "--shift", "3", "--pure-steps", "50"])
    for name in pure:
        np.testing.assert_allclose(curriculum[name], pure[name], rtol=1e-5)
    assert "at noise levels of the schedule with shift 3, after 50 steps at pure noise)" in capsys.readouterr().out
    for bad in (["--shift", "0"], ["--pure-share", "0.5"], ["--shift", "3", "--pure-share", "2"]):
        with pytest.raises(SystemExit):
            main(bad)
