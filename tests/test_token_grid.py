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
    assert frames.shape == (64, 128, 128, 3) and frames.dtype == np.uint8
    for token_ratio, cell_ratio in grid.grid_step_ratios(frames).values():
        assert 0.85 < token_ratio < 1.25 and 0.85 < cell_ratio < 1.15
