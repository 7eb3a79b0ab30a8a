"""umT5 text encoder: parity with transformers' `UMT5EncoderModel`, conversion of both key layouts,
the tokenizer, the Wan2.1 prompt pipeline (`TextEncoder`) and bad input.

The fixtures in tests/fixtures/umt5/ were made by tests/fixtures/make_umt5_fixtures.py
(transformers 5.24.0, torch 2.13.0 CPU; versions.json records them and the Wan2.1 commit whose
own `T5Encoder` loaded the Wan-named file strictly and agreed with transformers to 4e-7)."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert.__main__ import main as convert_main
from convert.umt5 import convert_umt5
from sparge_jax.models import UMT5_CONFIGS, WAN_CONFIGS, UMT5Encoder, UMT5Tokenizer, load_text_encoder, load_umt5
from sparge_jax.models.text_encoder import TextEncoder, clean_prompt
from sparge_jax.models.umt5 import UMT5Config, relative_position_buckets

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "umt5")
HF_DIR = os.path.join(FIXTURES, "hf")
WAN_PTH = os.path.join(FIXTURES, "wan", "models_t5_umt5-tiny-enc.pth")


@pytest.fixture(scope="module")
def io():
    return dict(np.load(os.path.join(FIXTURES, "io.npz")))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both fixture layouts converted to float32 by the CLI: {"hf": dir, "wan": dir}."""
    root = tmp_path_factory.mktemp("umt5")
    out = {}
    for layout, source in (("hf", HF_DIR), ("wan", WAN_PTH)):
        out[layout] = str(root / layout)
        assert convert_main([source, out[layout], "--dtype", "fp32", "--no-progress"]) == 0
    return out


def relative_error(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_relative_position_buckets_match_transformers(io):
    buckets = relative_position_buckets(512, 512, 32, 128)
    # Row 511 holds key - query = -511..0, column 511 of row 0 ... 511 holds 0..511.
    ours = np.concatenate([buckets[511, :511], buckets[0, :]])
    np.testing.assert_array_equal(ours, io["buckets"][np.argsort(io["relative"])])
    assert np.unique(ours).size == 31  # bucket 16 (distance 0 of the positive half) is never used


@pytest.mark.matmul_precision("highest")
@pytest.mark.parametrize("layout", ["hf", "wan"])
def test_converted_encoder_matches_transformers(layout, converted, io):
    model = load_umt5(converted[layout])
    assert model.config == UMT5_CONFIGS["tiny"]
    hidden = np.asarray(model(io["ids"], io["mask"]))
    assert hidden.dtype == np.float32 and hidden.shape == io["hidden"].shape
    # Every position, padded ones included (they attend to the real tokens in both).
    assert relative_error(hidden, io["hidden"]) < 1e-5
    context = np.asarray(TextEncoder(model).encode_ids(io["ids"], io["mask"]))
    valid = io["mask"].astype(bool)
    assert relative_error(context[valid], io["hidden"][valid]) < 1e-5
    assert not context[~valid].any() and (~valid).sum() == 17 + 39


def test_tokenizer_matches_transformers():
    with open(os.path.join(FIXTURES, "tokens.json")) as f:
        expected = json.load(f)
    ids, mask = UMT5Tokenizer(HF_DIR, expected["text_len"])(expected["prompts"])
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert ids.dtype == np.int32 and ids[3, -1] == 1  # truncated: the end token kept


def test_clean_prompt_like_wan():
    assert clean_prompt("  Ein   Hund läuft,\n über die\tStraße!  ") == "Ein Hund läuft, über die Straße!"
    assert clean_prompt("Tom &amp;amp; Jerry") == "Tom & Jerry"
    assert clean_prompt("cafÃ©") == "café"  # ftfy's mojibake fix


@pytest.mark.matmul_precision("highest")
def test_text_encoder_from_prompts(converted):
    encoder = load_text_encoder(converted["hf"], text_len=24)
    prompts = ["A cat walks across the garden.", "  城市的夜景  "]
    context = np.asarray(encoder(prompts))
    ids, mask = encoder.tokenizer([clean_prompt(p) for p in prompts])
    assert context.shape == (2, 24, 32) and context.dtype == np.float32
    assert mask.sum(1).tolist() == [23, 7]
    assert not context[mask == 0].any() and np.abs(context[mask == 1]).min() > 0
    np.testing.assert_allclose(context, np.asarray(encoder.encode_ids(ids, mask)), rtol=0, atol=0)
    # Padding does not change the real tokens' values (a prompt alone, encoded to its own length).
    alone = np.asarray(encoder.model(ids[1:, :7], mask[1:, :7]))
    assert relative_error(context[1, :7], alone[0]) < 1e-5
    assert sorted(os.listdir(os.path.join(converted["hf"], "tokenizer"))) == [
        "spiece.model", "tokenizer.json", "tokenizer_config.json"]


def test_default_bf16_conversion_close(tmp_path, io):
    convert_umt5(WAN_PTH, tmp_path / "bf16", progress=False, tokenizer=HF_DIR)
    model = load_umt5(tmp_path / "bf16")
    assert model.blocks[0].attn.q.kernel.dtype == np.dtype("bfloat16")
    valid = io["mask"].astype(bool)
    hidden = np.asarray(model(io["ids"], io["mask"]))
    assert relative_error(hidden[valid], io["hidden"][valid]) < 3e-2
    assert os.path.isfile(tmp_path / "bf16" / "tokenizer" / "tokenizer.json")


def test_wan_layout_without_tokenizer(converted, io):
    assert not os.path.exists(os.path.join(converted["wan"], "tokenizer"))
    encoder = load_text_encoder(converted["wan"])
    with pytest.raises(ValueError, match="no tokenizer"):
        encoder(["a prompt"])


def test_bad_model_input():
    model = UMT5Encoder(UMT5_CONFIGS["tiny"], rngs=nnx.Rngs(0))
    ids, mask = np.ones((2, 5), np.int32), np.ones((2, 5), np.int32)
    with pytest.raises(ValueError, match="ids must be integer"):
        model(ids.astype(np.float32), mask)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(ids, mask[:, :4])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, vocab_size=300\)"):
        model(ids * 300, mask)
    with pytest.raises(ValueError, match="num_buckets must be"):
        UMT5Config(num_buckets=30)
    with pytest.raises(ValueError, match="prompts must be a list"):
        UMT5Tokenizer(HF_DIR, 8)("one prompt")
    with pytest.raises(ValueError, match="tokenizer.json"):
        UMT5Tokenizer(FIXTURES)


