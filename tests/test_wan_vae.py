"""The Wan2.1 VAE: parity with diffusers' `AutoencoderKLWan` (fixtures from
tests/fixtures/make_vae_fixtures.py), both checkpoint key layouts through the converter,
causality of the chunked encode/decode, round-trip shapes and input errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert.__main__ import main
from convert.keys import flax_shape
from convert.original import flatten_params
from convert.vae import convert_vae_checkpoint, vae_source_names
from convert.vae_keys import vae_param_table
from sparge_jax.models import WanVAE, WanVAEConfig, load_wan_vae

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "wan_vae")
IO = np.load(os.path.join(FIXTURE, "io.npz"))
DIFFUSERS_CONFIG = json.load(open(os.path.join(FIXTURE, "config.json")))
MEAN = np.asarray(DIFFUSERS_CONFIG["latents_mean"], np.float32)
STD = np.asarray(DIFFUSERS_CONFIG["latents_std"], np.float32)

encode = nnx.jit(lambda model, video, normalize: model.encode(video, normalize=normalize), static_argnums=2)
decode = nnx.jit(lambda model, latents, normalized: model.decode(latents, normalized=normalized), static_argnums=2)


def channels_last(x):
    return np.moveaxis(x, 1, -1)


def relative_error(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """The fixture's diffusers folder converted (float32) and loaded."""
    out = tmp_path_factory.mktemp("vae") / "converted"
    convert_vae_checkpoint(FIXTURE, str(out), dtype="fp32", progress=False)
    return load_wan_vae(str(out))


def test_key_table_matches_model_and_diffusers_names():
    state = load_file(os.path.join(FIXTURE, "diffusion_pytorch_model.safetensors"))
    names = vae_source_names(state)
    config = WanVAEConfig(base_dim=4, z_dim=4, latents_mean=MEAN.tolist(), latents_std=STD.tolist())
    table = vae_param_table(config)
    assert set(names) == set(table)
    assert {k: tuple(state[names[k]].shape) for k in table} == {k: spec.shape for k, spec in table.items()}
    assert names["decoder.upsamples.7.time_conv.weight"] == "decoder.up_blocks.1.upsamplers.0.time_conv.weight"
    assert names["decoder.upsamples.4.shortcut.bias"] == "decoder.up_blocks.1.resnets.0.conv_shortcut.bias"
    assert names["encoder.middle.2.residual.6.weight"] == "encoder.mid_block.resnets.1.conv2.weight"
    assert names["conv1.weight"] == "quant_conv.weight" and names["conv2.bias"] == "post_quant_conv.bias"
    model = nnx.eval_shape(lambda: WanVAE(WanVAEConfig(), rngs=nnx.Rngs(0)))
    shapes = {path: tuple(p.shape) for path, p in flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
    assert shapes == {spec.flax_path: flax_shape(spec) for spec in vae_param_table(WanVAEConfig()).values()}


@pytest.mark.matmul_precision("highest")
@pytest.mark.parametrize("frames", [1, 9])
def test_encode_matches_diffusers(vae, frames):
    video, want = channels_last(IO[f"video_f{frames}"]), channels_last(IO[f"mean_f{frames}"])
    assert vae.config.latents_mean == tuple(MEAN.tolist())
    got = encode(vae, video, True)  # normalised, as the DiT takes them
    assert got.shape == want.shape and got.dtype == np.float32
    assert relative_error(got, (want - MEAN) / STD) < 1e-4
    if frames == 1:  # the raw posterior mean (one small compilation more)
        assert relative_error(encode(vae, video, False), want) < 1e-4


@pytest.mark.matmul_precision("highest")
@pytest.mark.parametrize("latent_frames", [1, 3])
def test_decode_matches_diffusers(vae, latent_frames):
    latents, want = channels_last(IO[f"latents_t{latent_frames}"]), channels_last(IO[f"decoded_t{latent_frames}"])
    got = decode(vae, (latents - MEAN) / STD, True)
    assert got.shape == want.shape == (latents.shape[0], 1 + 4 * (latent_frames - 1), 16, 24, 3)
    assert relative_error(got, want) < 1e-4
    if latent_frames == 1:
        assert relative_error(decode(vae, latents, False), want) < 1e-4


@pytest.mark.matmul_precision("highest")
def test_chunks_are_causal(vae):
    """A prefix of the video encodes to a prefix of the latents, and back."""
    video = channels_last(IO["video_f9"])
    latents = np.asarray(encode(vae, video, True))
    np.testing.assert_allclose(encode(vae, video[:, :5], True), latents[:, :2], rtol=1e-5, atol=1e-5)
    decoded = np.asarray(decode(vae, latents, True))
    assert decoded.shape == video.shape and np.all(np.abs(decoded) <= 1)  # encode -> decode round trip
    np.testing.assert_allclose(decode(vae, latents[:, :2], True), decoded[:, :5], rtol=1e-5, atol=1e-5)


def test_original_names_through_the_cli(vae, tmp_path):
    """Wan2.1_VAE.pth's key names (bf16) convert to the same params as the diffusers folder."""
    source = tmp_path / "wan"
    source.mkdir()
    shutil.copy(os.path.join(FIXTURE, "original_bf16.pth"), source / "Wan2.1_VAE.pth")
    shutil.copy(os.path.join(FIXTURE, "config.json"), source / "config.json")
    assert main([str(source / "Wan2.1_VAE.pth"), str(tmp_path / "out"), "--dtype", "bf16", "--no-progress"]) == 0
    got = flatten_params(nnx.to_pure_dict(nnx.state(load_wan_vae(str(tmp_path / "out")), nnx.Param)))
    want = flatten_params(nnx.to_pure_dict(nnx.state(vae, nnx.Param)))
    assert set(got) == set(want)
    for path, value in got.items():
        assert value.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]).astype(jax.numpy.bfloat16), path)


