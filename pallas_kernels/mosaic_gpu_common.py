"""Pieces shared by the Mosaic GPU forward (`mosaic_gpu.py`) and backward
(`mosaic_gpu_backward.py`) kernels: shared-memory tile layouts, the register split between
warpgroups, wgmma with an interpret-mode fallback, and the interpret switch."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # rows of one wgmma tile: one warpgroup's share of a block


def tile_smem(shape, dtype):
    """Shared memory laid out for wgmma/TMA: (8, 128-byte) tiles with the 128-byte swizzle."""
    minor = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, minor)), plgpu.SwizzleTransform(128)))


def split_registers(num_compute: int, compute: bool) -> None:
    """Move registers from the memory warpgroup to the compute ones (only with 2 compute WGs)."""
    if num_compute == 2:
        if compute:
            plgpu.set_max_registers(232, action="increase")
        else:
            plgpu.set_max_registers(40, action="decrease")


def mma(acc, a, b_tile, a_tile) -> None:
    """acc += a @ b_tile with `a` a fp16/bf16 array: from registers on the GPU (`a_tile` None);
    staged through the shared-memory `a_tile` in interpret mode, whose wgmma reads A only from memory."""
    if a_tile is None:
        plgpu.wgmma(acc, a, b_tile)
        return
    a_tile[...] = a
    plgpu.commit_smem()
    plgpu.wgmma(acc, a_tile, b_tile)
    plgpu.wgmma_wait(0)


def staging_tiles(interpret: bool, count: int, shape, dtype):
    """Interpret mode only: `count` shared-memory tiles per compute warpgroup for wgmma A operands."""
    return tuple(tile_smem(shape, dtype) for _ in range(count)) if interpret else ()


def interpret_params(interpret: bool):
    """Pallas Mosaic GPU interpret-mode parameters when `interpret`, else None (compile for the GPU)."""
    return plgpu.InterpretGPUParams() if interpret else None
