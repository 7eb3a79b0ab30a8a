"""Tensor layout changes between torch (original/diffusers) and flax params; NumPy only."""

from __future__ import annotations

import numpy as np

from convert.keys import CONV, CONV2D, LINEAR, SAME, VECTOR

_KINDS = (LINEAR, CONV, CONV2D, VECTOR, SAME)


def torch_to_flax(array: np.ndarray, kind: str) -> np.ndarray:
    """LINEAR: (out, in) -> (in, out); CONV: (out, in, t, h, w) -> (t, h, w, in, out); CONV2D:
    (out, in, h, w) -> (h, w, in, out); VECTOR: (n, 1, ...) -> (n,); SAME: as is."""
    if kind == LINEAR:
        return np.ascontiguousarray(array.T)
    if kind == CONV:
        return np.ascontiguousarray(array.transpose(2, 3, 4, 1, 0))
    if kind == CONV2D:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if kind == VECTOR:
        return array.reshape(array.shape[0])
    if kind == SAME:
        return array
    raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}")


def flax_to_torch(array: np.ndarray, kind: str) -> np.ndarray:
    """Inverse of `torch_to_flax`, except that VECTOR gives (n,) (reshape it to the torch shape)."""
    if kind == LINEAR:
        return np.ascontiguousarray(array.T)
    if kind == CONV:
        return np.ascontiguousarray(array.transpose(4, 3, 0, 1, 2))
    if kind == CONV2D:
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    if kind == VECTOR:
        return np.ascontiguousarray(array)
    if kind == SAME:
        return np.ascontiguousarray(array)
    raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}")
