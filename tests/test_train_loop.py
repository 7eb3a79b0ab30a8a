"""End-to-end distillation steps with the real tiny WanModel on one CPU device.

Four short runs (module fixtures) serve all checks, to keep compile time low.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.config import load_config
from train.loop import data_source, train
from train.model import DTYPES, abstract_model, cast_floats, init_params, velocity_fn
from train.objective import distillation_loss
from train.optimizer import path_string
from train.sharding import make_mesh, param_shardings

BASE = ["data.synthetic_latent_shape=[2,6,6]", "data.synthetic_text_len=5", "model.compute_dtype=float32",
        "optim.warmup_steps=0", "data.batch_size=4", "model.overrides.num_layers=1"]
# Adam's eps well above round-off: parameters whose exact gradient is 0 (key biases, which
# softmax ignores) must not turn round-off differences into full-size steps.
EXACT = [*BASE, "steps=2", "optim.eps=1e-4"]
# The EXACT runs compare float32 computations that differ only in round-off (sparse keeping
# every block vs dense, accumulation, remat) at 1e-5..1e-9: matmuls in full float32 (a GPU
# would use TF32 by default, whose ~1e-3 error no longer cancels).


def config(*overrides):
    return load_config(None, list(overrides))


def run(tmp_path_factory, *overrides):
    metrics = tmp_path_factory.mktemp("run") / "metrics.jsonl"
    result = train(config(*overrides, f"metrics_path={metrics}"), progress=False)
    return result, [json.loads(line) for line in metrics.read_text().splitlines()]


def initial_params(cfg):
    mesh = make_mesh(cfg.mesh)
    _, abstract = abstract_model(cfg.model)
    return init_params(cfg.model, cfg.seed, param_shardings(abstract, mesh))


def flat(tree):
    return {path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def accum_one(tmp_path_factory):
    with jax.default_matmul_precision("highest"):
        return run(tmp_path_factory, *EXACT, "data.grad_accum=1", "model.remat=true")


@pytest.fixture(scope="module")
def accum_two(tmp_path_factory):
    with jax.default_matmul_precision("highest"):
        return run(tmp_path_factory, *EXACT, "data.grad_accum=2", "model.remat=false")


@pytest.mark.matmul_precision("highest")
def test_student_starts_equal_to_teacher_and_only_sparsity_separates_them(tmp_path_factory, accum_one, capsys):
    _, keep_all = run(tmp_path_factory, *EXACT, "model.overrides.sparse.rule=topk", "model.overrides.sparse.topk=1.0")
    _, dropped = accum_one  # same data, noise and initial weights; blocks dropped
    assert dropped[0]["loss"] > 1e-6
    assert keep_all[0]["loss"] < 1e-9 * dropped[0]["loss"], (keep_all[0]["loss"], dropped[0]["loss"])
    # the logged block sparsity says which run skipped blocks; the keep-all one warns once (2 logged steps)
    assert all(r["block_sparsity"] > 0 for r in dropped) and all(r["block_sparsity"] == 0 for r in keep_all)
    err = capsys.readouterr().err
    assert err.count("warning: the student skips no attention block") == 1
    assert "method 'sparge2' keeps every block at this size (18 tokens, 1 x 2 blocks of 32 x 16)" in err, err


def test_first_record_carries_the_step_compile_time_inside_its_step_time(accum_one):
    _, records = accum_one
    assert 0 < records[0]["lower_s"] < records[0]["compile_s"] < records[0]["step_time"], records[0]
    assert all("compile_s" not in r and "lower_s" not in r for r in records[1:])  # later steps run the compiled step


@pytest.mark.matmul_precision("highest")
def test_gradient_accumulation_and_remat_do_not_change_the_update(accum_one, accum_two):
    (one, log_one), (two, log_two) = accum_one, accum_two
    start = flat(initial_params(config(*EXACT))[1])
    a, b = flat(one.state.params), flat(two.state.params)
    step_a = np.concatenate([(a[k] - start[k]).ravel() for k in start])
    step_b = np.concatenate([(b[k] - start[k]).ravel() for k in start])
    assert np.linalg.norm(step_a) > 1e-4
    assert np.linalg.norm(step_a - step_b) < 1e-3 * np.linalg.norm(step_a)
    for x, y in zip(log_one, log_two):
        assert abs(x["loss"] - y["loss"]) < 1e-5 * x["loss"]


@pytest.mark.slow
def test_bf16_attention_only_distillation_lowers_the_gap(tmp_path_factory):
    """bf16 compute, fp32 master weights, frozen teacher, only self-attention trains, and the
    student-teacher velocity gap on fixed inputs shrinks. Its checkpoint resumes to the same
    state; a resume that would lay the state out otherwise is refused."""
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    overrides = [*BASE, "steps=60", "optim.lr=3e-3", "data.synthetic_examples=4", "model.compute_dtype=bfloat16",
                 "optim.trainable=self_attn", f"checkpoint.dir={checkpoints}"]
    result, _ = run(tmp_path_factory, *overrides)
    cfg = config(*overrides)
    parts, init = initial_params(cfg)
    # The teacher holds its own bf16 copy of the trained leaves and reads the frozen ones from the student.
    teacher, start = flat(cast_floats(result.teacher, jnp.bfloat16)), flat(cast_floats(init, jnp.bfloat16))
    assert all(np.array_equal(teacher[k], start[k]) for k in start), "the teacher never changes"
    before, after = flat(init), flat(result.state.params)
    frozen = [k for k in before if "self_attn" not in k]
    trained = [k for k in before if "self_attn" in k]
    assert frozen and trained
    # float32 master weights for the trained leaves, the frozen ones held in the compute dtype
    assert {after[k].dtype for k in trained} == {np.dtype(np.float32)}
    assert {after[k].dtype for k in frozen} == {np.dtype(jnp.bfloat16)}
    assert all(np.array_equal(before[k].astype(jnp.bfloat16), after[k]) for k in frozen)
    # AdamW's two float32 moments for the trained leaves only
    moments = [x for x in jax.tree.leaves(result.state.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * len(trained) and all(x.dtype == jnp.float32 for x in moments)
    assert sum(not np.array_equal(before[k], after[k]) for k in trained) >= len(trained) // 2

    batch = {k: jnp.asarray(v) for k, v in data_source(cfg, parts.config).read(np.arange(4)).items()}
    keys = jax.random.key_data(jax.random.split(jax.random.key(123), 4))

    @jax.jit
    def gap(params):
        f = lambda p, mode: velocity_fn(parts, p, mode, DTYPES["float32"])
        return distillation_loss(f(params, "sparse"), f(init, "dense"), batch, keys, cfg.objective)[0]

    assert float(gap(result.state.params)) < 0.75 * float(gap(init))

    resumed = train(config(*overrides), resume=True, progress=False)  # restores step 60; nothing left to run
    for got, want in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(result.state), strict=True):
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))
    for change, refusal in (("optim.trainable=attn", r"optim.trainable 'self_attn' -> 'attn' differs"),
                            ("model.compute_dtype=float32", r"model.compute_dtype 'bfloat16' -> 'float32' differs"),
                            ("optim.ema_decay=0.99", r"optim.ema_decay null -> 0.99 turns the EMA .* on, but the "
                                                     r"checkpoint's optimizer state holds none")):
        with pytest.raises(ValueError, match=refusal):
            train(config(*overrides, change), resume=True, progress=False, allow_schedule_change=True)
    meta_file = checkpoints / "60" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta.pop("state_layout") == 2
    meta_file.write_text(json.dumps(meta))  # as a checkpoint of the float32 layout reads
    with pytest.raises(ValueError, match="earlier sparge-jax that held frozen parameters in float32"):
        train(config(*overrides), resume=True, progress=False)


def test_model_weights_restore_a_converted_checkpoint(tmp_path, rng, monkeypatch):
    """`model.weights` (here a path relative to the working directory) loads the stored params
    (as float32) instead of the random init."""
    from sparge_jax.models.checkpoint import save_wan_params

    cfg = config(*BASE)
    parts, random_init = initial_params(cfg)
    stored = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), random_init)
    save_wan_params(str(tmp_path / "converted"), stored, parts.config)
    monkeypatch.chdir(tmp_path)
    _, loaded = initial_params(config(*BASE, "model.weights=converted"))
    for want, got in zip(jax.tree.leaves(stored), jax.tree.leaves(loaded)):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.matmul_precision("highest")
def test_prefetching_trains_the_same_params_as_serial_reading(tmp_path_factory, accum_one):
    prefetched, log = accum_one  # data.prefetch is on by default
    serial, serial_log = run(tmp_path_factory, *EXACT, "data.grad_accum=1", "model.remat=true", "data.prefetch=false")
    assert [r["loss"] for r in serial_log] == [r["loss"] for r in log]
    for got, want in zip(jax.tree.leaves(serial.state), jax.tree.leaves(prefetched.state), strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want)), "bitwise the same state"
