"""The interface every kernel backend implements, and the input check they share.

A backend is a sub-package of `pallas_kernels` (`xla/`, `mosaic_gpu/`, `tpu/`) whose
`BACKEND` is a `Backend`; `pallas_kernels.dispatch` registers it. Shapes: q
`(batch, seq_q, heads, head_dim)`, k/v `(batch, seq_k, heads, head_dim)`, lse
`(batch, heads, seq_q)` fp32, `index` a `BlockIndex` of the
`(batch, heads, ceil(seq_q / block_q), ceil(seq_k / block_k))` block mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.block_index import BlockIndex
from pallas_kernels.blocks import num_blocks


@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """Fused block selection: q, k -> the kept-block lists of a pooled-score rule, in kernels.

    supports(q, k, block_q, block_k, interpret) -> None when the kernels take this call,
      else the reason (the masks layer then takes its XLA path).
    select_blocks(q, k, *, n_min, topp, block_q, block_k, sm_scale, keep_first,
      keep_diagonal, interpret) -> `BlockIndex`: per (batch, head, q block) the k blocks of
      `softmax(mean(q_block) mean(k_blocks)^T * sm_scale)` that Top-k (at least `n_min[h]`)
      and Top-p (mass `topp[h]`, 0 for none) keep, plus the forced first / diagonal blocks.
    """

    supports: Callable[..., str | None]
    select_blocks: Callable[..., BlockIndex]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One kernel backend.

    name: the `backend=` value that forces it.
    platform: the device platform ("gpu", "tpu") on which "auto" picks it; None for none.
    supports(q, k, block_q, block_k, interpret) -> None when forward and backward can run
      this call, else the reason ("auto" then falls back to the jnp backend).
    forward(q, k, v, index, *, block_q, block_k, sm_scale, interpret) -> (out like q, lse).
    backward(q, k, v, out, lse, dout, index, *, block_q, block_k, sm_scale, interpret)
      -> (dq, dk, dv) in the dtypes of q, k, v.
    selection: the fused block selection that runs where this backend runs, or None.
    token_band: whether forward and backward take `band=` (a `TokenBand` masking tokens
      inside the kept blocks); dispatch never hands a band to a backend without it.
    takes_fused: whether backward takes `fused=` (`check_fused`): a choice between a fused
      backward kernel and separate ones, which changes only speed; dispatch hands it only to
      backends with it (the others have one backward).
    """

    name: str
    platform: str | None
    supports: Callable[..., str | None]
    forward: Callable[..., tuple[jax.Array, jax.Array]]
    backward: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    selection: BlockSelection | None = None
    token_band: bool = False
    takes_fused: bool = False


def check_fused(fused, name: str = "fused") -> None:
    """Raise ValueError unless `fused` (the argument `name`) is True (one fused backward
    kernel), False (separate kernels) or None (auto: chosen per call)."""
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"{name} must be True (fused backward), False (split backward) or None (auto: chosen "
                         f"per call from the mask's density); got {fused!r}")


def check_inputs(q, k, v, index: BlockIndex, block_q: int, block_k: int, *, out=None, lse=None, dout=None) -> None:
    """Raise ValueError naming the first argument whose rank, shape or dtype does not fit q's
    (out/lse/dout: only when given, for a backward)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 (batch, seq, heads, head_dim); got shape {x.shape}")
    b, seq_q, h, d = q.shape
    seq_k = k.shape[1]
    like_k, like_q = (b, seq_k, h, d), q.shape
    for name, x, shape in (("k", k, like_k), ("v", v, like_k), ("out", out, like_q), ("dout", dout, like_q)):
        if x is None:
            continue
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {shape}; got {x.shape}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have dtype {q.dtype} (like q); got {x.dtype}")
    if lse is not None and (lse.shape != (b, h, seq_q) or lse.dtype != jnp.float32):
        raise ValueError(f"lse must have shape {(b, h, seq_q)} and dtype float32; got {lse.shape} {lse.dtype}")
    nq, nk = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    want = ((b, h, nq, nk), (b, h, nq), (b, h, nk, nq), (b, h, nk))
    got = tuple(x.shape for x in index)
    if got != want:
        raise ValueError(
            f"index must hold kv_indices {want[0]}, kv_counts {want[1]}, q_indices {want[2]} and "
            f"q_counts {want[3]} (batch={b}, heads={h}, q_blocks={nq}, k_blocks={nk}); got {got}"
        )
