"""Frozen configuration of sparse attention: the kernel's settings and the method that picks blocks.

`KernelConfig` holds only what the block-sparse kernels need (block sizes, softmax scale,
backend, interpret mode, the Mosaic GPU backward's kernels). A method config of
`sparge_jax.method_config` (SpargeAttention2's `Sparge2Method`, SpargeAttn, SLA, Sparse
VideoGen, Radial, Sparse VideoGen2, or a per-head / per-layer mix) holds everything its mask
provider needs. `SparseConfig` pairs the two: it is
what `sparse_attention`, `SparseAttention` and `WanConfig.sparse` take.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.backend import check_fused
from pallas_kernels.blocks import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from pallas_kernels.dispatch import BACKENDS
from sparge_jax.method_config import Method, Sparge2Method, replace_sparge2, sparge2_methods


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How the block-sparse kernel runs.

    block_q, block_k: block sizes in tokens (q 128, k 64 by default).
    sm_scale: softmax scale; None means 1/sqrt(head_dim).
    backend: "auto", "xla", "mosaic_gpu" or "tpu" (see pallas_kernels.dispatch).
    interpret: run Pallas kernels in interpret mode (CPU testing).
    fused_backward: the Mosaic GPU backward's kernels: True the fused dQ/dK/dV kernel, False the
      dQ and dK/dV kernels, None (default) the fused one where a head's fp32 dQ slice fits L2,
      else picked per call from the mask's kept density
      (`pallas_kernels.mosaic_gpu.flash_backward.FUSED_DQ_SLICE_BYTES`, `FUSED_MIN_DENSITY`;
      the program then holds both, compiling longer). Backends with one backward ignore it.
    """

    block_q: int = DEFAULT_BLOCK_Q
    block_k: int = DEFAULT_BLOCK_K
    sm_scale: float | None = None
    backend: str = "auto"
    interpret: bool = False
    fused_backward: bool | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int (not a bool); got {value!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {self.backend!r}")
        if self.sm_scale is not None and not self.sm_scale > 0:
            raise ValueError(f"sm_scale must be positive or None; got {self.sm_scale!r}")
        check_fused(self.fused_backward, "fused_backward")

    def replace(self, **changes) -> "KernelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


KERNEL_FIELDS = tuple(f.name for f in dataclasses.fields(KernelConfig))
RULE_FIELDS = tuple(f.name for f in dataclasses.fields(Sparge2Method) if f.init)


@dataclasses.dataclass(frozen=True, init=False)
class SparseConfig:
    """A method (which blocks each attention call computes) and the kernel that runs them.

    method: a config of `sparge_jax.method_config` (default: SpargeAttention2's `Sparge2Method()`).
    kernel: `KernelConfig`.

    Shorthand (and the spelling of the flat config this class replaced): the fields of
    `KernelConfig` and of `Sparge2Method` may be given as keywords, e.g.
    `SparseConfig(block_q=64, topk=0.2)` is
    `SparseConfig(Sparge2Method(topk=0.2), KernelConfig(block_q=64))`. Kernel keywords change
    `kernel`; rule keywords change every `Sparge2Method` inside `method` (a ValueError when it
    holds none). `replace` takes the same keywords. The old flat dicts (config.json files) are
    read by `upgrade_fields`.
    """

    method: Method = Sparge2Method()
    kernel: KernelConfig = KernelConfig()

    def __init__(self, method: Method | None = None, kernel: KernelConfig | None = None, **shorthand):
        unknown = sorted(set(shorthand) - set(KERNEL_FIELDS) - set(RULE_FIELDS))
        if unknown:
            raise TypeError(f"SparseConfig has no field(s) {unknown}: it takes method=, kernel= and, as shorthand, "
                            f"the fields of KernelConfig {KERNEL_FIELDS} and of Sparge2Method {RULE_FIELDS}")
        method = Sparge2Method() if method is None else method
        kernel = KernelConfig() if kernel is None else kernel
        if not isinstance(method, Method):
            raise ValueError(f"method must be a config from sparge_jax.method_config; got {method!r}")
        if not isinstance(kernel, KernelConfig):
            raise ValueError(f"kernel must be a sparge_jax.config.KernelConfig; got {kernel!r}")
        kernel_changes = {name: value for name, value in shorthand.items() if name in KERNEL_FIELDS}
        rule_changes = {name: value for name, value in shorthand.items() if name in RULE_FIELDS}
        if rule_changes:
            if not sparge2_methods(method):
                raise ValueError(f"{sorted(rule_changes)} are fields of SpargeAttention2's Sparge2Method, and method "
                                 f"{type(method).__name__} holds none; set them in the method config itself")
            method = replace_sparge2(method, **rule_changes)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "kernel", kernel.replace(**kernel_changes) if kernel_changes else kernel)

    def replace(self, **changes) -> "SparseConfig":
        """A copy with some fields changed (validated again); takes the shorthand keywords too."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def upgrade_fields(values: dict) -> dict:
        """A dict of this class's fields from one in the flat spelling it replaced (for
        `sparge_jax.config_builder.build_config`; already-new dicts pass unchanged).

        The flat dict held the `KernelConfig` and `Sparge2Method` fields side by side and a
        `method` (None, or a method dict whose "sparge2" entries took the flat rule fields). Rule
        fields go to every "sparge2" entry of the method (all of them when the method is None or
        absent); with a method that has no such entry they are dropped, as the flat config
        ignored them then.
        """
        kernel = {name: values[name] for name in KERNEL_FIELDS if name in values}
        rule = {name: values[name] for name in RULE_FIELDS if name in values}
        if not kernel and not rule:
            return values
        upgraded = {name: value for name, value in values.items() if name not in KERNEL_FIELDS + RULE_FIELDS}
        if kernel:
            upgraded["kernel"] = {**kernel, **upgraded.get("kernel", {})}
        method = upgraded.get("method")
        if method is None:
            if "method" in upgraded:
                upgraded["method"] = {"kind": "sparge2", **rule}
            elif rule:
                upgraded["method"] = rule  # merged onto the base / default method
        elif rule and isinstance(method, dict) and "kind" not in method:
            raise ValueError(f"config sparse: {sorted(rule)} given both flat and beside a method section without "
                             f"kind; put them inside method ({{\"method\": {{\"topk\": ...}}}})")
        else:
            upgraded["method"] = _with_rule_fields(method, rule)
        return upgraded


def _with_rule_fields(method, rule: dict):
    """A method dict with `rule` filled into each of its "sparge2" entries (their own fields win)."""
    if isinstance(method, dict):
        if method.get("kind") == "sparge2":
            return {**rule, **method}
        return {name: _with_rule_fields(value, rule) for name, value in method.items()}
    if isinstance(method, (list, tuple)):
        return [_with_rule_fields(value, rule) for value in method]
    return method
