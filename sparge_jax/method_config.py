"""Frozen configurations of the sparse-attention methods (mask providers), one per method.

Each class holds all of one method's parameters (SpargeAttention2's rule included);
`sparge_jax.masks.providers` turns a method config plus q, k (and the latent grid for
video-aware methods) and a `sparge_jax.config.KernelConfig` into an `AttentionPlan`.
`HeadMix` gives each head its own method; `LayerMethods` gives each layer its own. Every
config subclasses `Method`, which registers it under its `kind` tag; build one from a dict with
`sparge_jax.config_builder.build_config(Method, fields)`. A method defined elsewhere (a config
subclassing `Method` plus a provider registered with
`sparge_jax.masks.providers.register_provider`) works everywhere these do.

The fraction fields (`Sparge2Method.topk` / `topp`, `SpargeAttnMethod.cdf_threshold` / `topk`,
`SVG2Method.topp`) may hold a traced value inside `jax.jit` (range-checked only where
concrete), so a jitted function can take such a knob as an argument and evaluate masks for
many values from one compile (`benchmarks/quality.py` bisects its knobs so). The GPU's fused
SpargeAttention2 selection needs concrete values.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import jax

FEATURE_MAPS = ("softmax", "elu", "relu")
MASK_RULES = ("topk", "topp", "hybrid")
TOPK_COUNTS = ("ceil", "floor")
TOPP_BOUNDARIES = ("include", "exclude")
SIMILARITIES = ("to_mean", "pairwise")
TAIL_BLOCKS = ("score", "never_similar")

PerHead = float | tuple[float, ...]


def _traced(value) -> bool:
    """Whether `value` is a jax tracer (a config field set inside `jax.jit`): not range-checked."""
    return isinstance(value, jax.core.Tracer)


def check_fraction(name: str, value: PerHead | Sequence[float]) -> None:
    """Raise ValueError unless `value` (a float or one float per head) lies in (0, 1]; a traced
    value passes unchecked."""
    if _traced(value):
        return
    values = value if isinstance(value, (tuple, list)) else (value,)
    if len(values) == 0:
        raise ValueError(f"{name} must be a float in (0, 1] or a non-empty per-head tuple; got {value!r}")
    for x in values:
        if _traced(x):
            continue
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < float(x) <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1] (a float, or a tuple of shape (heads,)); got {value!r}")


def _fraction(name: str, value: float, *, closed_low: bool = False) -> None:
    if _traced(value):
        return
    ok = (0.0 <= value <= 1.0) if closed_low else (0.0 < value <= 1.0)
    if not isinstance(value, (int, float)) or not ok:
        low = "[0" if closed_low else "(0"
        raise ValueError(f"{name} must be a float in {low}, 1]; got {value!r}")


def _kind(name: str):
    """A constant tag field, so `dataclasses.asdict` output (e.g. a config.json) names the method."""
    return dataclasses.field(default=name, init=False, repr=False, compare=False)


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


class Method:
    """Base class of the method configs (frozen dataclasses).

    A subclass that declares a `kind` tag field (`_kind("name")`) registers itself in
    `Method.KINDS` under that name when it is defined: config dicts naming the kind build it
    (`sparge_jax.config_builder.build_config`), and `SparseConfig`, `HeadMix` and
    `LayerMethods` take it.
    """

    KINDS: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        tag = cls.__dict__.get("kind")
        kind = tag.default if isinstance(tag, dataclasses.Field) else tag
        if not isinstance(kind, str):
            return
        known = Method.KINDS.get(kind)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"method kind {kind!r} of {cls.__qualname__} is already taken by {known.__qualname__}")
        Method.KINDS[kind] = cls


@dataclasses.dataclass(frozen=True)
class Sparge2Method(Method):
    """SpargeAttention2's block rule.

    rule: "topk", "topp" or "hybrid" (SpargeAttention2: union of the Top-k and Top-p sets).
    topk: fraction of k blocks kept per row by Top-k, in (0, 1]; a float or a tuple with one
      value per head.
    topp: cumulative pooled-probability mass kept per row by Top-p, in (0, 1]; float or per head.
    topk_count: "ceil" keeps ceil(topk * k_blocks) blocks (default); "floor" keeps
      int(topk * k_blocks) in float32, at least one (SpargeAttn's `topk`).
    topp_boundary: "include" (default) also keeps the block whose mass makes the cumulative
      sum reach topp, so the kept mass is >= topp; "exclude" keeps only the blocks whose
      cumulative sum stays <= topp, at least one (SpargeAttn's `cdfthreshd`).
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
    """

    kind: str = _kind("sparge2")

    rule: str = "hybrid"
    topk: PerHead = 0.1
    topp: PerHead = 0.9
    topk_count: str = "ceil"
    topp_boundary: str = "include"
    sim_threshold: float | None = None
    similarity: str = "to_mean"
    smooth_k: bool = False
    tail_block: str = "score"
    keep_diagonal: bool = False
    keep_first: bool = False

    def __post_init__(self):
        for name in ("topk", "topp"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            check_fraction(name, getattr(self, name))
        if self.rule not in MASK_RULES:
            raise ValueError(f"rule must be one of {MASK_RULES}; got {self.rule!r}")
        for name, allowed in (("topk_count", TOPK_COUNTS), ("topp_boundary", TOPP_BOUNDARIES),
                              ("similarity", SIMILARITIES), ("tail_block", TAIL_BLOCKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}")
        if self.sim_threshold is not None and not -1.0 <= self.sim_threshold <= 1.0:
            raise ValueError(f"sim_threshold must lie in [-1, 1] or be None; got {self.sim_threshold!r}")

    def replace(self, **changes) -> "Sparge2Method":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SpargeAttnMethod(Method):
    """SpargeAttn (training-free).

    cdf_threshold: per row, keep the largest pooled probabilities whose cumulative sum
      stays <= cdf_threshold (at least one block); None when `topk` is given.
    sim_threshold: blocks whose mean pairwise token cosine similarity is <= it are not
      summarised by their mean: their row (q) or column (k) is always computed and
      rough k blocks are left out of the pooled softmax.
    keep_first: always keep the first k block (attention sink).
    topk: instead of cdf_threshold, keep int(topk * k_blocks) blocks per row (at least one).
    smooth_k: test k's self-similarity after subtracting its sequence mean.
    tail_block: "score" tests a ragged last block on its real tokens; "never_similar"
      always treats it as rough (SpargeAttn's kernels).
    `SpargeAttnMethod.upstream(...)` takes SpargeAttn's own argument names and defaults.
    """

    kind: str = _kind("spargeattn")

    cdf_threshold: float | None = 0.9
    sim_threshold: float = 0.1
    keep_first: bool = False
    topk: float | None = None
    smooth_k: bool = False
    tail_block: str = "score"

    def __post_init__(self):
        if (self.cdf_threshold is None) == (self.topk is None):
            raise ValueError(f"exactly one of cdf_threshold and topk must be set; got {self.cdf_threshold!r}, "
                             f"{self.topk!r}")
        for name in ("cdf_threshold", "topk"):
            if getattr(self, name) is not None:
                _fraction(name, getattr(self, name))
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise ValueError(f"sim_threshold must lie in [-1, 1]; got {self.sim_threshold!r}")
        if self.tail_block not in ("score", "never_similar"):
            raise ValueError(f"tail_block must be 'score' or 'never_similar'; got {self.tail_block!r}")

    @classmethod
    def upstream(cls, simthreshd1: float = 0.6, cdfthreshd: float | None = 0.98, topk: float | None = None,
                 smooth_k: bool = True, attention_sink: bool = False) -> "SpargeAttnMethod":
        """The mask of thu-ml/SpargeAttn's `spas_sage2_attn_meansim_cuda` (defaults as there).

        `spas_sage2_attn_meansim_topk_cuda(simthreshd1=-0.1, topk=0.5)` is
        `upstream(simthreshd1=-0.1, cdfthreshd=None, topk=0.5)`; its `get_block_map_meansim`
        (no smoothing) is `upstream(..., smooth_k=False)`. A ragged last block is always rough,
        as in its kernels. Block sizes are `KernelConfig.block_q` / `block_k` (upstream: 128 / 64,
        64 / 128 on sm90). The in-kernel PV skip (`pvthreshd`) is not reproduced.
        """
        return cls(cdf_threshold=cdfthreshd, sim_threshold=simthreshd1, keep_first=attention_sink, topk=topk,
                   smooth_k=smooth_k, tail_block="never_similar")


@dataclasses.dataclass(frozen=True)
class SLAMethod(Method):
    """SLA (sparse-linear attention).

    critical: fraction of k blocks per row computed exactly (top of the pooled scores).
    negligible: fraction of k blocks per row skipped (bottom of the pooled scores);
      the blocks in between are marginal and go through linear attention.
    feature_map: "softmax" (over head_dim), "elu" (elu + 1) or "relu", shared by q and k.
    linear_keys: "marginal" (default): the linear branch covers the marginal blocks only
      (the paper's three-way split); "all": it covers every key, critical blocks included,
      as thu-ml/SLA's code does (negligible must then be 0).
    critical_count: "at_least_one" (default): max(1, floor(critical * k_blocks));
      "truncate": int(critical * k_blocks), as thu-ml/SLA, and an error when that is 0
      (upstream then attends to no block and returns NaN).
    `SLAMethod.upstream(topk, feature_map)` takes thu-ml/SLA's names and semantics.
    """

    kind: str = _kind("sla")

    critical: float = 0.05
    negligible: float = 0.1
    feature_map: str = "softmax"
    linear_keys: str = "marginal"
    critical_count: str = "at_least_one"

    def __post_init__(self):
        _fraction("critical", self.critical)
        _fraction("negligible", self.negligible, closed_low=True)
        if self.critical + self.negligible > 1.0:
            raise ValueError(f"critical + negligible must be <= 1; got {self.critical} + {self.negligible}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}; got {self.feature_map!r}")
        if self.linear_keys not in ("marginal", "all"):
            raise ValueError(f"linear_keys must be 'marginal' or 'all'; got {self.linear_keys!r}")
        if self.linear_keys == "all" and self.negligible != 0:
            raise ValueError(f"negligible must be 0 with linear_keys='all' (every key is in the linear branch); "
                             f"got {self.negligible!r}")
        if self.critical_count not in ("at_least_one", "truncate"):
            raise ValueError(f"critical_count must be 'at_least_one' or 'truncate'; got {self.critical_count!r}")

    @classmethod
    def upstream(cls, topk: float, feature_map: str = "softmax") -> "SLAMethod":
        """thu-ml/SLA's `SparseLinearAttention(head_dim, topk, feature_map)`: the top int(topk * K)
        blocks by `pool(Q) pool(K - mean K)^T` exactly, linear attention over all keys, and
        `o = o_sparse + proj_l(o_linear)`. Block sizes: `KernelConfig(block_q=64 or 128, block_k=64)`."""
        return cls(critical=topk, negligible=0.0, feature_map=feature_map, linear_keys="all",
                   critical_count="truncate")


@dataclasses.dataclass(frozen=True)
class SVGMethod(Method):
    """Sparse VideoGen: per head, a spatial or a temporal pattern picked by online profiling.

    band_frames: both patterns keep a diagonal band of `band_frames * frame_tokens` tokens
      on each side, in frame-major order (spatial head: same and adjacent frames) or in
      position-major order (temporal head: the same spatial positions across frames).
    sink: also keep the first `frame_tokens` keys of the head's token order.
    sampled_rows: query tokens sampled to profile the two patterns against dense.
    seed: seed of the row sampling (mixed with the call's key when given).
    sparsity: None (default) for the above; a float selects Sparse VideoGen's release
      (`SVGMethod.upstream`): profiling with its fixed mask (first frame + 128-token blocks
      less than 2 frames apart), rows drawn with replacement from the first
      `sample_mse_max_row` tokens, and the band of `ceil(mul * frame_tokens / 128) * 128`
      tokens with `mul` from `sparsity` (its `sparsity_to_width`); band_frames is unused.
    sample_mse_max_row: see sparsity.
    token_band: False (default): every token of the blocks touching the band is computed (the
      block-sparse kernels run whole blocks). True: only the band's tokens, as Sparse VideoGen's
      flex-attention mask does (`SVGMethod.upstream`); the plan then carries a
      `pallas_kernels.TokenBand`, which only the "xla" kernel backend runs ("auto" falls back
      to it with a warning on GPU / TPU).
    """

    kind: str = _kind("svg")

    band_frames: float = 1.0
    sink: bool = True
    sampled_rows: int = 32
    seed: int = 0
    sparsity: float | None = None
    sample_mse_max_row: int = 10000
    token_band: bool = False

    def __post_init__(self):
        if not self.band_frames > 0:
            raise ValueError(f"band_frames must be positive; got {self.band_frames!r}")
        _positive_int("sampled_rows", self.sampled_rows)
        _positive_int("sample_mse_max_row", self.sample_mse_max_row)
        if self.sparsity is not None:
            if not 0.0 <= self.sparsity < 1.0:
                raise ValueError(f"sparsity must lie in [0, 1) or be None; got {self.sparsity!r}")
            if not self.sink:
                raise ValueError("Sparse VideoGen's release always keeps the first frame: sink must be True")

    @classmethod
    def upstream(cls, sparsity: float = 0.25, num_sampled_rows: int = 64, sample_mse_max_row: int = 10000,
                 seed: int = 0, token_band: bool = True) -> "SVGMethod":
        """svg-project/Sparse-VideoGen's Wan processor (`WanAttn_SVGAttn_Processor2_0`) with the
        defaults of its `wan_t2v_inference.py`: its profiling, head placement and token-level
        execution band (`token_band=False`: the whole blocks touching that band, for the GPU / TPU
        kernels). Its row draw (torch.randint) is not reproduced bit for bit (our PRNG)."""
        return cls(sampled_rows=num_sampled_rows, seed=seed, sparsity=sparsity, sample_mse_max_row=sample_mse_max_row,
                   token_band=token_band)


@dataclasses.dataclass(frozen=True)
class RadialMethod(Method):
    """Radial Attention's static energy-decay mask.

    Frames at distance <= dense_distance attend fully. At distance d > dense_distance
    the spatial window is `decay * 2**ceil(log2(frame_tokens)) / 2**floor(log2(d))`
    tokens: it halves each time d doubles. Once it falls below `min_window` the window
    stays at `min_window` and only every (min_window / window)-th frame distance is kept.
    sink_first_frame: every query keeps the whole first frame.
    min_window: None means block_k.
    variant: "any_pair" (default): the rule above, a block kept when it holds one visible
      token pair. "upstream": Radial Attention's release for Wan (`gen_log_mask_shrinked`):
      window `decay * 2**bit_length(frame_tokens) / 2**bit_length(d)` (at least block_size),
      frame distances skipped by the undecayed window, and per frame pair a block_size block
      kept only when enough of it is visible; `decay`, `sink_first_frame` and `block_size`
      apply, dense_distance is 1 and min_window is block_size there.
    block_size: the square block of the "upstream" variant (Radial's `block_size`, 128);
      the mask is then resized to the config's block_q / block_k.
    `RadialMethod.upstream(decay_factor, block_size)` takes Radial's names.
    """

    kind: str = _kind("radial")

    decay: float = 1.0
    dense_distance: int = 1
    min_window: int | None = None
    sink_first_frame: bool = True
    variant: str = "any_pair"
    block_size: int = 128

    def __post_init__(self):
        if not self.decay > 0:
            raise ValueError(f"decay must be positive; got {self.decay!r}")
        if self.variant not in ("any_pair", "upstream"):
            raise ValueError(f"variant must be 'any_pair' or 'upstream'; got {self.variant!r}")
        _positive_int("block_size", self.block_size)
        if self.variant == "upstream" and (self.dense_distance != 1 or self.min_window is not None):
            raise ValueError("the 'upstream' variant fixes dense_distance=1 and min_window=block_size; "
                             f"got dense_distance={self.dense_distance!r}, min_window={self.min_window!r}")
        if not isinstance(self.dense_distance, int) or self.dense_distance < 0:
            raise ValueError(f"dense_distance must be an int >= 0; got {self.dense_distance!r}")
        if self.min_window is not None:
            _positive_int("min_window", self.min_window)

    @classmethod
    def upstream(cls, decay_factor: float = 1.0, block_size: int = 128) -> "RadialMethod":
        """mit-han-lab/radial-attention's Wan mask (`MaskMap.queryLogMask(..., model_type="wan")`);
        its Wan 2.1 scripts use decay_factor 0.2 at 768x1280 (the code default is 1), block_size 128."""
        return cls(decay=decay_factor, variant="upstream", block_size=block_size)


@dataclasses.dataclass(frozen=True)
class SVG2Method(Method):
    """Sparse VideoGen2: semantic-aware permutation.

    q_clusters, k_clusters: k-means clusters of the queries and of the keys, per head.
    topp: keep the k clusters (by size-weighted centroid probability) whose preceding
      cumulative mass is <= topp; min_k_ratio: always keep that fraction of k clusters.
    init_iters: k-means iterations without previous centroids; step_iters: iterations
      when the previous denoising step's centroids are passed back in (0: only reassign).
    seed: seed of the initial centroid draw.
    upstream_kmeans: False (default): initial tokens drawn without replacement, fixed iteration
      counts, labels reassigned with the final centroids. True: Sparse VideoGen2's loop
      (`SVG2Method.upstream`): tokens drawn with replacement, iterations stop early once no
      centroid moves by 1e-4, and the labels are those assigned before the last update.
    `SVG2Method.upstream(...)` takes Sparse VideoGen2's names.
    """

    kind: str = _kind("svg2")

    q_clusters: int = 100
    k_clusters: int = 500
    topp: float = 0.9
    min_k_ratio: float = 0.0
    init_iters: int = 50
    step_iters: int = 2
    seed: int = 0
    upstream_kmeans: bool = False

    def __post_init__(self):
        for name in ("q_clusters", "k_clusters", "init_iters"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.step_iters, int) or self.step_iters < 0:
            raise ValueError(f"step_iters must be an int >= 0; got {self.step_iters!r}")
        if self.upstream_kmeans and self.step_iters < 1:
            raise ValueError("step_iters must be >= 1 with upstream_kmeans=True (Sparse VideoGen2 fails at 0)")
        _fraction("topp", self.topp)
        _fraction("min_k_ratio", self.min_k_ratio, closed_low=True)

    @classmethod
    def upstream(cls, num_q_centroids: int = 300, num_k_centroids: int = 1000, top_p_kmeans: float = 0.9,
                        min_kc_ratio: float = 0.1, kmeans_iter_init: int = 50, kmeans_iter_step: int = 2,
                        seed: int = 0) -> "SVG2Method":
        """svg-project/Sparse-VideoGen's `WanAttn_SAPAttn_Processor` with the settings of its
        `scripts/wan/wan_t2v_720p_sap.sh`."""
        return cls(q_clusters=num_q_centroids, k_clusters=num_k_centroids, topp=top_p_kmeans,
                   min_k_ratio=min_kc_ratio, init_iters=kmeans_iter_init, step_iters=kmeans_iter_step, seed=seed,
                   upstream_kmeans=True)


@dataclasses.dataclass(frozen=True)
class HeadMix(Method):
    """One method per head: `methods[h]` runs on head h."""

    kind: str = _kind("head_mix")

    methods: tuple[Method, ...]

    def __post_init__(self):
        if isinstance(self.methods, list):
            object.__setattr__(self, "methods", tuple(self.methods))
        if not self.methods or not all(_single(m) for m in self.methods):
            raise ValueError(f"methods must be a non-empty tuple of method configs, one per head; got {self.methods!r}")


@dataclasses.dataclass(frozen=True)
class LayerMethods(Method):
    """Per-layer choice: `layers` maps a layer number to its method; others use `default`."""

    kind: str = _kind("layer_methods")

    default: Method = Sparge2Method()
    layers: tuple[tuple[int, Method], ...] = ()

    def __post_init__(self):
        for entry in self.layers:
            if len(entry) != 2 or not isinstance(entry[0], int) or not _single(entry[1], or_head_mix=True):
                raise ValueError(f"layers must hold (layer: int, method config) pairs; got {entry!r}")

    def for_layer(self, layer: int) -> Method:
        """The method config of `layer`."""
        return dict(self.layers).get(layer, self.default)


def _single(method, *, or_head_mix: bool = False) -> bool:
    """Whether `method` is one method's config (or, when allowed, a HeadMix)."""
    composite = (LayerMethods,) if or_head_mix else (HeadMix, LayerMethods)
    return isinstance(method, Method) and not isinstance(method, composite)


def sparge2_methods(method) -> list[Sparge2Method]:
    """The `Sparge2Method` configs inside `method` (itself, a HeadMix's heads, a LayerMethods' entries)."""
    if isinstance(method, LayerMethods):
        return [m for entry in (method.default, *(m for _, m in method.layers)) for m in sparge2_methods(entry)]
    if isinstance(method, HeadMix):
        return [m for m in method.methods if isinstance(m, Sparge2Method)]
    return [method] if isinstance(method, Sparge2Method) else []


def replace_sparge2(method, **changes):
    """`method` with `changes` applied to every `Sparge2Method` inside it (see `sparge2_methods`)."""
    if isinstance(method, LayerMethods):
        return dataclasses.replace(method, default=replace_sparge2(method.default, **changes),
                                   layers=tuple((i, replace_sparge2(m, **changes)) for i, m in method.layers))
    if isinstance(method, HeadMix):
        return HeadMix(tuple(replace_sparge2(m, **changes) for m in method.methods))
    return method.replace(**changes) if isinstance(method, Sparge2Method) else method
