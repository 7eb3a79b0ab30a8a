"""Rematerialisation of one DiT block that saves its input in a narrower dtype (`checkpoint_block`)."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

# fn(x, differentiable, fixed) -> output: x the block's input, `differentiable` a pytree of the
# other arrays the gradient flows to (params, embeddings), `fixed` one it does not (indices, keys).
BlockFn = Callable[[jax.Array, object, object], object]


def checkpoint_block(fn: BlockFn, saved_dtype) -> BlockFn:
    """`fn` rematerialised: its backward recomputes it from its inputs instead of keeping its
    intermediates. `saved_dtype` is the dtype x is kept in for that: one that holds x's values
    exactly (x's own, or a wider one, which would only add bytes: x is then kept as it is) gives
    `jax.checkpoint` (exact gradients). A narrower one (bfloat16 for the float32 residual stream:
    half the bytes) keeps x rounded to it: the forward's values are unchanged, but the backward
    recomputes `fn` at the rounded x, so the gradients are those at that point (each block
    input off by at most half a bf16 unit in the last place, 2^-9 relative). No gradient flows to
    `fixed` (its cotangent is zero)."""

    def call(x, differentiable, fixed):
        if jnp.promote_types(x.dtype, saved_dtype) == jnp.dtype(saved_dtype):
            return jax.checkpoint(fn, prevent_cse=False)(x, differentiable, fixed)
        # The custom VJP's function may close over no tracer (e.g. tables built inside the caller's
        # jit): those become arguments, differentiated like `differentiable`.
        closed, consts = jax.closure_convert(fn, x, differentiable, fixed)
        pure = lambda x, differentiable, fixed: closed(x, differentiable[0], fixed, *differentiable[1])  # noqa: E731
        return _rounded(pure, (jnp.dtype(saved_dtype), x.dtype), x, (differentiable, consts), fixed)

    return call


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rounded(fn, dtypes, x, differentiable, fixed):
    return fn(x, differentiable, fixed)


def _rounded_fwd(fn, dtypes, x, differentiable, fixed):
    # Residuals that are inputs (differentiable, fixed) are forwarded, not copied: inside a scan
    # a stacked param stays one array and a loop-invariant one is not stacked per step.
    return fn(x, differentiable, fixed), (x.astype(dtypes[0]), differentiable, fixed)


def _rounded_bwd(fn, dtypes, residuals, cotangent):
    saved, differentiable, fixed = residuals
    _, vjp = jax.vjp(lambda x, params: fn(x, params, fixed), saved.astype(dtypes[1]), differentiable)
    return (*vjp(cotangent), None)


_rounded.defvjp(_rounded_fwd, _rounded_bwd)
