"""One forward+backward of the block-sparse kernels and of cuDNN dense attention per
sequence length, for a hardware-counter profile under Nsight Compute.

Each (N, sparsity) runs `block_sparse_attention` (Mosaic GPU) forward+backward once and,
with --dense, cuDNN's once (B=1, H=12, D=128, bf16, random masks of fixed density as in
`benchmarks/attention.py`). Run it under ncu, e.g.

  ncu --clock-control none -k regex:'sparge|cudnn|sdpa' --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats \
      python benchmarks/ncu_attention.py --seq 32760 75600 --sparsity 0 --dense

Without ncu it only checks that the calls run.
"""

from __future__ import annotations

import argparse

import jax
from attention import BLOCK_K, BLOCK_Q, dense_fns, fixed_density_mask, kept_blocks, random_inputs, sparse_fns

from pallas_kernels.block_index import mask_to_block_index
from pallas_kernels.blocks import default_sm_scale, num_blocks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[32760, 75600])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0])
    parser.add_argument("--dense", action="store_true", help="also run cuDNN dense forward+backward")
    args = parser.parse_args()
    heads, head_dim = 12, 128
    scale = default_sm_scale(head_dim)
    _, sparse_fwd_bwd = sparse_fns(scale)
    _, dense_fwd_bwd = dense_fns(scale)
    for seq in args.seq:
        q, k, v, do, mask_key = random_inputs(seq, heads, head_dim)
        nq, nk = num_blocks(seq, BLOCK_Q), num_blocks(seq, BLOCK_K)
        for sparsity in args.sparsity:
            index = mask_to_block_index(fixed_density_mask(mask_key, heads, nq, nk, kept_blocks(nk, sparsity)))
            jax.block_until_ready(sparse_fwd_bwd(q, k, v, do, index))
            print(f"N={seq} sparsity={sparsity:g}: sparse fwd+bwd ran", flush=True)
        if args.dense:
            jax.block_until_ready(dense_fwd_bwd(q, k, v, do))
            print(f"N={seq}: cuDNN fwd+bwd ran", flush=True)


if __name__ == "__main__":
    main()
