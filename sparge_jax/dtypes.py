"""The one table of dtype names used by configs and CLIs (training, sampling, conversion)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# name -> dtype (NumPy dtypes: they serve jax, flax and NumPy alike).
DTYPES: dict[str, np.dtype] = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
# Short spellings the converter's --dtype takes.
SHORT_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp32": "float32"}


def dtype_named(name: str, *, argument: str = "dtype") -> np.dtype:
    """The dtype of `name` (a key of `DTYPES` or `SHORT_NAMES`); ValueError naming `argument`
    and the allowed names otherwise."""
    dtype = DTYPES.get(SHORT_NAMES.get(name, name)) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"{argument} must be one of {sorted(DTYPES) + sorted(SHORT_NAMES)}; got {name!r}")
    return dtype
