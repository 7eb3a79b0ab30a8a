"""The one entry point to the block-sparse attention kernels: picks a backend.

Backends are the `BACKEND`s (`pallas_kernels.backend.Backend`) of the sub-packages in
`_REGISTRY`: "xla" (jnp, any device), "mosaic_gpu" (Hopper), "tpu". "auto" picks the
backend whose `platform` is the device's (`target_platform()`), else "xla"; a call that
backend cannot run falls back to "xla" with a one-time warning (so does a call with a
`TokenBand` on a backend whose `token_band` is False). A forced backend that cannot run the
call raises. `backward(fused=...)` reaches only backends whose `takes_fused` is True (today
"mosaic_gpu"); the others have one backward and ignore it.
"""

from __future__ import annotations

import warnings

import jax

from pallas_kernels import mosaic_gpu, tpu, xla
from pallas_kernels.backend import Backend, BlockSelection, check_fused
from pallas_kernels.block_index import BlockIndex, TokenBand
from pallas_kernels.blocks import clamp_block
from pallas_kernels.platform import target_platform

_REGISTRY = {backend.name: backend for backend in (xla.BACKEND, mosaic_gpu.BACKEND, tpu.BACKEND)}
_FALLBACK = xla.BACKEND  # runs every call on every device
BACKENDS = ("auto", *_REGISTRY)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _named(backend: str) -> Backend:
    """The backend `backend` names ("auto": the device's, else the fallback), before any capability check."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend != "auto":
        return _REGISTRY[backend]
    platform = target_platform()
    return next((b for b in _REGISTRY.values() if b.platform == platform), _FALLBACK)


def resolve_backend(backend: str, q: jax.Array, k: jax.Array, block_q: int, block_k: int, interpret: bool,
                    band: TokenBand | None = None) -> Backend:
    """Backend for this call. Forced backends that cannot run raise; "auto" falls back."""
    chosen = _named(backend)
    if band is not None and not chosen.token_band:
        reason = "no token-level band (TokenBand) masking in its kernels"
    else:
        reason = chosen.supports(q, k, block_q, block_k, interpret)
    if reason is None:
        return chosen
    if backend == "auto":
        _warn_once(f"sparse attention backend {chosen.name!r} unavailable ({reason}); falling back to {_FALLBACK.name!r}")
        return _FALLBACK
    raise ValueError(f"backend={backend!r} cannot run this call: {reason}")


def resolve_selection(
    backend: str, q: jax.Array, k: jax.Array, block_q: int, block_k: int, interpret: bool
) -> BlockSelection | None:
    """The fused block selection of the backend `backend` names, when it has one that takes
    this call; else None (the masks layer then selects in XLA). Independent of whether that
    backend's attention kernels take the call: the selection has its own `supports`."""
    selection = _named(backend).selection
    if selection is None or selection.supports(q, k, block_q, block_k, interpret) is not None:
        return None
    return selection


def _band_kwargs(band: TokenBand | None) -> dict:
    """`band=` only when there is one, so backends without token bands keep their signature."""
    return {} if band is None else {"band": band}


def forward(q, k, v, index: BlockIndex, *, block_q, block_k, sm_scale, backend="auto", interpret=False,
            band: TokenBand | None = None):
    """Block-sparse attention forward: (out, lse). Block sizes above the padded sequence are clamped.
    band: optional `TokenBand` masking tokens inside the kept blocks."""
    block_q, block_k = clamp_block(block_q, q.shape[1]), clamp_block(block_k, k.shape[1])
    chosen = resolve_backend(backend, q, k, block_q, block_k, interpret, band)
    return chosen.forward(q, k, v, index, block_q=block_q, block_k=block_k, sm_scale=sm_scale, interpret=interpret,
                          **_band_kwargs(band))


def backward(q, k, v, out, lse, dout, index: BlockIndex, *, block_q, block_k, sm_scale, backend="auto", interpret=False,
             band: TokenBand | None = None, fused: bool | None = None):
    """Block-sparse attention backward: (dq, dk, dv). Block sizes above the padded sequence are clamped.
    fused: True / False force a backend's fused / split backward kernels, None lets it choose
    per call (`pallas_kernels.mosaic_gpu.flash_backward.backward`); backends with one backward
    ignore it (`Backend.takes_fused`)."""
    check_fused(fused)
    block_q, block_k = clamp_block(block_q, q.shape[1]), clamp_block(block_k, k.shape[1])
    chosen = resolve_backend(backend, q, k, block_q, block_k, interpret, band)
    return chosen.backward(
        q, k, v, out, lse, dout, index, block_q=block_q, block_k=block_k, sm_scale=sm_scale, interpret=interpret,
        **_band_kwargs(band), **({"fused": fused} if chosen.takes_fused else {})
    )
