"""benchmarks/token_grid.py: pixel steps across token and cell boundaries against steps inside
cells, on frames built with known steps, and on rendered held-out clips (no grid)."""

import numpy as np
import pytest

from benchmark_scripts import load_benchmark

grid = load_benchmark("token_grid")


def test_ratios_of_frames_with_known_steps():
    """A ramp (step 1 between all neighbours) plus an offset of 3 per 8-pixel token along the
    columns and 0.5 per 4-pixel cell along the rows: token steps 4 and cell steps 1 (cols), token
    and cell steps 1.5 (rows: an 8-pixel token boundary is also a cell boundary), inside steps 1."""
    y, x = np.meshgrid(np.arange(32.0), np.arange(24.0), indexing="ij")
    image = x + y + 3.0 * (x // 8) + 0.5 * (y // 4)
    frames = np.repeat(image[None, :, :, None], 2, axis=0).repeat(3, axis=-1)  # (2, 32, 24, 3)
    ratios = grid.grid_step_ratios(frames, token=8, cell=4)
    assert ratios["cols"] == pytest.approx((4.0, 1.0))
    assert ratios["rows"] == pytest.approx((1.5, 1.5))
    with pytest.raises(ValueError, match="token .* multiple of cell"):
        grid.grid_step_ratios(frames, token=6, cell=4)


def test_rendered_clips_have_no_token_grid():
    frames = grid.heldout_and_samples(4)["held-out clips"]
    assert frames.shape == (64, 64, 64, 3) and frames.dtype == np.uint8
    for token_ratio, cell_ratio in grid.grid_step_ratios(frames).values():
        assert 0.85 < token_ratio < 1.25 and 0.85 < cell_ratio < 1.15


def test_prediction_errors_of_known_offsets():
    """A prediction that keeps 0.4 of the noise's per-token mean (broadcast over the token's
    2 x 2 cells and channels) has all its error energy in token means and a DC leak of 0.4; one
    whose error has zero mean in every token has none of either; their sum keeps both."""
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(2, 3, 4, 6, 5))
    noise = rng.normal(size=x0.shape)
    s = 0.3
    offset = np.repeat(np.repeat(grid.token_means(noise), 2, axis=2), 2, axis=3)[..., None]
    offset = np.broadcast_to(offset, x0.shape)
    inside = rng.normal(size=x0.shape)
    inside -= np.repeat(np.repeat(grid.token_means(inside), 2, axis=2), 2, axis=3)[..., None]
    kept = grid.prediction_errors(x0, noise, x0 + 0.4 * s * offset, s)
    assert kept["token_share"] == pytest.approx(1.0) and kept["dc_leak"] == pytest.approx(0.4)
    assert kept["mse"] == pytest.approx(np.mean((0.4 * s * offset) ** 2))
    flat = grid.prediction_errors(x0, noise, x0 + inside, s)
    assert flat["token_share"] == pytest.approx(0.0, abs=1e-12) and flat["dc_leak"] == pytest.approx(0.0, abs=1e-12)
    both = grid.prediction_errors(x0, noise, x0 + 0.4 * s * offset + inside, s)
    energy = np.sum((0.4 * s * offset) ** 2)
    assert both["dc_leak"] == pytest.approx(0.4)
    assert both["token_share"] == pytest.approx(energy / (energy + np.sum(inside ** 2)))


def test_bad_prediction_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        grid.main(["--predict", "1", "--levels", "0", "0.5"])
    assert "--levels must lie in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grid.main(["--predict", "1", "--weights", "/nonexistent"])
    assert "--weights: no teacher" in capsys.readouterr().err