def test_converter_errors(tmp_path, capsys):
    state = load_file(os.path.join(FIXTURE, "diffusion_pytorch_model.safetensors"))
    assert main([FIXTURE, str(tmp_path / "a"), "--config", "t2v-1.3b"]) == 2
    assert "holds a Wan VAE" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file({k: v for k, v in state.items() if k != "decoder.conv_out.bias"}, str(broken / "vae.safetensors"))
    shutil.copy(os.path.join(FIXTURE, "config.json"), broken / "config.json")
    assert main([str(broken), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "does not match the Wan2.1 VAE" in err and "decoder.head.2.bias" in err
    assert not (tmp_path / "b").exists()
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(FIXTURE, "original_bf16.pth"), alone / "Wan2.1_VAE.pth")
    with pytest.raises(ValueError, match="latents_mean"):  # z_dim 4 and no diffusers config.json beside it
        convert_vae_checkpoint(str(alone / "Wan2.1_VAE.pth"), str(tmp_path / "c"), progress=False)
    with pytest.raises(ValueError, match="no VAE"):
        load_wan_vae(os.path.join(os.path.dirname(FIXTURE), "wan_t2v"))


def test_bad_inputs(vae):
    with pytest.raises(ValueError, match="frames must be 1 \\+ 4k"):
        vae.encode(np.zeros((1, 6, 16, 24, 3), np.float32))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(np.zeros((1, 5, 12, 24, 3), np.float32))
    with pytest.raises(ValueError, match="video must be"):
        vae.encode(np.zeros((1, 5, 16, 24), np.float32))
    with pytest.raises(ValueError, match="z_dim=4"):
        vae.decode(np.zeros((1, 2, 2, 3, 16), np.float32))
    with pytest.raises(ValueError, match="latents_mean must have z_dim"):
        WanVAEConfig(z_dim=4)
    with pytest.raises(ValueError, match="dim_mult"):
        WanVAEConfig(dim_mult=(1, 2))
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAEConfig(temporal_downsample=(True, True, True))
