"""`train.model.init_on_device`: the params `init_params` makes, all float32, on the one device asked for."""

import jax
import numpy as np

from train.config import load_config
from train.model import abstract_model, init_on_device, init_params


def test_init_on_device_places_init_params_on_one_device():
    cfg = load_config(None, ["model.overrides.num_layers=1", "model.compute_dtype=bfloat16"])
    device = jax.devices()[-1]
    parts, params = init_on_device(cfg.model, device)
    _, like = abstract_model(cfg.model)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, reference = init_params(cfg.model, 0, jax.tree.map(lambda _: sharding, like))
    leaves = jax.tree.leaves(params)
    assert len(leaves) == len(jax.tree.leaves(reference)) > 0
    assert {leaf.dtype for leaf in leaves} == {np.dtype(np.float32)}  # not the compute dtype
    assert all(leaf.devices() == {device} for leaf in leaves)
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    assert parts.config.num_layers == 1
    _, default_params = init_on_device(cfg.model)
    assert all(leaf.devices() == {jax.devices()[0]} for leaf in jax.tree.leaves(default_params))
