"""Launch shapes of the fused mask-prediction kernels (`pallas_kernels.triton.block_select`), on a GPU.

For each N and each setting (q blocks per `select_rows` program, warps per
select / transpose program, warps per `block_sums` program, k blocks per
`transpose_lists` program), the device time of each kernel of
one `predict_block_index` (SparseConfig defaults, all lists), from a profiler trace
(`benchmarks/mask_prediction.py --trace`). Each setting compiles the kernels anew.

The module's defaults are the fastest setting found at N=8192 on an H100 (RESULTS.md).

Usage: python benchmarks/block_select_tuning.py [--seq 8192] [--rows 16 32] [--warps 4 8]
       [--sum-warps 4] [--columns 8 16]
"""

from __future__ import annotations

import argparse
import itertools

from mask_prediction import device_kernel_times

from pallas_kernels.triton import block_select
from sparge_jax.config import SparseConfig

SETTINGS = ("ROWS_PER_PROGRAM", "NUM_WARPS", "SUM_WARPS", "COLUMNS_PER_PROGRAM")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--sum-warps", type=int, nargs="+", default=[4])
    parser.add_argument("--columns", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args()
    defaults = [getattr(block_select, name) for name in SETTINGS]
    lines = []
    for seq, *setting in itertools.product(args.seq, args.rows, args.warps, args.sum_warps, args.columns):
        for name, value in zip(SETTINGS, setting):
            setattr(block_select, name, value)
        kernels = {name: us for name, _, us in device_kernel_times(SparseConfig(), seq, 12, 128)}
        pick = lambda key: sum(us for name, us in kernels.items() if key in name)
        cells = [pick("select_rows"), pick("block_sums"), pick("transpose_lists"), sum(kernels.values())]
        lines.append(f"| {seq} | " + " | ".join(map(str, setting)) + " | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        print(lines[-1], flush=True)
    for name, value in zip(SETTINGS, defaults):
        setattr(block_select, name, value)
    print("\n| N | rows/program | warps | sum warps | columns/program | select_rows us | block_sums us | transpose_lists us | all kernels us |")
    print("|---" * 9 + "|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
