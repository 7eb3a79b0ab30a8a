"""Frozen configuration of block-sparse attention."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from pallas_kernels.blocks import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from pallas_kernels.dispatch import BACKENDS
from sparge_jax.method_config import ANY_METHOD, HeadMix, LayerMethods, MethodConfig, method_from_dict

MASK_RULES = ("topk", "topp", "hybrid")
TOPK_COUNTS = ("ceil", "floor")
TOPP_BOUNDARIES = ("include", "exclude")
SIMILARITIES = ("to_mean", "pairwise")
TAIL_BLOCKS = ("score", "never_similar")

PerHead = float | tuple[float, ...]


def check_fraction(name: str, value: PerHead | Sequence[float]) -> None:
    """Raise ValueError unless `value` (a float or one float per head) lies in (0, 1]."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    if len(values) == 0:
        raise ValueError(f"{name} must be a float in (0, 1] or a non-empty per-head tuple; got {value!r}")
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < float(x) <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1] (a float, or a tuple of shape (heads,)); got {value!r}")


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """How the block mask is predicted and how the kernel runs.

    rule: "topk", "topp" or "hybrid" (SpargeAttention2: union of the Top-k and Top-p sets).
    topk: fraction of k blocks kept per row by Top-k, in (0, 1]; a float or a tuple with one
      value per head.
    topp: cumulative pooled-probability mass kept per row by Top-p, in (0, 1]; float or per head.
    topk_count: "ceil" keeps ceil(topk * k_blocks) blocks (default); "floor" keeps
      int(topk * k_blocks) in float32, at least one (SpargeAttn's `topk`).
    topp_boundary: "include" (default) also keeps the block whose mass makes the cumulative
      sum reach topp, so the kept mass is >= topp; "exclude" keeps only the blocks whose
      cumulative sum stays <= topp, at least one (SpargeAttn's `cdfthreshd`).
    block_q, block_k: block sizes in tokens (q 128, k 64 by default).
    sim_threshold: SpargeAttn's self-similarity guard. Blocks whose tokens have a mean cosine
      similarity to the block mean below it are always computed (their whole row or column).
      None disables the guard.
    similarity: how the guard measures self-similarity. "to_mean" (default): mean cosine of
      the block's tokens to the block mean, rough when below sim_threshold. "pairwise":
      SpargeAttn's measure, the mean cosine over all token pairs of the block, smooth when
      above sim_threshold, and rough k blocks are left out of the pooled softmax.
    smooth_k: subtract the sequence mean of k before the self-similarity test (SpargeAttn's
      `smooth_k`); the pooled scores do not change (a constant shift per row).
    tail_block: a last block that holds fewer than block_q / block_k tokens. "score"
      (default): tested on its real tokens like any block; "never_similar": always rough,
      as SpargeAttn's kernels treat it (their zero padding turns the test into NaN).
    keep_diagonal: always keep the k blocks overlapping each q block's own tokens (self-attention).
    keep_first: always keep the first k block (attention sinks).
    sm_scale: softmax scale; None means 1/sqrt(head_dim).
    backend: "auto", "xla", "mosaic_gpu" or "tpu" (see pallas_kernels.dispatch).
    interpret: run Pallas kernels in interpret mode (CPU testing).
    method: the mask provider used by `sparge_jax.methods.method_attention`: None (or
      `Sparge2Method()`) for the rule above, or a config of `sparge_jax.method_config`
      (SpargeAttn, SLA, Sparse VideoGen, Radial, Sparse VideoGen2, a per-head `HeadMix`
      or a per-layer `LayerMethods`). `sparse_attention` itself ignores it.
    """

    rule: str = "hybrid"
    topk: PerHead = 0.1
    topp: PerHead = 0.9
    block_q: int = DEFAULT_BLOCK_Q
    block_k: int = DEFAULT_BLOCK_K
    topk_count: str = "ceil"
    topp_boundary: str = "include"
    sim_threshold: float | None = None
    similarity: str = "to_mean"
    smooth_k: bool = False
    tail_block: str = "score"
    keep_diagonal: bool = False
    keep_first: bool = False
    sm_scale: float | None = None
    backend: str = "auto"
    interpret: bool = False
    method: MethodConfig | HeadMix | LayerMethods | None = None

    def __post_init__(self):
        for name in ("topk", "topp"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            check_fraction(name, getattr(self, name))
        if self.rule not in MASK_RULES:
            raise ValueError(f"rule must be one of {MASK_RULES}; got {self.rule!r}")
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int (not a bool); got {value!r}")
        for name, allowed in (("topk_count", TOPK_COUNTS), ("topp_boundary", TOPP_BOUNDARIES),
                              ("similarity", SIMILARITIES), ("tail_block", TAIL_BLOCKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {self.backend!r}")
        if self.sim_threshold is not None and not -1.0 <= self.sim_threshold <= 1.0:
            raise ValueError(f"sim_threshold must lie in [-1, 1] or be None; got {self.sim_threshold!r}")
        if isinstance(self.method, dict):
            object.__setattr__(self, "method", method_from_dict(self.method))
        if self.method is not None and not isinstance(self.method, ANY_METHOD):
            raise ValueError(f"method must be None or a config from sparge_jax.method_config; got {self.method!r}")
        if self.sm_scale is not None and not self.sm_scale > 0:
            raise ValueError(f"sm_scale must be positive or None; got {self.sm_scale!r}")

    def replace(self, **changes) -> "SparseConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
