"""The `mosaic_gpu` backend: Mosaic GPU (Hopper) block-sparse flash attention.

Kernels: `flash_forward.py` (forward), `flash_backward.py` (dQ and dK/dV, or fused dQ/dK/dV:
its `backward` takes `fused=`, see `pallas_kernels.backend.Backend.takes_fused`), on the pieces
of `common.py` and the ragged-length TMA copies of `tma.py`; block selection: the Triton
kernels of `pallas_kernels.triton`. See docs/kernels.md and docs/kernels_backward.md.
"""

from __future__ import annotations

import jax

from pallas_kernels import triton
from pallas_kernels.backend import Backend
from pallas_kernels.mosaic_gpu.common import unsupported_reason
from pallas_kernels.mosaic_gpu.flash_backward import backward
from pallas_kernels.mosaic_gpu.flash_forward import forward
from pallas_kernels.platform import target_platform


def supports(q: jax.Array, k: jax.Array, block_q: int, block_k: int, interpret: bool = False) -> str | None:
    """None when the Mosaic GPU kernels (forward and backward) can run this call, else why not."""
    if not interpret:
        if target_platform() != "gpu":
            return f"no GPU (computations run on {target_platform()!r})"
        device = jax.devices()[0]
        capability = str(getattr(device, "compute_capability", ""))
        if not capability.startswith("9."):
            return f"needs a Hopper GPU (compute capability 9.x); found {device.device_kind} ({capability or '?'})"
    return unsupported_reason(q, k, block_q, block_k)


BACKEND = Backend(
    name="mosaic_gpu", platform="gpu", supports=supports, forward=forward, backward=backward,
    selection=triton.SELECTION, takes_fused=True,
)

__all__ = ["BACKEND", "backward", "forward", "supports"]
