"""The `tpu` backend: Pallas TPU block-sparse flash attention (see docs/kernels_tpu.md).

`forward(q, k, v, index, *, block_q, block_k, sm_scale, interpret)` -> (out, lse),
`backward(q, k, v, out, lse, dout, index, *, ...)` -> (dq, dk, dv),
`supports(q, k, block_q, block_k, interpret)` -> None or the reason it cannot run.
q `(batch, seq_q, heads, head_dim)`, k/v `(batch, seq_k, heads, head_dim)` in bf16,
fp16 or fp32; lse `(batch, heads, seq_q)` fp32. `interpret=True` runs the kernels in
the Pallas TPU interpreter on any device (CPU testing). Kernels: `flash_forward.py`,
`flash_backward.py`, on the views and block specs of `tiles.py`. No fused block selection.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.backend import Backend, check_inputs
from pallas_kernels.block_index import BlockIndex
from pallas_kernels.platform import target_platform
from pallas_kernels.tpu import flash_backward, flash_forward

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
LANES = 128
SUBLANES = 8


def supports(q, k, block_q: int, block_k: int, interpret: bool = False) -> str | None:
    """None when the kernels can run these inputs, else the reason (TPU tiling rules or device)."""
    if not interpret and target_platform() != "tpu":
        return "no TPU device (pass interpret=True to run the TPU kernels in the interpreter)"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not bfloat16, float16 or float32"
    heads, head_dim = q.shape[2], q.shape[3]
    if head_dim % LANES and heads != 1:
        return f"head_dim {head_dim} is not a multiple of {LANES} (TPU lane tiling of one head's columns)"
    if block_q % LANES:
        return f"block_q {block_q} is not a multiple of {LANES} (lse/delta rows are lane-tiled)"
    sublanes = SUBLANES * 4 // jnp.dtype(q.dtype).itemsize
    if block_k % sublanes:
        return f"block_k {block_k} is not a multiple of {sublanes} (TPU sublane tiling for {q.dtype})"
    return None


def forward(q, k, v, index: BlockIndex, *, block_q: int, block_k: int, sm_scale: float, interpret: bool = False):
    """(out like q, lse `(batch, heads, seq_q)` fp32); rows with no kept block: out 0, lse -inf."""
    check_inputs(q, k, v, index, block_q, block_k)
    return flash_forward.forward(
        q, k, v, index, block_q=block_q, block_k=block_k, sm_scale=sm_scale, interpret=interpret
    )


def backward(q, k, v, out, lse, dout, index: BlockIndex, *, block_q: int, block_k: int, sm_scale: float,
             interpret: bool = False):
    """(dq, dk, dv) of `forward`, in the dtypes of q, k, v, over the kept blocks only."""
    check_inputs(q, k, v, index, block_q, block_k, out=out, lse=lse, dout=dout)
    return flash_backward.backward(
        q, k, v, out, lse, dout, index, block_q=block_q, block_k=block_k, sm_scale=sm_scale, interpret=interpret
    )


BACKEND = Backend(name="tpu", platform="tpu", supports=supports, forward=forward, backward=backward)
