"""The Wan model as trainable pytrees: build (sharded, optionally rematerialised), load converted weights, call.

Parameters travel as a pure nested dict of arrays (`nnx.to_pure_dict`): float32 master
weights for the trainable leaves, the compute dtype for the frozen ones (`param_dtypes`); the
module structure is an `nnx.GraphDef` and `rest` holds non-parameter state.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from sparge_jax.config_builder import build_config
from sparge_jax.dtypes import DTYPES
from sparge_jax.models.checkpoint import CONFIG_FILE, read_wan_config
from sparge_jax.models.wan import WAN_CONFIGS, WanConfig, WanModel, architecture_differences, preset_of
from train.block_stacks import STACKS, BlockStacks
from train.config import ModelSettings
from train.optimizer import path_string, trainable_labels


class ModelParts(NamedTuple):
    """graphdef + non-param state `rest` + the `WanConfig`; params travel separately, laid out
    as `stacks` says (`train.block_stacks.BlockStacks`; per layer by default)."""

    graphdef: nnx.GraphDef
    rest: nnx.State
    config: WanConfig
    stacks: BlockStacks = BlockStacks()

    def merge(self, params: dict, dtype) -> WanModel:
        """The model with `params` (laid out as `stacks`) cast to `dtype` (floating leaves)."""
        return nnx.merge(self.graphdef, cast_floats(self.stacks.unstack(params), dtype), self.rest)


def wan_config(settings: ModelSettings) -> WanConfig:
    """`WAN_CONFIGS[preset]` with `overrides` applied (`build_config`: "sparse" is a dict of
    `SparseConfig` fields, merged onto the preset's)."""
    if settings.preset not in WAN_CONFIGS:
        raise ValueError(f"model.preset must be one of {sorted(WAN_CONFIGS)}; got {settings.preset!r}")
    return build_config(WanConfig, settings.overrides, base=WAN_CONFIGS[settings.preset], where="model.overrides.")


def _new_model(config: WanConfig, settings: ModelSettings, seed: int) -> WanModel:
    return WanModel(config, rngs=nnx.Rngs(seed), dtype=DTYPES[settings.compute_dtype], param_dtype=jnp.float32,
                    remat=settings.remat, remat_input_dtype=DTYPES[settings.remat_input_dtype],
                    residual_dtype=DTYPES[settings.residual_dtype])


def abstract_model(settings: ModelSettings) -> tuple[ModelParts, dict]:
    """Model structure and the params as ShapeDtypeStructs (no memory allocated)."""
    config = wan_config(settings)
    model = nnx.eval_shape(lambda: _new_model(config, settings, 0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return ModelParts(graphdef, rest, config), nnx.to_pure_dict(params)


def param_dtypes(labels, compute_dtype) -> dict:
    """The dtype training holds each param in, from its label (`train.optimizer.trainable_labels`):
    float32 master weights where it trains, `compute_dtype` where it is frozen. Every forward
    casts the params to the compute dtype anyway (`velocity_fn`), so a frozen param held there
    gives the same numbers in half the bytes (bf16)."""
    return jax.tree.map(lambda label: jnp.dtype(jnp.float32 if label == "train" else compute_dtype), labels)


def init_params(settings: ModelSettings, seed: int, shardings, labels=None) -> tuple[ModelParts, dict]:
    """Model parts and params created directly with `shardings`: restored from
    `settings.weights` (no random init is run then), else random init from `seed`. Held as
    float32, or with `labels` (`train.optimizer.trainable_labels`) in `param_dtypes`: the
    frozen ones in `settings.compute_dtype` (cast as they are made or read)."""
    config = wan_config(settings)
    parts, like = abstract_model(settings)
    dtypes = param_dtypes(trainable_labels(like, None) if labels is None else labels, DTYPES[settings.compute_dtype])
    if settings.weights is not None:
        check_weights_config(settings, config)
        return parts, load_weights(settings.weights, like, shardings, dtypes)

    def create():
        graphdef, params, rest = nnx.split(_new_model(config, settings, seed), nnx.Param, ...)
        return jax.tree.map(lambda x, dtype: x.astype(dtype), nnx.to_pure_dict(params), dtypes), rest

    (params, rest) = jax.jit(create, out_shardings=(shardings, None))()
    return ModelParts(parts.graphdef, rest, config), params


def init_on_device(settings: ModelSettings, device=None) -> tuple[ModelParts, dict]:
    """`init_params(settings, 0, ...)` with every param float32 on one `device` (default: the
    first): a converted teacher (`settings.weights`) as the benchmarks sample and score it."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0] if device is None else device)
    _, like = abstract_model(settings)
    return init_params(settings, 0, jax.tree.map(lambda _: sharding, like))


def check_weights_config(settings: ModelSettings, config: WanConfig) -> None:
    """ValueError when the `config.json` beside converted weights (if any) describes another
    architecture than `model.preset` + `model.overrides`, naming the differing fields and the
    preset that matches the weights."""
    if not (Path(settings.weights) / CONFIG_FILE).is_file():
        return
    stored = read_wan_config(settings.weights)
    differ = [f"{name} {getattr(stored, name)!r} (weights) vs {getattr(config, name)!r}"
              for name in architecture_differences(stored, config)]
    if differ:
        fits = preset_of(stored)
        hint = f"; the weights match model.preset={fits!r}" if fits else ""
        raise ValueError(f"model.weights {settings.weights!r} do not fit model.preset={settings.preset!r}"
                         f"{' + model.overrides' if settings.overrides else ''}: {'; '.join(differ)}{hint}")


def load_weights(path: str, like: dict, shardings, dtypes: dict) -> dict:
    """Params, each in its `dtypes` leaf (cast as read), from a converted-model directory
    (`<path>/params`, see `sparge_jax.models.checkpoint`) or an Orbax PyTree checkpoint of the
    pure param dict; `path` may be relative to the working directory."""
    path = Path(path).absolute()  # Orbax only restores from absolute paths
    if (path / "params").is_dir():
        path = path / "params"
    target = jax.tree.map(lambda x, s, dtype: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s), like, shardings, dtypes)
    with ocp.StandardCheckpointer() as checkpointer:
        loaded = checkpointer.restore(path, target)
    return jax.tree.map(lambda x, dtype: x.astype(dtype), loaded, dtypes)


def cast_floats(tree, dtype):
    """Cast floating leaves of a pytree to `dtype` (others unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def select(tree: dict, labels, label: str) -> dict:
    """`tree` with None for every leaf whose label (`train.optimizer.trainable_labels`) is not `label`."""
    return jax.tree.map(lambda x, mine: x if mine == label else None, tree, labels)


def fill_from(tree: dict, fallback: dict) -> dict:
    """`tree` with each None leaf replaced by `fallback`'s leaf at that place (no array is copied)."""
    return jax.tree.map(lambda mine, other: other if mine is None else mine, tree, fallback,
                        is_leaf=lambda x: x is None)


def teacher_copy(params: dict, labels, compute_dtype) -> dict:
    """The frozen teacher's own params: the leaves `labels` marks "train" (the ones the student
    changes) cast to `compute_dtype`, None for the frozen leaves, which the teacher reads from
    the student (they never change). With `optim.trainable` limited to a subset only that
    subset is held twice."""
    return cast_floats(select(params, labels, "train"), compute_dtype)


def teacher_params(student_params: dict, own: dict) -> dict:
    """The whole teacher param tree: `own`'s leaves (`teacher_copy`) where it holds one, else the
    student's (frozen) leaf; no array is copied."""
    return fill_from(own, student_params)


def block_paths(labels, label: str = "train") -> frozenset[str]:
    """The paths inside a DiT block ("self_attn/q/kernel") of the params that `labels`
    (`train.optimizer.trainable_labels`, per layer or stacked: `BlockStacks`) marks `label` in
    some block."""
    flat = [leaf for key in ("blocks", STACKS) for leaf in jax.tree_util.tree_flatten_with_path(labels.get(key, {}))[0]]
    return frozenset(path_string(path[1:]) for path, mine in flat if mine == label)


def velocity_fn(parts: ModelParts, params: dict, mode: str, compute_dtype,
                differentiated: frozenset[str] = frozenset()):
    """(x_t, timestep, batch) -> velocity of the model with `params` cast to `compute_dtype`,
    self-attention in `mode` ("dense" teacher / "sparse" student). Output float32.
    differentiated: the block params (`block_paths`) the caller takes gradients of; with
    `scan_layers` only those are stacked (`WanModel.__call__`'s `scan_stacked`), so a call with
    none differentiated copies no stack of the block weights. Any set gives the same values.
    Params held stacked (`parts.stacks`) are scanned over those stacks as they are, every param
    of them taken stacked (the per-layer slices the model stacks back fold away: no copy)."""
    model = parts.merge(params, compute_dtype)
    if parts.stacks.runs:
        scan = dict(scan_stacked=None, scan_runs=parts.stacks.scan_runs(parts.config.num_layers))
    else:
        scan = dict(scan_stacked=differentiated)

    def call(x_t, t, batch):
        extra = {name: batch[name].astype(compute_dtype) for name in ("clip_fea", "y") if name in batch}
        out, _ = model(x_t.astype(compute_dtype), t, batch["context"].astype(compute_dtype), attention_mode=mode,
                       **scan, **extra)
        return out.astype(jnp.float32)

    return call
