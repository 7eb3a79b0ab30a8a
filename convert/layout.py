"""Tensor layout changes between torch (original/diffusers) and flax params; NumPy only."""

from __future__ import annotations

import numpy as np

from convert.keys import CONV, LINEAR, SAME

_KINDS = (LINEAR, CONV, SAME)


def torch_to_flax(array: np.ndarray, kind: str) -> np.ndarray:
    """LINEAR: (out, in) -> (in, out); CONV: (out, in, t, h, w) -> (t, h, w, in, out); SAME: as is."""
    if kind == LINEAR:
        return np.ascontiguousarray(array.T)
    if kind == CONV:
        return np.ascontiguousarray(array.transpose(2, 3, 4, 1, 0))
    if kind == SAME:
        return array
    raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}")


def flax_to_torch(array: np.ndarray, kind: str) -> np.ndarray:
    """Inverse of `torch_to_flax`."""
    if kind == LINEAR:
        return np.ascontiguousarray(array.T)
    if kind == CONV:
        return np.ascontiguousarray(array.transpose(4, 3, 0, 1, 2))
    if kind == SAME:
        return np.ascontiguousarray(array)
    raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}")