def test_converter_errors(tmp_path, capsys):
    state = load_file(os.path.join(HF_DIR, "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(os.path.join(HF_DIR, "config.json"), broken / "config.json")
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    state["encoder.block.0.layer.0.SelfAttention.q.weight"] = state["encoder.block.0.layer.0.SelfAttention.q.weight"][:, :8]
    save_file(state, str(broken / "model.safetensors"))
    assert convert_main([str(broken), str(tmp_path / "out"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "does not match the umT5 encoder" in error
    assert "missing keys (1): blocks.1.ffn.fc2.weight" in error
    assert "blocks.0.attn.q.weight (32, 8) (expected (32, 32))" in error
    assert not os.path.exists(tmp_path / "out")
    assert convert_main([WAN_PTH, str(tmp_path / "o2"), "--config", "t2v-1.3b"]) == 2
    assert "config of a umT5 checkpoint must be one of ['tiny', 'umt5-xxl']" in capsys.readouterr().err
    assert convert_main([WAN_PTH, str(tmp_path / "o3"), "--tokenizer", str(tmp_path)]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    dit = os.path.join(os.path.dirname(FIXTURES), "wan_t2v")
    assert convert_main([dit, str(tmp_path / "o4"), "--tokenizer", HF_DIR]) == 2
    assert "--tokenizer is for umT5" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["wan release", "diffusers"])
def test_tokenizer_found_beside_the_weights(layout, tmp_path):
    """Wan2.1's release keeps the tokenizer in google/umt5-xxl/ beside the .pth; diffusers in a
    tokenizer/ folder beside text_encoder/."""
    if layout == "wan release":
        source, tokenizer = tmp_path / "Wan2.1-T2V-1.3B", tmp_path / "Wan2.1-T2V-1.3B" / "google" / "umt5-xxl"
        tokenizer.mkdir(parents=True)
        shutil.copy(WAN_PTH, source / "models_t5_umt5-xxl-enc-bf16.pth")
        source = source / "models_t5_umt5-xxl-enc-bf16.pth"
    else:
        source, tokenizer = tmp_path / "text_encoder", tmp_path / "tokenizer"
        source.mkdir()
        tokenizer.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(HF_DIR, name), source / name)
    for name in ("tokenizer.json", "spiece.model"):
        shutil.copy(os.path.join(HF_DIR, name), tokenizer / name)
    config, found = convert_umt5(source, tmp_path / "out", progress=False)
    assert found == str(tokenizer) and config == UMT5_CONFIGS["tiny"]
    assert sorted(os.listdir(tmp_path / "out" / "tokenizer")) == ["spiece.model", "tokenizer.json"]


def test_dit_folder_is_not_a_text_encoder(tmp_path):
    with pytest.raises(ValueError, match="must hold config.json and params/"):
        load_umt5(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(WAN_CONFIGS["tiny"].to_dict(), f)
    with pytest.raises(ValueError, match=r"unknown UMT5Config field\(s\) .*'patch_size'"):
        load_umt5(tmp_path)
