"""Input checks that turn bad shapes and dtypes into ValueErrors naming the argument."""

from __future__ import annotations

import jax.numpy as jnp

FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def check_qkv(q, k, v=None) -> None:
    """q `(batch, seq_q, heads, head_dim)`, k (and v, when given) `(batch, seq_k, heads, head_dim)`,
    one float dtype."""
    named = (("q", q), ("k", k)) + ((("v", v),) if v is not None else ())
    for name, x in named:
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 (batch, seq, heads, head_dim); got shape {x.shape}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be bfloat16, float16 or float32; got {x.dtype}")
        if 0 in x.shape:
            raise ValueError(f"{name} must have no empty dimension (batch, seq, heads, head_dim >= 1); got shape {x.shape}")
    b, _, h, d = q.shape
    expected = (b, k.shape[1], h, d)
    for name, x in named[1:]:
        if x.shape != expected:
            raise ValueError(
                f"{name} must have shape (batch, seq_k, heads, head_dim) = {expected} to match q {q.shape}; got {x.shape}"
            )
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}); got {x.dtype}")


def check_block_mask(mask, expected_shape: tuple[int, ...]) -> None:
    """A bool block mask of shape `(batch, heads, q_blocks, k_blocks)`."""
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(
            f"mask must have shape (batch, heads, q_blocks, k_blocks) = {tuple(expected_shape)}; got {tuple(mask.shape)}"
        )
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be bool; got {mask.dtype}")


def check_token_band(band, expected_shape: tuple[int, int]) -> None:
    """A `pallas_kernels.TokenBand` whose width and sink are integer arrays `(batch, heads)`."""
    for name in ("width", "sink"):
        x = getattr(band, name, None)
        if x is None or tuple(x.shape) != tuple(expected_shape) or not jnp.issubdtype(x.dtype, jnp.integer):
            got = None if x is None else f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
            raise ValueError(f"band.{name} must be an int array of shape (batch, heads) = {tuple(expected_shape)}; "
                             f"got {got}")
