"""Pieces shared by the Mosaic GPU forward (`flash_forward.py`) and backward
(`flash_backward.py`) kernels: the cases they cover, shared-memory tile layouts, the
register split between warpgroups, wgmma with an interpret-mode fallback, and the
interpret switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu.tma import hook_unavailable, is_ragged

ROWS = 64  # rows of one wgmma tile: one warpgroup's share of a block
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
HEAD_DIMS = (64, 128)
BLOCK_QS = (64, 128)
BLOCK_KS = (64,)


def unsupported_reason(q: jax.Array, k: jax.Array, block_q: int, block_k: int) -> str | None:
    """None when the kernels (forward and backward) handle the dtype, head_dim, lengths and
    mask blocks, else why not.

    Any sequence length: one that is not a multiple of 8 needs the TMA rounding hook of
    `pallas_kernels.mosaic_gpu.tma` (jax 0.11.2).
    """
    for name, seq in (("seq_q", q.shape[1]), ("seq_k", k.shape[1])):
        if is_ragged(seq) and (reason := hook_unavailable()) is not None:
            return f"{name}={seq} is not a multiple of 8 and {reason}"
    if jnp.dtype(q.dtype) not in DTYPES:
        return f"dtype {q.dtype} (needs bfloat16 or float16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (needs one of {HEAD_DIMS})"
    if block_q not in BLOCK_QS or block_k not in BLOCK_KS:
        return f"mask blocks ({block_q}, {block_k}) (needs block_q in {BLOCK_QS}, block_k in {BLOCK_KS})"
    return None


def check_supported(q: jax.Array, k: jax.Array, block_q: int, block_k: int, what: str) -> None:
    """Raise ValueError naming `what` ("forward" / "backward") and `unsupported_reason`, if any."""
    reason = unsupported_reason(q, k, block_q, block_k)
    if reason is not None:
        raise ValueError(f"mosaic_gpu {what} does not support {reason}")


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
