"""TMA copies over a sequence axis whose length is not a multiple of 8 (Mosaic GPU).

Mosaic GPU describes a swizzled TMA copy through (8, 128-byte) tiles laid over the whole
GMEM array, and refuses an axis whose length is not a multiple of 8. Its own
`Rounding.DOWN` mode (the descriptor covers the whole tiles only; rows past them read as
zeros, writes there are dropped) is what a ragged length needs, but Pallas does not let
a kernel ask for it. `install()` wraps Mosaic GPU's TMA set-up so that copies issued from
the kernels named in `RAGGED_KERNELS` (this package's attention kernels) use it; copies
from every other kernel are left exactly as they were. The kernel builders
(`flash_forward.forward`, `flash_backward._dq` / `_dkv`) call it when a length is ragged.

Which jax needs it: every jax the kernels have run on. Mosaic GPU's `TileTransform` has
taken a `rounding` since jax 0.5.1, but the Pallas copies (`plgpu.copy_gmem_to_smem`,
`copy_smem_to_gmem`) pass none, up to jax 0.11.2 (the pinned version; checked in its
source, and in jax's main branch of 2026-08-08). The wrapper hooks the private
`LaunchContext._prepare_tma(gmem_ref=..., gmem_transform=...)` of jax 0.11.x; in a jax
without it `hook_unavailable()` says why, the kernels then refuse ragged lengths
(`supports` reports it) and `install()` raises. Once Pallas takes a rounding mode, pass it
from `load_rows` / `store_rows` and delete this hook.

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

from pallas_kernels.blocks import num_blocks

# Names of the kernel body functions whose TMA copies may round ragged axes down.
RAGGED_KERNELS = frozenset({"sparge_forward_kernel", "sparge_dq_kernel", "sparge_dkv_kernel", "sparge_dqkv_kernel"})
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


def _launch_context():
    """jax's Mosaic GPU `launch_context` module; RuntimeError when its TMA set-up cannot be wrapped."""
    try:
        from jax.experimental.mosaic.gpu import launch_context as lc

        prepare_tma, _, _ = lc.LaunchContext._prepare_tma, lc.TileTransform, lc.Rounding
    except (ImportError, AttributeError) as error:  # a jax other than 0.11.x
        raise RuntimeError(f"this jax has no Mosaic GPU TMA rounding hook ({error})") from None
    parameters = inspect.signature(prepare_tma).parameters
    if "gmem_ref" not in parameters or "gmem_transform" not in parameters:
        raise RuntimeError("this jax's Mosaic GPU TMA set-up has an unexpected signature")
    return lc


def hook_unavailable() -> str | None:
    """None when `install()` can wrap this jax's TMA set-up (or has), else why not. Installs nothing."""
    if _installed:
        return None
    try:
        _launch_context()
    except RuntimeError as error:
        return str(error)
    return None


def install() -> None:
    """Wrap Mosaic GPU's TMA set-up (idempotent; affects only the `RAGGED_KERNELS`).
    Raises RuntimeError with `hook_unavailable()`'s reason in a jax that has no such hook."""
    global _installed
    if _installed:
        return
    lc = _launch_context()
    original = lc.LaunchContext._prepare_tma
    signature = inspect.signature(original)

    def prepare_tma(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if _kernel_name(bound.arguments["gmem_ref"]) in RAGGED_KERNELS:
            bound.arguments["gmem_transform"] = tuple(
                dataclasses.replace(t, rounding=lc.Rounding.DOWN)
                if isinstance(t, lc.TileTransform) and t.rounding is None else t
                for t in bound.arguments["gmem_transform"]
            )
        return original(*bound.args, **bound.kwargs)

    lc.LaunchContext._prepare_tma = prepare_tma
    _installed = True


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
