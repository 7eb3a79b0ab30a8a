"""The one entry point to the block-sparse attention kernels: picks a backend.

Every backend module exposes
  forward(q, k, v, index, *, block_q, block_k, sm_scale, interpret) -> (out, lse)
  backward(q, k, v, out, lse, dout, index, *, block_q, block_k, sm_scale, interpret) -> (dq, dk, dv)
  supports(q, k, block_q, block_k, interpret) -> str | None   (None when supported, else the reason)
with q `(batch, seq_q, heads, head_dim)`, k/v `(batch, seq_k, heads, head_dim)`,
lse `(batch, heads, seq_q)` fp32, and `index` a `BlockIndex`.

Backends: "xla" (jnp, any device), "mosaic_gpu" (Hopper), "tpu". "auto" picks from
the device of the default backend; an unsupported case falls back to "xla" with a
one-time warning.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import jax

from pallas_kernels import xla_sparse
from pallas_kernels.block_index import BlockIndex
from pallas_kernels.platform import target_platform
from pallas_kernels.reference import clamp_block

BACKENDS = ("auto", "xla", "mosaic_gpu", "tpu")
_MODULES = {"xla": "pallas_kernels.xla_sparse", "mosaic_gpu": "pallas_kernels.mosaic_gpu", "tpu": "pallas_kernels.tpu"}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(_MODULES[name])
    except ModuleNotFoundError:
        return None


def _device_backend() -> str:
    platform = target_platform()
    if platform == "gpu":
        return "mosaic_gpu"
    if platform == "tpu":
        return "tpu"
    return "xla"


def resolve_backend(backend: str, q: jax.Array, k: jax.Array, block_q: int, block_k: int, interpret: bool) -> ModuleType:
    """Backend module for this call. Forced backends that cannot run raise; "auto" falls back."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    name = _device_backend() if backend == "auto" else backend
    if name == "xla":
        return xla_sparse
    module = _load(name)
    reason = "not built into this installation" if module is None else module.supports(q, k, block_q, block_k, interpret)
    if reason is None:
        return module
    if backend == "auto":
        _warn_once(f"sparse attention backend {name!r} unavailable ({reason}); falling back to 'xla'")
        return xla_sparse
    raise ValueError(f"backend={backend!r} cannot run this call: {reason}")


def _kernel_kwargs(module: ModuleType, block_q: int, block_k: int, sm_scale: float, interpret: bool) -> dict:
    kwargs = dict(block_q=block_q, block_k=block_k, sm_scale=sm_scale)
    if module is not xla_sparse:
        kwargs["interpret"] = interpret
    return kwargs


def forward(q, k, v, index: BlockIndex, *, block_q, block_k, sm_scale, backend="auto", interpret=False):
    """Block-sparse attention forward: (out, lse). Block sizes above the padded sequence are clamped."""
    block_q, block_k = clamp_block(block_q, q.shape[1]), clamp_block(block_k, k.shape[1])
    module = resolve_backend(backend, q, k, block_q, block_k, interpret)
    return module.forward(q, k, v, index, **_kernel_kwargs(module, block_q, block_k, sm_scale, interpret))


def backward(q, k, v, out, lse, dout, index: BlockIndex, *, block_q, block_k, sm_scale, backend="auto", interpret=False):
    """Block-sparse attention backward: (dq, dk, dv). Block sizes above the padded sequence are clamped."""
    block_q, block_k = clamp_block(block_q, q.shape[1]), clamp_block(block_k, k.shape[1])
    module = resolve_backend(backend, q, k, block_q, block_k, interpret)
    return module.backward(
        q, k, v, out, lse, dout, index, **_kernel_kwargs(module, block_q, block_k, sm_scale, interpret)
    )
