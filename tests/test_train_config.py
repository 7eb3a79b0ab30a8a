"""Strict settings: every config value type- and range-checked at load time, data indexes checked
against their shards when opened, converted weights checked against model.preset."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from sparge_jax.dtypes import DTYPES
from train.config import load_config
from train.data import ShardedLatents, SyntheticLatents, write_dataset
from train.loop import train
from train.model import abstract_model
from train_launch import ROOT

BAD = [
    ("optim.lr=abc", "config optim.lr='abc': expected a finite number"),
    ("optim.lr=-1e-3", "config optim.lr=-0.001: must be > 0"),
    ("optim.lr=NaN", "config optim.lr=nan: expected a finite number"),
    ("optim.lr=true", "config optim.lr=True: expected a finite number"),
    ("steps=3.5", "config steps=3.5: expected an int"),
    ("steps=true", "config steps=True: expected an int"),
    ("steps=0", "config steps=0: must be >= 1"),
    ("model.remat=yes", "config model.remat='yes': expected true or false"),
    ("model.remat=1", "config model.remat=1: expected true or false"),
    ("model.preset=t2v-2b", "config model.preset='t2v-2b': must be a key of sparge_jax.models.wan.WAN_CONFIGS"),
    ("model.compute_dtype=float16", "config model.compute_dtype='float16': must be 'bfloat16' or 'float32'"),
    ("model.remat_input_dtype=fp8", "config model.remat_input_dtype='fp8': must be 'bfloat16' or 'float32'"),
    ("model.remat_input_dtype=bfloat16", "model.remat_input_dtype='bfloat16' needs model.remat=true and "
                                         "model.overrides.scan_layers=true"),
    ("model.residual_dtype=float16", "config model.residual_dtype='float16': must be 'bfloat16' or 'float32'"),
    ("model.residual_dtype=bf16", "config model.residual_dtype='bf16': must be 'bfloat16' or 'float32'"),
    ("optim.mu_dtype=float16", "config optim.mu_dtype='float16': must be 'bfloat16' or 'float32'"),
    ("model.weights=3", "config model.weights=3: expected a string or null"),
    ("optim.warmup_steps=-5", "config optim.warmup_steps=-5: must be >= 0"),
    ("optim.final_lr_ratio=2", "config optim.final_lr_ratio=2: must be in [0, 1]"),
    ("optim.b2=1", "config optim.b2=1: must be in [0, 1)"),
    ("optim.trainable=(", "config optim.trainable='(': must be a regular expression"),
    ("optim.ema_decay=1", "config optim.ema_decay=1: must be in (0, 1), or null (no EMA)"),
    ("optim.ema_decay=0", "config optim.ema_decay=0: must be in (0, 1), or null (no EMA)"),
    ("optim.ema_decay=-0.5", "config optim.ema_decay=-0.5: must be in (0, 1), or null (no EMA)"),
    ("optim.ema_decay=high", "config optim.ema_decay='high': expected a finite number or null"),
    ("log_every=0", "config log_every=0: must be >= 1"),
    ("checkpoint.keep=0", "config checkpoint.keep=0: must be >= 1"),
    ("checkpoint.every=-1", "config checkpoint.every=-1: must be >= 1"),
    ("guard.max_consecutive_skips=0", "config guard.max_consecutive_skips=0: must be >= 1"),
    ("data.validate=maybe", "config data.validate='maybe': expected true or false"),
    ("data.synthetic_latent_shape=[2,0,4]", "config data.synthetic_latent_shape=(2, 0, 4): must be 3 positive ints"),
    ("data.synthetic_latent_shape=[2,true,4]", "config data.synthetic_latent_shape=(2, True, 4): expected a list of ints"),
    ("data.batch_size=0", "config data.batch_size=0: must be >= 1"),
    ("objective.shift=0", "config objective.shift=0: must be > 0"),
    ("objective.pure_noise_share=1", "config objective.pure_noise_share=1: must be in [0, 1)"),
    ("objective.flow_weight=-1", "config objective.flow_weight=-1: must be >= 0"),
    ("optim=3", "config optim=3: expected a section"),
    ("eval_procedural.max_shapes=0", "config eval_procedural.max_shapes=0: must be >= 1"),
    ("eval_procedural.max_shapes=2", "eval_procedural needs eval_every > 0"),
    ("compiler_options=[]", "config compiler_options=[]: expected a dict"),
    ("compiler_options.xla_gpu_enable_triton_gemm=[0]",
     "config compiler_options={'xla_gpu_enable_triton_gemm': [0]}: must be a dict of option name -> bool"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_refused_naming_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message), str(err.value)


def test_good_values_load():
    cfg = load_config(None, ["optim.lr=1", "optim.trainable=self_attn", "model.weights=/w", "data.validate=true",
                             "optim.final_lr_ratio=0", "checkpoint.keep=1", "optim.warmup_steps=0", "optim.ema_decay=0.999"])
    assert (cfg.optim.lr, cfg.optim.trainable, cfg.model.weights, cfg.data.validate) == (1, "self_attn", "/w", True)
    assert cfg.optim.ema_decay == 0.999 and load_config(None).optim.ema_decay is None  # off by default
    cfg = load_config(None, ["optim.mu_dtype=bfloat16", "model.remat_input_dtype=bfloat16",
                             "model.overrides.scan_layers=true"])
    assert (cfg.optim.mu_dtype, cfg.model.remat_input_dtype) == ("bfloat16", "bfloat16")
    default = load_config(None)
    assert (default.optim.mu_dtype, default.model.remat_input_dtype) == ("float32", "float32")
    assert default.compiler_options == {}
    assert (load_config(None, ["model.residual_dtype=bfloat16"]).model.residual_dtype, default.model.residual_dtype) \
        == ("bfloat16", "float32")
    cfg = load_config(None, ["compiler_options.xla_gpu_enable_triton_gemm=false", "compiler_options.a=3"])
    assert cfg.compiler_options == {"xla_gpu_enable_triton_gemm": False, "a": 3}


def test_compiler_options_reach_the_training_steps_compile():
    """`compiler_options` are the step's XLA options: an unknown name fails its compile (a GPU
    option is accepted and ignored on CPU: tests/test_step_benchmarks.py runs one)."""
    cfg = load_config(None, ["data.synthetic_latent_shape=[2,6,6]", "data.synthetic_text_len=5",
                             "model.compute_dtype=float32", "model.overrides.num_layers=1", "steps=1",
                             "compiler_options.no_such_option=true"])
    with pytest.raises(Exception, match="No such compile option: 'no_such_option'"):
        train(cfg, progress=False)


@pytest.mark.slow
def test_eval_procedural_sets_the_heldout_clips_and_defaults_to_the_training_ones():
    """Fine-tuning on shifted clips, evaluated on others: `eval_procedural` takes the fields it
    leaves out from data.procedural, and the step-0 evaluation (same initial params) follows the
    held-out clips it names, not the training clips."""
    tiny = ["model.overrides.num_layers=1", "model.overrides.in_dim=12", "model.overrides.out_dim=12",
            "model.compute_dtype=float32", "model.remat=false", "objective.student_attention=dense",
            "objective.distill_weight=0", "objective.flow_weight=1", "data.source=procedural",
            "data.procedural.frames=2", "data.procedural.height=16", "data.procedural.width=16",
            "data.procedural.space_to_depth=2", "data.batch_size=2", "steps=1", "eval_every=1", "eval_examples=2"]
    shifted = load_config(None, [*tiny, "data.procedural.max_shapes=1", "eval_procedural.max_shapes=3"])
    assert shifted.heldout_procedural == dataclasses.replace(shifted.data.procedural, max_shapes=3)
    assert load_config(None, tiny).eval_procedural is None
    first_evaluation = lambda cfg: train(cfg, progress=False).evaluations[0]
    own = first_evaluation(load_config(None, [*tiny, "data.procedural.max_shapes=3"]))
    assert first_evaluation(shifted) == own
    assert first_evaluation(load_config(None, [*tiny, "data.procedural.max_shapes=1"]))["heldout_flow_loss"] \
        != own["heldout_flow_loss"]


def test_residual_dtype_reaches_the_model():
    """`model.residual_dtype` is the `WanModel`'s (student and teacher share its graphdef)."""
    for name in ("float32", "bfloat16"):
        parts, like = abstract_model(load_config(None, [f"model.residual_dtype={name}"]).model)
        assert nnx.merge(parts.graphdef, like, parts.rest).residual_dtype == DTYPES[name]


