"""Configs: the kernel / method split, the flat shorthand, and the one dict -> config builder."""

import json

import ml_dtypes
import numpy as np
import pytest

from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.config_builder import build_config
from sparge_jax.dtypes import dtype_named
from sparge_jax.method_config import Method, HeadMix, LayerMethods, Sparge2Method, SVGMethod
from sparge_jax.models import WAN_CONFIGS, WanConfig

# A config.json "sparse" entry as the flat SparseConfig wrote it (before the kernel / method split).
FLAT = {"rule": "hybrid", "topk": 0.25, "topp": 0.5, "block_q": 32, "block_k": 16, "topk_count": "ceil",
        "topp_boundary": "include", "sim_threshold": None, "similarity": "to_mean", "smooth_k": False,
        "tail_block": "score", "keep_diagonal": False, "keep_first": True, "sm_scale": None, "backend": "auto",
        "interpret": False}


def test_shorthand_keywords_are_the_kernel_and_rule_configs():
    config = SparseConfig(block_q=64, topk=0.2, keep_first=True)
    assert config == SparseConfig(Sparge2Method(topk=0.2, keep_first=True), KernelConfig(block_q=64))
    assert config.replace(topp=0.7, backend="xla") == SparseConfig(
        Sparge2Method(topk=0.2, topp=0.7, keep_first=True), KernelConfig(block_q=64, backend="xla"))
    mixed = SparseConfig(LayerMethods(default=Sparge2Method(), layers=((1, SVGMethod()),)), topk=0.3)
    assert mixed.method.default == Sparge2Method(topk=0.3) and mixed.method.for_layer(1) == SVGMethod()
    with pytest.raises(ValueError, match="method SVGMethod holds none"):
        SparseConfig(SVGMethod(), topk=0.3)
    with pytest.raises(TypeError, match=r"SparseConfig has no field\(s\) \['top_k'\]"):
        SparseConfig(top_k=0.3)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        KernelConfig(block_q=0)
    with pytest.raises(ValueError, match="rule must be one of"):
        Sparge2Method(rule="top")


def test_flat_config_json_entries_still_load():
    stored = WAN_CONFIGS["tiny"].to_dict()
    stored["sparse"] = FLAT
    assert WanConfig.from_dict(stored).sparse == SparseConfig(
        Sparge2Method(topk=0.25, topp=0.5, keep_first=True), KernelConfig(block_q=32, block_k=16))
    # A method inside took the flat rule fields in its "sparge2" entries; others ignored them.
    stored["sparse"] = {**FLAT, "method": {"kind": "layer_methods", "default": {"kind": "sparge2"},
                                           "layers": [[1, {"kind": "svg", "band_frames": 2.0}]]}}
    method = WanConfig.from_dict(stored).sparse.method
    assert method == LayerMethods(default=Sparge2Method(topk=0.25, topp=0.5, keep_first=True),
                                  layers=((1, SVGMethod(band_frames=2.0)),))
    stored["sparse"] = {**FLAT, "method": {"kind": "svg"}}
    assert WanConfig.from_dict(stored).sparse == SparseConfig(SVGMethod(), KernelConfig(block_q=32, block_k=16))


def test_build_config_round_trips_and_merges_onto_a_base():
    config = WAN_CONFIGS["tiny"].replace(sparse=SparseConfig(
        HeadMix((SVGMethod(band_frames=0.5), Sparge2Method(topk=(0.1, 0.2)))), KernelConfig(block_q=16)))
    assert WanConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    base = WAN_CONFIGS["tiny"]
    merged = build_config(WanConfig, {"num_layers": 1, "sparse": {"method": {"topp": 0.8}, "kernel": {"block_k": 8}}},
                          base=base)
    assert merged.num_layers == 1 and merged.sparse == SparseConfig(
        base.sparse.method.replace(topp=0.8), base.sparse.kernel.replace(block_k=8))
    other_kind = build_config(WanConfig, {"sparse": {"method": {"kind": "svg"}}}, base=base)
    assert other_kind.sparse == SparseConfig(SVGMethod(), base.sparse.kernel)
    with pytest.raises(ValueError, match=r"config sparse.kernel.block_q='8': expected an int"):
        build_config(WanConfig, {"sparse": {"kernel": {"block_q": "8"}}}, base=base)
    forced = build_config(WanConfig, {"sparse": {"kernel": {"fused_backward": False}}}, base=base)
    assert forced.sparse.kernel == base.sparse.kernel.replace(fused_backward=False)
    with pytest.raises(ValueError, match=r"config sparse.kernel.fused_backward='yes': expected true or false or null"):
        build_config(WanConfig, {"sparse": {"kernel": {"fused_backward": "yes"}}}, base=base)
    with pytest.raises(ValueError, match=r"config top level: unknown WanConfig field\(s\) \['layers'\]"):
        build_config(WanConfig, {"layers": 1})
    with pytest.raises(ValueError, match="config method: kind must be one of"):
        build_config(Method, {"kind": "dense"}, where="method")


def test_one_dtype_table():
    assert dtype_named("bfloat16") == dtype_named("bf16") == np.dtype(ml_dtypes.bfloat16)
    assert dtype_named("fp32") == np.float32
    with pytest.raises(ValueError, match=r"--dtype must be one of \['bfloat16', 'float32', 'bf16', 'fp32'\]"):
        dtype_named("float16", argument="--dtype")


def test_a_method_defined_outside_the_library_works_everywhere(rng):
    """A new method is one config class (a `Method` with a kind) and one registered provider:
    dict building, SparseConfig, HeadMix and method_attention take it with no other change."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from oracles import numpy_block_attention, rel_l2
    from sparge_jax.masks.providers import AttentionPlan, register_provider
    from sparge_jax.method_config import Method, _kind
    from sparge_jax.methods import method_attention

    @dataclasses.dataclass(frozen=True)
    class BandMethod(Method):
        kind: str = _kind("test_band")
        width: int = 1  # k blocks kept on each side of the block diagonal

    @register_provider(BandMethod)
    def _plan_band(q, k, v, method, kernel, grid, state, key):
        nq, nk = -(-q.shape[1] // kernel.block_q), -(-k.shape[1] // kernel.block_k)
        band = np.abs(np.arange(nq)[:, None] - np.arange(nk)[None, :]) <= method.width
        return AttentionPlan(jnp.broadcast_to(jnp.asarray(band), (q.shape[0], q.shape[2], nq, nk))), state

    method = build_config(Method, {"kind": "test_band", "width": 2})
    assert method == BandMethod(width=2)
    config = build_config(SparseConfig, {"method": {"kind": "head_mix", "methods": [
        {"kind": "test_band", "width": 0}, {"kind": "sparge2", "rule": "topk", "topk": 1.0}]},
        "kernel": {"block_q": 8, "block_k": 8, "backend": "xla"}})
    q, k, v = (jnp.asarray(rng.standard_normal((1, 29, 2, 8)), jnp.float32) for _ in range(3))
    with jax.default_matmul_precision("highest"):
        out, _ = method_attention(q, k, v, config=config)
    band = np.abs(np.arange(4)[:, None] - np.arange(4)[None, :]) == 0
    masks = np.stack([band, np.ones((4, 4), bool)])[None]
    assert rel_l2(out, numpy_block_attention(q, k, v, masks, 8, 8)[0]) < 1e-5
