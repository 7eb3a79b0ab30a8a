"""Configs: the kernel / method split, the flat shorthand, and the one dict -> config builder."""

import json

import ml_dtypes
import numpy as np
import pytest

from sparge_jax.config import KernelConfig, SparseConfig
from sparge_jax.config_builder import build_config
from sparge_jax.dtypes import dtype_named
from sparge_jax.method_config import AnyMethod, HeadMix, LayerMethods, Sparge2Method, SVGMethod
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
    with pytest.raises(ValueError, match=r"config top level: unknown WanConfig field\(s\) \['layers'\]"):
        build_config(WanConfig, {"layers": 1})
    with pytest.raises(ValueError, match="config method: kind must be one of"):
        build_config(AnyMethod, {"kind": "dense"}, where="method")


def test_one_dtype_table():
    assert dtype_named("bfloat16") == dtype_named("bf16") == np.dtype(ml_dtypes.bfloat16)
    assert dtype_named("fp32") == np.float32
    with pytest.raises(ValueError, match=r"--dtype must be one of \['bfloat16', 'float32', 'bf16', 'fp32'\]"):
        dtype_named("float16", argument="--dtype")
