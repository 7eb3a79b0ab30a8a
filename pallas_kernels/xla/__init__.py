"""The `xla` backend: block-sparse flash attention in jnp (`flash.py`), on any device.

The CPU default and the fallback of "auto" wherever a kernel backend cannot run a call.
It has no fused block selection (the masks layer's XLA path is the selection). It takes a
`TokenBand` (`band=`), masking tokens inside the kept blocks.
"""

from pallas_kernels.backend import Backend
from pallas_kernels.xla.flash import backward, forward


def supports(q, k, block_q: int, block_k: int, interpret: bool = False) -> str | None:
    """Always None: jnp runs every shape, dtype and block size on every device."""
    return None


BACKEND = Backend(name="xla", platform=None, supports=supports, forward=forward, backward=backward, token_band=True)

__all__ = ["BACKEND", "backward", "forward", "supports"]
