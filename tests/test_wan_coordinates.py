"""Coordinate channels of the Wan DiT (`WanConfig.coordinate_channels`) and its absolute
positions (`WanConfig.absolute_positions`, the sin-cos table against NumPy): the grid against NumPy,
the position-blindness they remove (a uniform input gives every token the same velocity without
them, oracle: the first token's; not with them), `with_coordinate_channels` and its script keep a
model's velocities (oracle: the model before), validation, and the committed absolute-position
teacher's config."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparge_jax.models import WAN_CONFIGS, WanModel
from sparge_jax.models.checkpoint import load_wan, write_random_wan
from sparge_jax.models.rope import sincos_embedding
from sparge_jax.models.wan import coordinate_grid, with_coordinate_channels
from train.config import load_config
from train.model import check_weights_config, wan_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from add_coordinate_channels import main as add_coordinates  # noqa: E402

VIDEO = (3, 6, 10)  # latent frames, height, width: 3 x 3 x 5 tokens of the tiny config's 1 x 2 x 2 patches


def _velocity(model, latents, context):
    return nnx.jit(lambda m, x, c: m(x, jnp.full((x.shape[0],), 990.0), c, attention_mode="dense")[0])(
        model, latents, context)


def test_coordinate_grid_matches_numpy():
    grid = np.asarray(coordinate_grid((2, 3, 4, 1), jnp.float32))
    assert grid.shape == (2, 3, 4, 1, 3)
    np.testing.assert_allclose(grid[1, :, 0, 0, 0], [-2 / 3, 0, 2 / 3], atol=1e-7)
    np.testing.assert_allclose(grid[0, 2, :, 0, 1], [-0.75, -0.25, 0.25, 0.75], atol=1e-7)
    np.testing.assert_array_equal(grid[..., 2], 0.0)  # an axis of one cell sits at the centre


@pytest.mark.matmul_precision("highest")  # TF32 rounds the attention weights: their sums leave 1 by ~1e-3
def test_uniform_input_tells_tokens_apart_only_with_absolute_places():
    config = WAN_CONFIGS["tiny"]
    latents = jnp.full((1, *VIDEO, config.in_dim), 0.3)
    context = jax.random.normal(jax.random.key(1), (1, 5, config.text_dim))
    for places in ({}, {"coordinate_channels": True}, {"absolute_positions": True}):
        model = WanModel(config.replace(**places), rngs=nnx.Rngs(0))
        v = np.asarray(_velocity(model, latents, context)).reshape(3, 3, 2, 5, 2, config.out_dim)
        tokens = v.transpose(0, 1, 3, 2, 4, 5).reshape(45, -1)  # one row per token, its 2 x 2 cells
        spread = np.abs(tokens - tokens[0]).max() / np.abs(tokens[0]).max()
        if places:
            assert spread > 1e-2, (places, spread)
        else:
            assert spread < 1e-5, spread  # RoPE is relative: every token sees the same neighbourhood


@pytest.mark.matmul_precision("highest")
def test_with_coordinate_channels_keeps_the_velocities():
    config = WAN_CONFIGS["tiny"]
    model = WanModel(config, rngs=nnx.Rngs(2))
    params, widened = with_coordinate_channels(nnx.to_pure_dict(nnx.state(model, nnx.Param)), config)
    assert widened.coordinate_channels and params["patch_embedding"]["kernel"].shape == (1, 2, 2, config.in_dim + 3,
                                                                                          config.dim)
    other = WanModel(widened, rngs=nnx.Rngs(3))
    state = nnx.state(other, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(other, state)
    keys = jax.random.split(jax.random.key(4), 2)
    latents = jax.random.normal(keys[0], (2, *VIDEO, config.in_dim))
    context = jax.random.normal(keys[1], (2, 5, config.text_dim))
    np.testing.assert_allclose(np.asarray(_velocity(other, latents, context)),
                               np.asarray(_velocity(model, latents, context)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already"):
        with_coordinate_channels(params, widened)


def test_script_widens_a_checkpoint(tmp_path, capsys):
    config = WAN_CONFIGS["tiny"]
    write_random_wan(str(tmp_path / "plain"), config, seed=5)
    add_coordinates([str(tmp_path / "plain"), str(tmp_path / "wide")])
    plain, wide = load_wan(str(tmp_path / "plain")), load_wan(str(tmp_path / "wide"))
    assert wide.config.coordinate_channels and wide.patch_embedding.kernel[...].dtype == jnp.bfloat16
    latents = jax.random.normal(jax.random.key(6), (1, *VIDEO, config.in_dim), jnp.bfloat16)
    context = jax.random.normal(jax.random.key(7), (1, 5, config.text_dim), jnp.bfloat16)
    a, b = (np.asarray(_velocity(m, latents, context), np.float64) for m in (wide, plain))
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)  # bf16: only the sums' order may differ
    for argv, message in (([str(tmp_path / "wide"), str(tmp_path / "again")], "coordinate channels already"),
                          ([str(tmp_path / "plain"), str(tmp_path / "wide")], "not an empty directory"),
                          ([str(tmp_path / "none"), str(tmp_path / "x")], "no converted model")):
        with pytest.raises(SystemExit):
            add_coordinates(argv)
        assert message in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="coordinate_channels must be a bool"):
        WAN_CONFIGS["tiny"].replace(coordinate_channels=1)
    with pytest.raises(ValueError, match="absolute_positions must be a bool"):
        WAN_CONFIGS["tiny"].replace(absolute_positions=1)


def test_sincos_embedding_matches_numpy():
    grid, dim = (3, 2, 5), 24  # rope_axis_dims(24) = (8, 8, 8)
    table = np.asarray(sincos_embedding(grid, dim, 100.0))
    f, h, w = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
    freqs = 100.0 ** (-np.arange(0, 8, 2) / 8)  # 4 frequencies an axis
    angles = np.concatenate([pos.reshape(-1, 1) * freqs for pos in (f, h, w)], axis=1)
    np.testing.assert_allclose(table, np.concatenate([np.sin(angles), np.cos(angles)], axis=1), atol=1e-6)


def test_shipped_absolute_position_teacher_fits_its_config_only():
    """The shipped teacher (`train/teacher`, trained with absolute positions) loads with the recipe it was
    trained on, and a recipe without them refuses it."""
    root = Path(__file__).resolve().parents[1]
    weights = f"model.weights={root / 'train' / 'teacher'}"
    fits = load_config(root / "train" / "configs" / "teacher.json", [weights])
    check_weights_config(fits.model, wan_config(fits.model))
    plain = load_config(root / "train" / "configs" / "teacher_wide_regions.json", [weights])
    with pytest.raises(ValueError, match="absolute_positions True \\(weights\\) vs False"):
        check_weights_config(plain.model, wan_config(plain.model))
