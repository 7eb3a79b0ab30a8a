"""benchmarks/mosaic_gpu_backward_bench.py: its masks and its sweep table (the timings need a
Hopper GPU; `--interpret` runs its checks on CPU)."""

import numpy as np

from benchmark_scripts import load_benchmark

bench = load_benchmark("mosaic_gpu_backward_bench")


def test_band_mask_keeps_a_window_around_each_diagonal():
    nq, nk, kept = 7, 14, 5
    mask = np.asarray(bench.band_mask(1, 2, nq, nk, kept))
    assert mask.shape == (1, 2, nq, nk) and (mask.sum(-1) == kept).all()
    for i, row in enumerate(mask[0, 0]):
        cols = np.flatnonzero(row)
        assert (np.diff(cols) == 1).all(), i  # one contiguous window
        diagonal = i * bench.BLOCK_Q // bench.BLOCK_K
        assert cols[0] <= diagonal <= cols[-1], i
    assert mask[0, 0, 0, 0] and mask[0, 0, -1, -1]  # shifted inside the sequence at both ends


def test_sweep_table_reports_auto_against_the_faster_path():
    row = dict(N=75600, mask="band", sparsity=0.95, kept=59, auto_fused=False,
               split_bwd=0.011, fused_bwd=0.016, auto_bwd=0.0112)
    lines = bench.sweep_table([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[2].count("|")
    assert lines[2] == "| 75600 | band | 0.95 | 59 | 11.000 | 16.000 | 0.688x | 11.200 | split | 1.018 |"
