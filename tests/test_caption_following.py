"""benchmarks/caption_following.py: the colour tracker recovers the renderer's own motion (the
oracle: each clip's velocity), and the script runs end to end on small clips."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from caption_following import EAST, WEST, WIDE_CLIPS, main, motion_slope, captioned_attributes, with_direction  # noqa: E402

from train.procedural import COLOURS, render_attributes  # noqa: E402
from token_grid import teacher_config  # noqa: E402


def test_motion_slope_is_the_rendered_shapes_horizontal_speed():
    _, spec = teacher_config(list(WIDE_CLIPS))  # none of these shapes bounces in its first six frames
    singles = captioned_attributes(spec, 3)
    attrs = [with_direction(a, d) for d in (EAST, WEST) for a in singles]
    clips = np.asarray(render_attributes(attrs, spec))
    colours = list(COLOURS.values())
    for clip, a in zip(clips, attrs):
        speed = a["velocity"][0][0]
        assert abs(speed) > 1.0 and np.isclose(np.linalg.norm(a["velocity"][0]), abs(speed))
        # the shape keeps its colour and, these six frames, its course (no bounce): the centroid's slope
        np.testing.assert_allclose(motion_slope(clip, colours[int(a["colour"][0])]), speed, atol=0.15)
    assert np.isnan(motion_slope(clips[0], (1.0, 0.5, 0.0)))  # orange: in no shape and no background


def test_script_runs_on_small_clips(tmp_path, capsys):
    result = main(["--clips", "2", "--steps", "2", "--out", str(tmp_path), "data.procedural.height=64",
                   "data.procedural.width=64", "data.procedural.frames=8"])
    assert len(result["rows"]) == 2
    assert result["east_minus_west"]["rendered"] > 1.0
    saved = np.load(tmp_path / "caption_following.npz")
    assert saved["sampled"].shape == saved["rendered"].shape == (4, 8, 64, 64, 3)
    assert "mean east minus west" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--clips", "0"])
