"""TMA copies over a sequence axis whose length is not a multiple of 8 (Mosaic GPU, jax 0.11.2).

Mosaic GPU describes a swizzled TMA copy through (8, 128-byte) tiles laid over the whole
GMEM array, and refuses an axis whose length is not a multiple of 8. Its own
`Rounding.DOWN` mode (the descriptor covers the whole tiles only; rows past them read as
zeros, writes there are dropped) is what a ragged length needs, but Pallas does not let
a kernel ask for it. `install()` wraps Mosaic GPU's TMA set-up so that copies issued from
the kernels named in `RAGGED_KERNELS` (this package's attention kernels) use it; copies
from every other kernel are left exactly as they were.

Those kernels never move rows past the last whole tile through the main arrays: the
last, partial block of a ragged sequence is read from (or written to) a small zero-padded
side buffer (`last_block` / `merge_last_block`), so rounding down loses nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.reference import num_blocks

# Names of the kernel body functions whose TMA copies may round ragged axes down.
RAGGED_KERNELS = frozenset({"sparge_forward_kernel", "sparge_dq_kernel", "sparge_dkv_kernel"})
ROW_TILE = 8  # rows of one swizzled TMA tile

_installed = False


def _kernel_name(value) -> str | None:
    """sym_name of the `builtin.module` enclosing an MLIR value (the Pallas kernel's name)."""
    from jax._src.lib.mlir import ir

    node = value.owner
    for _ in range(64):
        if isinstance(node, ir.Block):
            node = node.owner
        op = getattr(node, "operation", node)
        if op.name == "builtin.module":
            return ir.StringAttr(op.attributes["sym_name"]).value if "sym_name" in op.attributes else None
        node = op.parent
        if node is None:
            return None
    return None


def install() -> str | None:
    """Install the wrapper (idempotent). None when in place, else why it cannot be."""
    global _installed
    if _installed:
        return None
    try:
        from jax.experimental.mosaic.gpu import launch_context as lc

        original = lc.LaunchContext._prepare_tma
        tile_transform, rounding = lc.TileTransform, lc.Rounding
    except (ImportError, AttributeError) as error:  # a jax other than the pinned 0.11.2
        return f"this jax has no Mosaic GPU TMA rounding hook ({error})"

    signature = inspect.signature(original)
    if "gmem_ref" not in signature.parameters or "gmem_transform" not in signature.parameters:
        return "this jax's Mosaic GPU TMA set-up has an unexpected signature"

    def prepare_tma(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if _kernel_name(bound.arguments["gmem_ref"]) in RAGGED_KERNELS:
            bound.arguments["gmem_transform"] = tuple(
                dataclasses.replace(t, rounding=rounding.DOWN)
                if isinstance(t, tile_transform) and t.rounding is None else t
                for t in bound.arguments["gmem_transform"]
            )
        return original(*bound.args, **bound.kwargs)

    lc.LaunchContext._prepare_tma = prepare_tma
    _installed = True
    return None


def bind_kernel(body, **params):
    """`body` with its static parameters bound, keeping its name: Pallas names the kernel
    module after it, which is how `install()` recognises the kernels in `RAGGED_KERNELS`."""
    return functools.update_wrapper(functools.partial(body, **params), body)


def is_ragged(seq: int) -> bool:
    """Whether a sequence axis of this length needs the side buffers (not a multiple of 8)."""
    return seq > ROW_TILE and seq % ROW_TILE != 0


def last_block(x: jax.Array, block: int) -> jax.Array:
    """The last (partial) block of `x` `(batch, seq, heads, d)`, zero-padded: `(batch, block, heads, d)`."""
    start = (num_blocks(x.shape[1], block) - 1) * block
    return jnp.pad(x[:, start:], ((0, 0), (0, start + block - x.shape[1]), (0, 0), (0, 0)))


def merge_last_block(x: jax.Array, last: jax.Array) -> jax.Array:
    """Write the real rows of `last` `(batch, block, heads, d)` over the last block of `x`.

    Both come from one kernel call; the optimization barrier keeps XLA's GPU dynamic-slice
    fusion from pulling that call into the update (it then reports a cycle)."""
    block = last.shape[1]
    start = (num_blocks(x.shape[1], block) - 1) * block
    x, last = lax.optimization_barrier((x, last))
    return lax.dynamic_update_slice_in_dim(x, last[:, : x.shape[1] - start], start, axis=1)


def _last_index(main, block: int) -> int:
    return num_blocks(main.shape[1], block) - 1


def load_rows(main, last, b, h, block_index, block: int, offset, rows: int, dst, barrier) -> None:
    """In-kernel TMA load of rows `[block_index * block + offset, + rows)` of head `h` of
    `main` `(batch, seq, heads, d)` into `dst`; from `last` (the zero-padded last block,
    `(batch, block, heads, d)`) when `block_index` is the last block and `last` is given."""
    def from_main():
        plgpu.copy_gmem_to_smem(main.at[b, pl.ds(block_index * block + offset, rows), h], dst, barrier)

    if last is None:
        from_main()
        return
    is_last = block_index == _last_index(main, block)
    pl.when(is_last)(lambda: plgpu.copy_gmem_to_smem(last.at[b, pl.ds(offset, rows), h], dst, barrier))
    pl.when(jnp.logical_not(is_last))(from_main)


def store_rows(src, main, last, b, h, block_index, block: int, offset, rows: int) -> None:
    """In-kernel TMA store of `src` to rows `[block_index * block + offset, + rows)` of head
    `h` of `main` (to `last` for the last block when given), not committed to a group."""
    def to_main():
        plgpu.copy_smem_to_gmem(src, main.at[b, pl.ds(block_index * block + offset, rows), h], commit_group=False)

    if last is None:
        to_main()
        return
    is_last = block_index == _last_index(main, block)
    pl.when(is_last)(lambda: plgpu.copy_smem_to_gmem(src, last.at[b, pl.ds(offset, rows), h], commit_group=False))
    pl.when(jnp.logical_not(is_last))(to_main)
