"""`WanConfig.prediction`: a "clean" head's call returns the velocity its clean-latents output
implies (oracle: float64 NumPy of (latents - head) / max(sigma, 0.05) on the same weights' head
output, read from a "velocity" model); the field counts as architecture (weights trained one way
are refused by a config of the other); validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparge_jax.models import WAN_CONFIGS, WanModel
from sparge_jax.models.checkpoint import write_random_wan
from sparge_jax.models.wan import CLEAN_SIGMA_MIN, architecture_differences
from train.config import ModelSettings
from train.model import check_weights_config, wan_config

VIDEO = (3, 6, 10)  # latent frames, height, width: not multiples of the tiny config's token blocks


@pytest.mark.matmul_precision("highest")
def test_clean_head_returns_the_velocity_of_its_prediction():
    config = WAN_CONFIGS["tiny"]
    keys = jax.random.split(jax.random.key(3), 2)
    latents = jax.random.normal(keys[0], (3, *VIDEO, config.in_dim))
    context = jax.random.normal(keys[1], (3, 5, config.text_dim))
    timestep = jnp.array([999.0, 400.0, 20.0])  # the last below CLEAN_SIGMA_MIN * 1000
    head = WanModel(config, rngs=nnx.Rngs(0))
    clean = WanModel(config.replace(prediction="clean"), rngs=nnx.Rngs(0))  # the same weights
    raw = np.asarray(head(latents, timestep, context, attention_mode="dense")[0], np.float64)
    velocity = np.asarray(clean(latents, timestep, context, attention_mode="dense")[0], np.float64)
    sigma = np.maximum(np.asarray(timestep, np.float64) / 1000.0, CLEAN_SIGMA_MIN)[:, None, None, None, None]
    expected = (np.asarray(latents, np.float64) - raw) / sigma
    np.testing.assert_allclose(velocity, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # x - sigma v gives the head's output back: what a sampler's clean estimate reads
    np.testing.assert_allclose(np.asarray(latents[:2], np.float64) - sigma[:2] * velocity[:2], raw[:2],
                               atol=1e-4 * np.abs(raw).max())


def test_prediction_is_architecture_and_validated(tmp_path):
    tiny = WAN_CONFIGS["tiny"]
    assert architecture_differences(tiny, tiny.replace(prediction="clean")) == ["prediction"]
    write_random_wan(str(tmp_path / "clean"), tiny.replace(prediction="clean"))
    velocity = ModelSettings(preset="tiny", weights=str(tmp_path / "clean"))
    with pytest.raises(ValueError, match="prediction 'clean' \\(weights\\) vs 'velocity'"):
        check_weights_config(velocity, wan_config(velocity))
    clean = ModelSettings(preset="tiny", overrides={"prediction": "clean"}, weights=str(tmp_path / "clean"))
    check_weights_config(clean, wan_config(clean))  # the same architecture: accepted
    with pytest.raises(ValueError, match="prediction must be one of"):
        tiny.replace(prediction="noise")
