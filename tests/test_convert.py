"""The checkpoint converter: key names, readers (.pth without torch, sharded safetensors),
config inference, dtype, CLI, and the errors on unknown/missing/mis-shaped keys."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert.__main__ import main
from convert.infer import infer_architecture
from convert.keys import diffusers_to_original_key, is_diffusers_format
from convert.original import diffusers_to_original, flatten_params
from convert.pipeline import convert_checkpoint
from convert.pth import PthReader
from convert.readers import checkpoint_files
from sparge_jax.models import WAN_CONFIGS, load_wan, read_wan_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
T2V = os.path.join(FIXTURES, "wan_t2v")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def diffusers_state():
    return load_file(os.path.join(T2V, "diffusion_pytorch_model.safetensors"))


def _params(directory):
    return flatten_params(nnx.to_pure_dict(nnx.state(load_wan(directory), nnx.Param)))


def _write_dir(path, state, config=True):
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    if config:
        (path / "config.json").write_text(open(os.path.join(T2V, "config.json")).read())
    return path


def test_diffusers_key_names():
    expected = {
        "blocks.3.attn1.to_q.weight": "blocks.3.self_attn.q.weight",
        "blocks.3.attn2.to_out.0.bias": "blocks.3.cross_attn.o.bias",
        "blocks.3.attn2.add_k_proj.weight": "blocks.3.cross_attn.k_img.weight",
        "blocks.3.attn2.norm_added_k.weight": "blocks.3.cross_attn.norm_k_img.weight",
        "blocks.3.norm2.weight": "blocks.3.norm3.weight",
        "blocks.3.ffn.net.0.proj.weight": "blocks.3.ffn.0.weight",
        "blocks.3.ffn.net.2.bias": "blocks.3.ffn.2.bias",
        "blocks.3.scale_shift_table": "blocks.3.modulation",
        "scale_shift_table": "head.modulation",
        "proj_out.weight": "head.head.weight",
        "condition_embedder.time_proj.weight": "time_projection.1.weight",
        "condition_embedder.time_embedder.linear_2.bias": "time_embedding.2.bias",
        "condition_embedder.text_embedder.linear_1.weight": "text_embedding.0.weight",
        "condition_embedder.image_embedder.ff.net.2.weight": "img_emb.proj.3.weight",
        "condition_embedder.image_embedder.norm2.bias": "img_emb.proj.4.bias",
        "model.diffusion_model.patch_embedding.weight": "patch_embedding.weight",
    }
    for key, original in expected.items():
        assert diffusers_to_original_key(key) == original
    assert is_diffusers_format(expected) and not is_diffusers_format(expected.values())


def test_infer_architecture(diffusers_state):
    shapes = {k: v.shape for k, v in diffusers_to_original(diffusers_state).items()}
    fields = infer_architecture(shapes, {"num_attention_heads": 2})
    assert fields == dict(model_type="t2v", patch_size=(1, 2, 2), in_dim=4, dim=40, ffn_dim=72, freq_dim=256,
                          text_dim=24, out_dim=4, num_heads=2, num_layers=2, qk_norm=True, cross_attn_norm=True)
    with pytest.raises(ValueError, match="num_heads"):
        infer_architecture(shapes, None)  # dim 40 is no multiple of Wan's 128-channel heads
    with pytest.raises(ValueError, match="patch_embedding.weight"):
        infer_architecture({k: v for k, v in shapes.items() if not k.startswith("patch")}, {"num_heads": 2})


def test_pth_reader_without_torch(diffusers_state):
    """original_bf16.pth was written by torch.save; read it with the pure-Python reader."""
    reader = PthReader(os.path.join(T2V, "original_bf16.pth"))
    original = diffusers_to_original(diffusers_state)
    assert sorted(reader.keys()) == sorted(original)
    for key, value in original.items():
        got = reader.read(key)
        assert got.dtype == ml_dtypes.bfloat16 and reader.shape(key) == value.shape
        np.testing.assert_array_equal(got, value.astype(ml_dtypes.bfloat16), err_msg=key)
    reader.close()


def test_pth_input_converts_like_safetensors(tmp_path):
    pth = os.path.join(T2V, "original_bf16.pth")
    convert_checkpoint(pth, tmp_path / "from_pth", dtype="fp32", progress=False)
    convert_checkpoint(T2V, tmp_path / "from_st", dtype="bf16", progress=False)
    from_pth, from_st = _params(tmp_path / "from_pth"), _params(tmp_path / "from_st")
    for path, value in from_st.items():
        assert from_pth[path].dtype == np.float32 and value.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(from_pth[path]), np.asarray(value, np.float32), err_msg=path)


def test_legacy_pth_is_read_by_torch(tmp_path):
    """A legacy (non-zip) .pth, which torch cannot memory-map, is loaded whole and converts
    like the zip file it was re-saved from."""
    torch = pytest.importorskip("torch")
    pth = os.path.join(T2V, "original_bf16.pth")
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(pth, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "config.json").write_bytes(open(os.path.join(T2V, "config.json"), "rb").read())  # heads of dim 40
    convert_checkpoint(legacy, tmp_path / "from_legacy", dtype="fp32", progress=False)
    convert_checkpoint(pth, tmp_path / "from_zip", dtype="fp32", progress=False)
    from_legacy, from_zip = _params(tmp_path / "from_legacy"), _params(tmp_path / "from_zip")
    assert from_legacy.keys() == from_zip.keys()
    for path, value in from_zip.items():
        np.testing.assert_array_equal(np.asarray(from_legacy[path]), np.asarray(value), err_msg=path)


def test_sharded_safetensors_with_index(tmp_path, diffusers_state):
    keys = sorted(diffusers_state)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    weight_map = {}
    for n, chunk in enumerate(np.array_split(np.array(keys), 3)):
        name = f"diffusion_pytorch_model-{n + 1:05d}-of-00003.safetensors"
        save_file({k: diffusers_state[k] for k in chunk}, str(shard_dir / name))
        weight_map.update({k: name for k in chunk})
    (shard_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (shard_dir / "config.json").write_text(open(os.path.join(T2V, "config.json")).read())
    assert len(checkpoint_files(str(shard_dir))[1]) == 3
    convert_checkpoint(shard_dir, tmp_path / "a", dtype="fp32", progress=False)
    convert_checkpoint(shard_dir / "diffusion_pytorch_model.safetensors.index.json", tmp_path / "b", dtype="fp32",
                       progress=False)
    convert_checkpoint(T2V, tmp_path / "c", dtype="fp32", progress=False)
    single = _params(tmp_path / "c")
    for other in (_params(tmp_path / "a"), _params(tmp_path / "b")):
        assert sorted(other) == sorted(single)
        for path in single:
            np.testing.assert_array_equal(np.asarray(other[path]), np.asarray(single[path]))
    os.remove(shard_dir / "diffusion_pytorch_model-00002-of-00003.safetensors")
    with pytest.raises(ValueError, match="missing"):
        checkpoint_files(str(shard_dir))


def test_dtype_and_loader_options(tmp_path):
    config = convert_checkpoint(T2V, tmp_path / "ck", progress=False)  # bf16 by default
    assert read_wan_config(tmp_path / "ck") == config
    bf16 = load_wan(tmp_path / "ck")
    assert {v.dtype for v in _params(tmp_path / "ck").values()} == {np.dtype(ml_dtypes.bfloat16)}
    fp32 = load_wan(tmp_path / "ck", param_dtype=np.float32, attention_mode="dense", dense_layers=(0,),
                    residual_dtype=ml_dtypes.bfloat16)
    assert fp32.config.attention_mode == "dense" and fp32.config.dense_layers == (0,)
    assert (bf16.residual_dtype, fp32.residual_dtype) == (np.float32, ml_dtypes.bfloat16)
    assert bf16.patch_embedding.kernel.dtype == ml_dtypes.bfloat16
    assert fp32.patch_embedding.kernel.dtype == np.float32
    with pytest.raises(ValueError, match="dtype"):
        convert_checkpoint(T2V, tmp_path / "x", dtype="fp8", progress=False)
    with pytest.raises(ValueError, match="config.json"):
        load_wan(tmp_path)


def test_mixed_dtype_params_load_in_the_widest_without_rounding(tmp_path):
    """A training run's params (float32 trained leaves, bf16 frozen ones) saved for the sampler
    load with every stored value intact: held in float32 unless param_dtype says otherwise."""
    from sparge_jax.models import WanModel, save_wan_params

    config = WAN_CONFIGS["tiny"]
    params = nnx.to_pure_dict(nnx.state(WanModel(config, rngs=nnx.Rngs(0)), nnx.Param))
    mixed = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "self_attn" in jax.tree_util.keystr(path) else x.astype(ml_dtypes.bfloat16), params)
    save_wan_params(str(tmp_path / "ck"), mixed, config)
    loaded = flatten_params(nnx.to_pure_dict(nnx.state(load_wan(str(tmp_path / "ck")), nnx.Param)))
    want = flatten_params(mixed)
    assert {v.dtype for v in loaded.values()} == {np.dtype(np.float32)}
    assert any("self_attn" in name for name in want)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(value, np.float32), err_msg=name)
    bf16 = load_wan(str(tmp_path / "ck"), param_dtype=ml_dtypes.bfloat16)
    assert bf16.patch_embedding.kernel.dtype == ml_dtypes.bfloat16


def _assert_no_output(tmp_path, name):
    assert not (tmp_path / name).exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


@pytest.mark.parametrize("case", ["unknown", "missing", "misshaped", "all three"])
def test_key_errors_list_keys_and_leave_nothing(case, tmp_path, diffusers_state):
    state = dict(diffusers_state)
    expected = []
    if case in ("unknown", "all three"):
        state["blocks.0.attn1.to_z.weight"] = np.ones((40, 40), np.float32)
        expected.append("unknown keys (1): blocks.0.self_attn.to_z.weight")
    if case in ("missing", "all three"):
        del state["blocks.1.attn2.to_v.bias"], state["blocks.0.scale_shift_table"]
        expected.append("missing keys (2): blocks.0.modulation, blocks.1.cross_attn.v.bias")
    if case in ("misshaped", "all three"):
        state["blocks.1.ffn.net.2.weight"] = np.ones((40, 71), np.float32)
        expected.append("mis-shaped keys (1): blocks.1.ffn.2.weight (40, 71) (expected (40, 72))")
    source = _write_dir(tmp_path / "src", state)
    with pytest.raises(ValueError) as error:
        convert_checkpoint(source, tmp_path / "out", progress=False)
    for line in expected:
        assert line in str(error.value)
    _assert_no_output(tmp_path, "out")


def test_ignored_and_prefixed_keys(tmp_path, diffusers_state):
    state = {"model.diffusion_model." + k: v for k, v in diffusers_to_original(diffusers_state).items()}
    state["blocks.0.cross_attn.norm_added_q.weight"] = np.ones(40, np.float32)
    source = _write_dir(tmp_path / "src", state)
    convert_checkpoint(source, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "params").is_dir()


def test_config_option_and_output_checks(tmp_path):
    with pytest.raises(ValueError, match="mis-shaped keys"):
        convert_checkpoint(T2V, tmp_path / "out", config="tiny", progress=False)
    _assert_no_output(tmp_path, "out")
    with pytest.raises(ValueError, match="config must be one of"):
        convert_checkpoint(T2V, tmp_path / "out", config="t2v-2b", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ValueError, match="not an empty directory"):
        convert_checkpoint(T2V, tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep"
    with pytest.raises(ValueError, match="does not exist"):
        convert_checkpoint(tmp_path / "nothing.safetensors", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="legacy"):  # without torch: "needs torch"; with it: unreadable
        (tmp_path / "old.pth").write_bytes(b"\x80\x02not a zip")
        convert_checkpoint(tmp_path / "old.pth", tmp_path / "out", progress=False)
    assert "t2v-1.3b" in WAN_CONFIGS


def test_cli(tmp_path, capsys):
    assert main([T2V, str(tmp_path / "ck"), "--dtype", "fp32", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    # the input it read, and the checkpoint it left aside in the same folder
    assert out[0] == (f"reading {os.path.abspath(T2V)}/diffusion_pytorch_model.safetensors; "
                      f"not read: {os.path.abspath(T2V)}/original_bf16.pth")
    assert out[1] == (f"wrote {tmp_path / 'ck'}: preset none (an architecture of its own), t2v, dim 40, 2 layers, "
                      "fp32")
    assert read_wan_config(tmp_path / "ck").num_heads == 2
    # The output directory gets the mode `mkdir` gives (not mkdtemp's private 0700).
    os.mkdir(tmp_path / "probe")
    assert os.stat(tmp_path / "ck").st_mode & 0o777 == os.stat(tmp_path / "probe").st_mode & 0o777
    os.rmdir(tmp_path / "probe")
    assert main([T2V, str(tmp_path / "bad"), "--config", "tiny", "--no-progress"]) == 2
    assert "mis-shaped keys" in capsys.readouterr().err
    _assert_no_output(tmp_path, "bad")


def test_module_entry_point_and_numpy_only_writer():
    help_text = subprocess.run([sys.executable, "-m", "convert", "--help"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout
    assert "--dtype {bf16,fp32}" in help_text and "--config" in help_text
    probe = ("import sys, convert.original, convert.keys, convert.layout; "
             "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'torch')]")
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True)


@pytest.mark.parametrize("stage", ["staging", "saving"])
def test_failure_after_staging_leaves_nothing(stage, tmp_path, monkeypatch):
    import convert.pipeline
    import sparge_jax.models.checkpoint

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    if stage == "staging":  # fails on the tenth tensor, with the staging file half written
        real, calls = convert.pipeline.torch_to_flax, []

        def flaky(array, kind):
            calls.append(kind)
            if len(calls) == 10:
                (partial,) = [p for p in os.listdir(tmp_path) if p.startswith(".out.partial-")]
                assert os.path.getsize(tmp_path / partial / "tensors.staging") > 0
                boom()
            return real(array, kind)

        monkeypatch.setattr(convert.pipeline, "torch_to_flax", flaky)
    else:
        monkeypatch.setattr(sparge_jax.models.checkpoint, "save_wan_params", boom)
    with pytest.raises(RuntimeError, match="boom"):
        convert_checkpoint(T2V, tmp_path / "out", progress=False)
    assert os.listdir(tmp_path) == []


def test_safetensors_reader_rejects_bad_files(tmp_path, diffusers_state):
    good = _write_dir(tmp_path / "src", diffusers_state, config=False) / "model.safetensors"
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:-100])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    for name, message in [("truncated", "do not fit"), ("garbage", "not JSON"), ("short", "bad header size")]:
        with pytest.raises(ValueError, match=message):
            convert_checkpoint(tmp_path / f"{name}.safetensors", tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["garbage.safetensors", "short.safetensors", "src", "truncated.safetensors"]


def test_init_writes_a_random_weight_checkpoint_of_a_preset(tmp_path, capsys):
    from sparge_jax.models import WanModel
    from train.config import ModelSettings
    from train.model import check_weights_config, wan_config

    out = tmp_path / "tiny"
    assert main(["--init", "tiny", str(out), "--dtype", "fp32", "--seed", "3"]) == 0
    want = nnx.to_pure_dict(nnx.state(WanModel(WAN_CONFIGS["tiny"], rngs=nnx.Rngs(3)), nnx.Param))
    count = sum(np.size(x) for x in jax.tree.leaves(want))
    assert capsys.readouterr().out.strip() == (f"wrote {out}: preset tiny, random weights (seed 3), {count:,} "
                                               "parameters, fp32")
    got = nnx.to_pure_dict(nnx.state(load_wan(str(out)), nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    assert read_wan_config(out) == WAN_CONFIGS["tiny"]
    settings = ModelSettings(preset="tiny", weights=str(out))
    check_weights_config(settings, wan_config(settings))  # training accepts it as model.weights of the preset

    assert main(["--init", "tiny", str(out)]) == 2  # not into a non-empty directory
    assert "not an empty directory" in capsys.readouterr().err
    for argv in (["--init", "tiny", str(tmp_path / "a"), str(tmp_path / "b")], ["--init", "tiny"],
                 ["--init", "no-such", str(tmp_path / "c")], [str(tmp_path / "a")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--init PRESET takes one directory" in err and "invalid choice: 'no-such'" in err
    assert "required: input, output_dir" in err
