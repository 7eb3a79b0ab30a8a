"""Fused block selection in Pallas Triton (`block_select.py`): q, k -> `BlockIndex` in three
kernels, on any GPU (or interpreted). The `mosaic_gpu` backend's `selection`.

`supports(q, k, block_q, block_k, interpret)` -> None or why the kernels do not take the
call; `select_blocks(q, k, *, n_min, topp, block_q, block_k, sm_scale, keep_first,
keep_diagonal, interpret)` -> `BlockIndex` (see `pallas_kernels.backend.BlockSelection`).
"""

from __future__ import annotations

import jax

from pallas_kernels.backend import BlockSelection
from pallas_kernels.block_index import BlockIndex
from pallas_kernels.blocks import num_blocks
from pallas_kernels.platform import target_platform
from pallas_kernels.triton import block_select


def supports(q: jax.Array, k: jax.Array, block_q: int, block_k: int, interpret: bool = False) -> str | None:
    """None on a GPU (or interpreted) for rows of at most `block_select.MAX_K_BLOCKS` k blocks
    and columns of at most `MAX_Q_BLOCKS` q blocks (padded to powers of two), power-of-two
    block sizes and head_dim; else the reason."""
    if not interpret and target_platform() != "gpu":
        return f"no GPU (computations run on {target_platform()!r})"
    nq, nk = num_blocks(q.shape[1], block_q), num_blocks(k.shape[1], block_k)
    if block_select.padded_blocks(nk) > block_select.MAX_K_BLOCKS:
        return f"{nk} k blocks (rows of at most {block_select.MAX_K_BLOCKS})"
    if block_select.padded_blocks(nq) > block_select.MAX_Q_BLOCKS:
        return f"{nq} q blocks (columns of at most {block_select.MAX_Q_BLOCKS})"
    if not (block_select.is_power_of_two(block_q) and block_select.is_power_of_two(block_k)):
        return f"mask blocks ({block_q}, {block_k}) are not powers of two"
    if not block_select.supports_head_dim(q.shape[-1]):
        return f"head_dim {q.shape[-1]} is not a power of two >= 16"
    return None


def select_blocks(q: jax.Array, k: jax.Array, *, n_min: tuple, topp: tuple, block_q: int, block_k: int,
                  sm_scale: float, keep_first: bool, keep_diagonal: bool, interpret: bool = False) -> BlockIndex:
    """The kept-block lists of pooled-score Top-k/Top-p selection, by the three kernels.

    q `(batch, seq_q, heads, d)`, k `(batch, seq_k, heads, d)`; n_min / topp: per-head
    tuples (see `block_select.select_rows`). Lists are cropped from the kernels' padded
    block counts to the real ones."""
    seq_q, seq_k = q.shape[1], k.shape[1]
    nq, nk = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    sums = block_select.block_sums(q, k, block_q=block_q, block_k=block_k, interpret=interpret)
    kv_indices, kv_counts, mask = block_select.select_rows(
        *sums, n_min=n_min, topp=topp, seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k,
        sm_scale=sm_scale, keep_first=keep_first, keep_diagonal=keep_diagonal, interpret=interpret,
    )
    q_indices, q_counts = block_select.transpose_lists(mask, interpret=interpret)
    return BlockIndex(kv_indices[:, :, :nq, :nk], kv_counts[:, :, :nq],
                      q_indices[:, :, :nk, :nq], q_counts[:, :, :nk])


SELECTION = BlockSelection(supports=supports, select_blocks=select_blocks)