def test_cli_reports_a_config_error_in_one_line_with_exit_status_2():
    proc = subprocess.run([sys.executable, "-m", "train", "optim.lr=abc"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["sparge-train: config error: config optim.lr='abc': expected a finite number"]


@pytest.fixture
def dataset(tmp_path):
    """8 examples (latents (1, 2, 2, 4), context (3, 8)) in 2 shards of 4."""
    return write_dataset(tmp_path / "ds", SyntheticLatents(8, (1, 2, 2, 4), 3, 8), 4)


def _edit_index(path, change):
    index = json.loads((path / "index.json").read_text())
    change(index)
    (path / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("change, message", [
    (lambda i: i["fields"]["latents"].update(shape=[1, 2, 2, 5]),
     "shard-00000.safetensors: 'latents' has shape (4, 1, 2, 2, 4); index.json says (4, 1, 2, 2, 5)"),
    (lambda i: i.update(shards=[]), "index.json lists no shards"),
    (lambda i: i["shards"][1].update(count=5),
     "shard-00001.safetensors: 'latents' has shape (4, 1, 2, 2, 4); index.json says (5, 1, 2, 2, 4)"),
    (lambda i: i["shards"][1].update(count=0), "shard 1 must be {'file': name, 'count': positive int}"),
    (lambda i: i["shards"].append({"file": "shard-00002.safetensors", "count": 4}),
     "shard-00002.safetensors (listed in index.json) does not exist"),
    (lambda i: i["fields"].pop("context"), "must give 'fields' ['latents', 'context']"),
], ids=["shape", "no-shards", "count-too-large", "count-zero", "missing-file", "no-field"])
def test_a_bad_index_is_refused_when_opened(dataset, change, message):
    _edit_index(dataset, change)
    with pytest.raises(ValueError) as err:
        ShardedLatents(dataset)
    assert message in str(err.value), str(err.value)


def test_shards_with_a_wrong_dtype_or_damaged_header_are_refused(dataset):
    save_file({"latents": np.zeros((4, 1, 2, 2, 4), np.int32), "context": np.zeros((4, 3, 8), np.float32)},
              str(dataset / "shard-00001.safetensors"))
    with pytest.raises(ValueError, match="shard-00001.safetensors: 'latents' has dtype I32; expected a float dtype"):
        ShardedLatents(dataset)
    (dataset / "shard-00001.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="shard-00001.safetensors is not a readable safetensors file"):
        ShardedLatents(dataset)


def test_converted_weights_of_another_preset_are_refused_before_loading(tmp_path):
    import jax

    from sparge_jax.models.checkpoint import save_wan_params
    from train.model import abstract_model, init_params, wan_config

    parts, like = abstract_model(load_config(None, []).model)  # the tiny preset, 2 layers
    weights = str(tmp_path / "w")
    save_wan_params(weights, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), like), parts.config)
    one_layer = load_config(None, [f"model.weights={weights}", "model.overrides.num_layers=1"]).model
    with pytest.raises(ValueError) as err:
        init_params(one_layer, 0, None)
    assert str(err.value) == (f"model.weights {weights!r} do not fit model.preset='tiny' + model.overrides: "
                              "num_layers 2 (weights) vs 1; the weights match model.preset='tiny'")
    big = load_config(None, [f"model.weights={weights}", "model.preset=t2v-1.3b"]).model
    with pytest.raises(ValueError, match=r"dim 64 \(weights\) vs 1536; ffn_dim 128 \(weights\) vs 8960; text_dim 32 "
                                         r"\(weights\) vs 4096; num_heads 4 \(weights\) vs 12; num_layers 2 \(weights\) "
                                         r"vs 30; the weights match model.preset='tiny'$"):
        init_params(big, 0, None)
    with pytest.raises(ValueError, match=r"unknown WanConfig field\(s\) \['layers'\]"):
        wan_config(load_config(None, ["model.overrides.layers=1"]).model)


def test_the_teacher_recipe_is_the_absolute_position_recipe_on_4_pixel_tokens():
    """train/configs/teacher.json (the shipped teacher's, docs/teacher.md): the same model, objective and
    schedule as teacher_wide_regions_abspos.json, on 16 x 64 x 64 clips of space-to-depth 2, so a
    token is 4 x 4 pixels and a clip still 4096 tokens."""
    from train.procedural import clip_spec

    configs = ROOT / "train" / "configs"
    small, wide = (load_config(configs / name) for name in ("teacher.json",
                                                            "teacher_wide_regions_abspos.json"))
    parts, _ = abstract_model(small.model)
    spec = clip_spec(small.data.procedural, parts.config.text_dim, parts.config.in_dim)
    assert spec.latent_shape == (16, 32, 32, 12) and parts.config.out_dim == 12
    pixels = [spec.space_to_depth * p for p in parts.config.patch_size[1:]]
    assert pixels == [4, 4] and np.prod(spec.latent_shape[:3]) // np.prod(parts.config.patch_size) == 4096
    def same(cfg):  # everything but the channels and the clips' pixel size
        tree = dataclasses.asdict(cfg)
        for key in ("in_dim", "out_dim"):
            tree["model"]["overrides"].pop(key)
        for key in ("height", "width", "space_to_depth"):
            tree["data"]["procedural"].pop(key)
        return tree

    assert same(small) == same(wide)
