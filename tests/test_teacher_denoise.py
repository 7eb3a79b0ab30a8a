"""benchmarks/teacher_denoise.py on the shipped teacher at the demo size: the schedule below a
start level, and one Euler step from a partial noise level is the one-step x0 prediction (the
sampled latents and the prediction agree); the trained teacher denoises a half-noised clip far
closer to it than a sample from pure noise lands."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmark_scripts import load_benchmark


def test_schedule_below_a_start_level():
    script = load_benchmark("teacher_denoise")
    from sparge_jax.sampling import shifted_sigmas

    below = script.schedule_below(0.5, 20, 3.0)
    assert below[0] == 0.5 and below[-1] == 0.0 and np.all(np.diff(below) < 0)
    np.testing.assert_array_equal(below[1:], shifted_sigmas(20, 3.0)[shifted_sigmas(20, 3.0) < 0.5])
    np.testing.assert_array_equal(script.schedule_below(1.0, 20, 3.0), shifted_sigmas(20, 3.0))


@pytest.mark.matmul_precision("highest")
def test_one_euler_step_is_the_x0_prediction_and_partial_noise_denoises(tmp_path):
    script = load_benchmark("teacher_denoise")
    summary = script.main(["--out", str(tmp_path), "--size", "demo", "--clips", "1", "--starts", "0.5", "1.0",
                           "--steps", "1", "--solver", "euler"])
    half, pure = summary["levels"]
    assert (half["sigma"], half["steps"], pure["steps"]) == (0.5, 1, 1)
    np.testing.assert_allclose(half["sampled_mse"], half["one_step_x0_mse"], rtol=1e-5)
    assert half["sampled_mse"] < 0.2 * pure["sampled_mse"]
    assert (tmp_path / "teacher_denoise.png").stat().st_size > 0


def test_start_levels_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="--starts"):
        load_benchmark("teacher_denoise").main(["--out", str(tmp_path), "--starts", "0"])


def test_a_teacher_of_another_recipe_needs_its_config(tmp_path):
    # the shipped teacher's folder, its config.json saying it was trained without absolute positions
    weights = tmp_path / "other_recipe"
    shutil.copytree(Path(__file__).resolve().parents[1] / "train" / "teacher", weights)
    config = json.loads((weights / "config.json").read_text())
    (weights / "config.json").write_text(json.dumps({**config, "absolute_positions": False}))
    with pytest.raises(ValueError, match="absolute_positions False \\(weights\\) vs True"):
        load_benchmark("teacher_denoise").main(["--out", str(tmp_path), "--teacher", str(weights), "--size", "demo"])
