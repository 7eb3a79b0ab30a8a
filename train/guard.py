"""Host side of the non-finite guard: count the steps the jitted step skipped (NaN/inf loss or
gradients), report each with the examples holding non-finite data, stop after too many in a row."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had non-finite loss or gradients."""


class SkipTracker:
    """Counts skipped steps (`total`, and `consecutive` ones ending at the last step seen).

    limit: `guard.max_consecutive_skips`; the limit-th skipped step in a row raises NonFiniteError."""

    def __init__(self, limit: int, total: int = 0, consecutive: int = 0):
        self.limit, self.total, self.consecutive = limit, total, consecutive

    def state(self) -> dict:
        """JSON-able counts (stored in checkpoint metadata, restored with `SkipTracker(limit, **state)`)."""
        return {"total": self.total, "consecutive": self.consecutive}

    def record(self, step: int, skipped: bool, bad_examples: Callable[[], list[str]]) -> str | None:
        """Note optimizer step `step` (1-based: the step just done). Returns a one-line report
        when it was skipped (None otherwise); raises NonFiniteError at the limit.
        bad_examples() names the step's examples with non-finite data (called only on a skip)."""
        if not skipped:
            self.consecutive = 0
            return None
        self.total += 1
        self.consecutive += 1
        found = bad_examples()
        cause = f"non-finite data in {'; '.join(found)}" if found else "no non-finite input data: the model diverged"
        line = (f"step {step}: non-finite loss or gradients, update skipped ({cause}); "
                f"{self.consecutive} in a row, {self.total} in all")
        if self.consecutive >= self.limit:
            raise NonFiniteError(f"{line}; stopping at guard.max_consecutive_skips={self.limit} "
                                 f"(params and checkpoints hold the last finite state)")
        return line


def all_finite(tree) -> bool:
    """Whether every floating leaf of a pytree of jax Arrays is free of NaN/inf (one device
    reduction; the answer is replicated, so every process gets the same bool)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return True
    return bool(np.asarray(_all_finite(leaves).addressable_data(0)))


_all_finite = jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))
