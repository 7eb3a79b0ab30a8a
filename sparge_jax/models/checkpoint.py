"""On-disk form of a converted Wan model (DiT or VAE): `<dir>/params` (Orbax PyTree checkpoint of
the pure param dict, as `nnx.to_pure_dict` gives it) and `<dir>/config.json` (`WanConfig.to_dict()`
or `WanVAEConfig.to_dict()`)."""

from __future__ import annotations

import functools
import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sparge_jax.models.wan import WanConfig, WanModel
from sparge_jax.models.wan_vae import WanVAE, WanVAEConfig

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def _in_place_numpy_registry():
    """Orbax's standard type handlers, except that NumPy leaves are written from the arrays
    themselves instead of from a deep copy (Orbax's default copies every host array first).
    None with an Orbax whose NumpyHandler has no such switch (before 0.12): its defaults then."""
    if "deepcopy_host_arrays" not in inspect.signature(ocp.type_handlers.NumpyHandler).parameters:
        return None
    handlers = [(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()]
    handlers.append((np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    return ocp.type_handlers.create_type_handler_registry(*handlers)


def save_wan_params(directory: str, params: dict, config) -> None:
    """Write `params` (nested dict of arrays matching the module of `config`: `WanModel`, `WanVAE`, or
    the umT5 encoder by `convert.umt5`; any config with `to_dict()`) and the config.

    Saved synchronously and uncompressed. NumPy leaves (what `python -m convert` passes, as
    read-only memory maps of its staging file) are handed to Orbax without its usual host copy,
    so saving them costs no second copy of the params: peak RSS of a 1.3B bf16 conversion
    (2.84 GB of params) went from 6.0 GB to 3.1 GB (orbax-checkpoint 0.12.8; an Orbax without
    `NumpyHandler(deepcopy_host_arrays=...)` copies them). They must not change during the call.
    jax.Array leaves go through Orbax's standard handler. Readable with
    `ocp.StandardCheckpointer().restore`."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    registry = _in_place_numpy_registry()
    extra = {} if registry is None else {"type_handler_registry": registry}
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, **extra)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(os.path.join(directory, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)


def check_new_output_dir(directory: str, name: str = "output_dir") -> None:
    """ValueError naming `name` when `directory` exists and is not an empty directory (a
    converted model is written only where nothing would be mixed into or overwritten)."""
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise ValueError(f"{name} {directory} exists and is not an empty directory")


def write_random_wan(directory: str, config: WanConfig, *, param_dtype=jnp.bfloat16, seed: int = 0) -> int:
    """Write a checkpoint of `WanModel(config)` with its random initial weights (from `seed`,
    held in `param_dtype`) in the form `load_wan` and training's `model.weights` read. Refuses a
    `directory` that exists and is not empty. Returns the parameter count."""
    directory = os.path.abspath(directory)
    check_new_output_dir(directory)
    model = WanModel(config, rngs=nnx.Rngs(seed), param_dtype=jnp.dtype(param_dtype))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    save_wan_params(directory, params, config)
    return sum(x.size for x in jax.tree.leaves(params))


def stored_fields(directory: str, made_from: str, *, name: str = "checkpoint_dir") -> dict:
    """The config.json fields of a converted-model folder (`sparge-convert` output): ValueError
    naming `name` when the folder has none. made_from: what the folder is converted from."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{name} must hold {CONFIG_FILE} and {PARAMS_DIR}/ (made by `sparge-convert` from "
                         f"{made_from}); {path} not found")
    with open(path) as f:
        return json.load(f)


def read_wan_config(directory: str) -> WanConfig:
    """The `WanConfig` stored beside a converted checkpoint."""
    return WanConfig.from_dict(stored_fields(directory, "a Wan DiT checkpoint"))


def load_wan(checkpoint_dir: str, *, dtype=None, param_dtype=None, residual_dtype=jnp.float32,
             **config_changes) -> WanModel:
    """Build a `WanModel` from a converted checkpoint directory.

    dtype: compute dtype of the projections (None: the params' dtype).
    param_dtype: dtype to hold the params in (None: as stored, e.g. bfloat16 for `--dtype bf16`).
    residual_dtype: dtype of the residual stream (`WanModel`'s; float32 as Wan2.1, bfloat16 as
      diffusers' bf16 pipeline).
    config_changes: `WanConfig` fields to override, e.g. `sparse=SparseConfig(...)`,
      `dense_layers=(0, 1)`, `attention_mode="dense"`.
    """
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    config = read_wan_config(checkpoint_dir)
    if config_changes:
        config = config.replace(**config_changes)
    return restore_model(os.path.join(checkpoint_dir, PARAMS_DIR),
                         lambda param_dtype: WanModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                      residual_dtype=residual_dtype),
                         param_dtype)


def restore_model(params_dir: str, build, param_dtype=None) -> nnx.Module:
    """The module `build(param_dtype)` makes, with its params read from the Orbax checkpoint
    `params_dir` (held in `param_dtype`; None: the stored dtype, or the widest of the stored
    dtypes where they differ, e.g. float32 for a training run's float32 trained and bf16 frozen
    params, so no stored value is rounded). Only the params' shapes of `build`'s module are made
    before reading, not its random initial values."""
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(params_dir).item_metadata
        stored_dtype = functools.reduce(jnp.promote_types, {leaf.dtype for leaf in jax.tree.leaves(stored)})
        param_dtype = stored_dtype if param_dtype is None else jnp.dtype(param_dtype)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: build(param_dtype)))
        params = checkpointer.restore(params_dir, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def read_wan_vae_config(directory: str) -> WanVAEConfig:
    """The `WanVAEConfig` stored beside a converted VAE checkpoint."""
    fields = stored_fields(directory, "a Wan VAE checkpoint")
    if "base_dim" not in fields:
        raise ValueError(f"checkpoint_dir {directory} holds no VAE (its {CONFIG_FILE} has no base_dim; "
                         "a DiT checkpoint? load it with load_wan)")
    return WanVAEConfig.from_dict(fields)


def load_wan_vae(checkpoint_dir: str, *, dtype=None, param_dtype=None) -> WanVAE:
    """Build a `WanVAE` from a checkpoint directory converted from a Wan VAE.

    dtype: compute dtype of the convolutions (None: the params' dtype; norms run in float32).
    param_dtype: dtype to hold the params in (None: as stored)."""
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    config = read_wan_vae_config(checkpoint_dir)
    return restore_model(os.path.join(checkpoint_dir, PARAMS_DIR),
                         lambda param_dtype: WanVAE(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
                         param_dtype)
