"""On-disk form of a converted Wan model: `<dir>/params` (Orbax PyTree checkpoint of the pure
param dict, as `nnx.to_pure_dict` gives it) and `<dir>/config.json` (`WanConfig.to_dict()`)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from sparge_jax.models.wan import WanConfig, WanModel

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def save_wan_params(directory: str, params: dict, config: WanConfig) -> None:
    """Write `params` (nested dict of arrays matching `WanModel(config)`) and the config.

    Saved synchronously and uncompressed: Orbax still stages a host copy of every array, so the
    peak is about twice the params' size (the async, compressed default measured ~2.4x).
    Readable with `ocp.StandardCheckpointer().restore`."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    handler = ocp.PyTreeCheckpointHandler(use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)


def read_wan_config(directory: str) -> WanConfig:
    """The `WanConfig` stored beside a converted checkpoint."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint_dir must hold {CONFIG_FILE} and {PARAMS_DIR}/ (made by `python -m convert`); "
                         f"{path} not found")
    with open(path) as f:
        return WanConfig.from_dict(json.load(f))


def load_wan(checkpoint_dir: str, *, dtype=None, param_dtype=None, **config_changes) -> WanModel:
    """Build a `WanModel` from a converted checkpoint directory.

    dtype: compute dtype of the projections (None: the params' dtype).
    param_dtype: dtype to hold the params in (None: as stored, e.g. bfloat16 for `--dtype bf16`).
    config_changes: `WanConfig` fields to override, e.g. `sparse=SparseConfig(...)`,
      `dense_layers=(0, 1)`, `attention_mode="dense"`.
    """
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    config = read_wan_config(checkpoint_dir)
    if config_changes:
        config = config.replace(**config_changes)
    path = os.path.join(checkpoint_dir, PARAMS_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(path).item_metadata
        stored_dtype = jax.tree.leaves(stored)[0].dtype
        param_dtype = stored_dtype if param_dtype is None else jnp.dtype(param_dtype)
        abstract = nnx.eval_shape(lambda: WanModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
        graphdef, state = nnx.split(abstract)
        target = nnx.to_pure_dict(state)
        params = checkpointer.restore(path, target)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
