"""Writers of Wan2.1's original checkpoint format (`blocks.N.self_attn.q.weight`, ...).

Pure Python + NumPy + safetensors (no jax, no torch), so that it also runs beside torch/diffusers
in another interpreter (see tests/fixtures/make_wan_fixtures.py).
"""

from __future__ import annotations

import numpy as np

from convert.keys import diffusers_to_original_key, param_table
from convert.layout import flax_to_torch


def diffusers_to_original(state: dict) -> dict:
    """A diffusers `WanTransformer3DModel` state dict (name -> array) renamed to original keys.
    Raises ValueError if two keys map to one name."""
    out = {}
    for key, value in state.items():
        name = diffusers_to_original_key(key)
        if name in out:
            raise ValueError(f"state: two diffusers keys map to the original key {name!r}")
        out[name] = value
    return out


def flatten_params(params: dict, prefix: str = "") -> dict:
    """Nested param dict (int or str keys) -> {'a.0.b': array}."""
    flat = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, path + "."))
        else:
            flat[path] = value
    return flat


def flax_to_original(params: dict, config) -> dict:
    """Flax `WanModel` params (nested pure dict, e.g. `nnx.to_pure_dict(nnx.state(model))`)
    -> original Wan2.1 state dict of NumPy arrays. Missing or extra params raise ValueError."""
    flat = {path: np.asarray(value) for path, value in flatten_params(params).items()}
    table = param_table(config)
    expected = {spec.flax_path for spec in table.values()}
    missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
    if missing or extra:
        raise ValueError(f"params do not match the config: missing {missing[:20]}, unexpected {extra[:20]}")
    return {key: flax_to_torch(flat[spec.flax_path], spec.kind) for key, spec in table.items()}


def save_original(state: dict, path: str) -> None:
    """Write an original-format state dict to one `.safetensors` file."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
