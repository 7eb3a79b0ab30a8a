"""The `tpu` backend: Pallas TPU block-sparse flash attention (see docs/kernels_tpu.md).

`forward(q, k, v, index, *, block_q, block_k, sm_scale, interpret)` -> (out, lse),
`backward(q, k, v, out, lse, dout, index, *, ...)` -> (dq, dk, dv),
`supports(q, k, block_q, block_k, interpret)` -> None or the reason it cannot run.
q `(batch, seq_q, heads, head_dim)`, k/v `(batch, seq_k, heads, head_dim)` in bf16,
fp16 or fp32; lse `(batch, heads, seq_q)` fp32. `interpret=True` runs the kernels in
the Pallas TPU interpreter on any device (CPU testing).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import tpu_backward, tpu_forward
from pallas_kernels.block_index import BlockIndex
from pallas_kernels.platform import target_platform
from pallas_kernels.reference import num_blocks

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


def _check_inputs(q, k, v, index: BlockIndex, block_q: int, block_k: int) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 (batch, seq, heads, head_dim); got shape {x.shape}")
    b, seq_q, h, d = q.shape
    expected = (b, k.shape[1], h, d)
    for name, x in (("k", k), ("v", v)):
        if x.shape != expected or x.dtype != q.dtype:
            raise ValueError(f"{name} must have shape {expected} and dtype {q.dtype}; got {x.shape} {x.dtype}")
    lists = (b, h, num_blocks(seq_q, block_q), num_blocks(k.shape[1], block_k))
    if index.kv_indices.shape != lists or index.q_indices.shape != (*lists[:2], lists[3], lists[2]):
        raise ValueError(
            f"index must hold kv_indices of shape (batch, heads, q_blocks, k_blocks) = {lists}; "
            f"got {index.kv_indices.shape}"
        )


def forward(q, k, v, index: BlockIndex, *, block_q: int, block_k: int, sm_scale: float, interpret: bool = False):
    """(out like q, lse `(batch, heads, seq_q)` fp32); rows with no kept block: out 0, lse -inf."""
    _check_inputs(q, k, v, index, block_q, block_k)
    return tpu_forward.forward(q, k, v, index, block_q=block_q, block_k=block_k, sm_scale=sm_scale, interpret=interpret)


def backward(q, k, v, out, lse, dout, index: BlockIndex, *, block_q: int, block_k: int, sm_scale: float,
             interpret: bool = False):
    """(dq, dk, dv) of `forward`, in the dtypes of q, k, v, over the kept blocks only."""
    _check_inputs(q, k, v, index, block_q, block_k)
    for name, x, shape in (("out", out, q.shape), ("dout", dout, q.shape), ("lse", lse, (q.shape[0], q.shape[2], q.shape[1]))):
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {shape}; got {x.shape}")
    return tpu_backward.backward(
        q, k, v, out, lse, dout, index, block_q=block_q, block_k=block_k, sm_scale=sm_scale, interpret=interpret
    )
