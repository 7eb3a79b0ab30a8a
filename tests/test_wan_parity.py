"""Parity of the converted Flax Wan2.1 with diffusers' `WanTransformer3DModel`, and the
diffusers -> ours -> original -> ours round trip.

The fixtures in tests/fixtures/wan_{t2v,i2v}/ were made by tests/fixtures/make_wan_fixtures.py
(torch + diffusers in a side interpreter): tiny random diffusers models, random inputs, and
diffusers' float32 outputs.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from convert.original import diffusers_to_original, flatten_params, flax_to_original, save_original
from convert.pipeline import convert_checkpoint
from sparge_jax.models import load_wan

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def run_fixture(model, kind: str, folder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(our output, diffusers' output), both `(batch, frames, height, width, channels)`, on the
    inputs in `folder`/io.npz (default: the committed fixture of `kind`)."""
    io = np.load(os.path.join(folder or os.path.join(FIXTURES, f"wan_{kind}"), "io.npz"))
    video = io["hidden_states"].transpose(0, 2, 3, 4, 1)  # diffusers is channels-first
    extra = {}
    if kind == "i2v":
        out_dim = model.config.out_dim
        extra = dict(clip_fea=jnp.asarray(io["encoder_hidden_states_image"]), y=jnp.asarray(video[..., out_dim:]))
        video = video[..., :out_dim]
    out = _dense_velocity(model, jnp.asarray(video), jnp.asarray(io["timestep"]),
                          jnp.asarray(io["encoder_hidden_states"]), extra)
    return np.asarray(out), io["output"].transpose(0, 2, 3, 4, 1)


@nnx.jit
def _dense_velocity(model, latents, timestep, context, extra):
    """One compiled dense call (op by op a forward compiles hundreds of small programs: minutes on a GPU box)."""
    return model(latents, timestep, context, attention_mode="dense", **extra)[0]


@pytest.mark.matmul_precision("highest")
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_matches_diffusers(kind, tmp_path):
    config = convert_checkpoint(os.path.join(FIXTURES, f"wan_{kind}"), tmp_path / "ck", dtype="fp32",
                                progress=False)
    assert config.model_type == kind and config.num_heads == 2 and config.head_dim == 20
    ours, expected = run_fixture(load_wan(tmp_path / "ck"), kind)
    assert ours.shape == expected.shape
    rel = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    assert rel < 1e-5, rel


def test_diffusers_own_conversion_accepted_our_original_format():
    with open(os.path.join(FIXTURES, "wan_roundtrip.json")) as f:
        report = json.load(f)
    for kind, keys in (("t2v", 69), ("i2v", 87)):
        assert report[kind]["ok"] is True and report[kind]["keys"] == keys
        assert report[kind]["same_key_set"] and report[kind]["output_bitwise_equal"]
        assert report[kind]["mismatched_tensors"] == []


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_round_trip_diffusers_ours_original_ours(kind, tmp_path):
    source = os.path.join(FIXTURES, f"wan_{kind}")
    convert_checkpoint(source, tmp_path / "first", dtype="fp32", progress=False)
    model = load_wan(tmp_path / "first")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    original = flax_to_original(params, model.config)
    # Our writer of the original format agrees with the direct diffusers -> original renaming.
    direct = diffusers_to_original(load_file(os.path.join(source, "diffusion_pytorch_model.safetensors")))
    assert sorted(original) == sorted(direct)
    for key in direct:
        np.testing.assert_array_equal(original[key], direct[key], err_msg=key)
    (tmp_path / "orig").mkdir()
    save_original(original, str(tmp_path / "orig" / "model.safetensors"))
    again = convert_checkpoint(tmp_path / "orig" / "model.safetensors", tmp_path / "second", config=model.config,
                               dtype="fp32", progress=False)
    assert again == model.config
    second = nnx.to_pure_dict(nnx.state(load_wan(tmp_path / "second"), nnx.Param))
    first_flat, second_flat = flatten_params(params), flatten_params(second)
    assert sorted(first_flat) == sorted(second_flat)
    for path, value in first_flat.items():
        np.testing.assert_array_equal(np.asarray(second_flat[path]), np.asarray(value), err_msg=path)
