"""The teacher shares the student's frozen params: with `optim.trainable` limited to
self-attention it holds its own copy of those leaves only, only those leaves are differentiated,
and the distillation step is the one of a full teacher copy and full gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.config import load_config
from train.data import BatchLoader
from train.loop import check_frozen_unchanged, data_source
from train.model import abstract_model, cast_floats, init_params, select, teacher_copy, teacher_params, velocity_fn
from train.objective import distillation_loss
from train.optimizer import make_optimizer, path_string, trainable_labels
from train.sharding import batch_sharding, make_mesh, param_shardings
from train.step import TrainState, make_train_step

OVERRIDES = ["data.synthetic_latent_shape=[2,6,6]", "data.synthetic_text_len=5", "model.compute_dtype=bfloat16",
             "optim.warmup_steps=0", "data.batch_size=2", "model.overrides.num_layers=1", "optim.lr=1e-2",
             "optim.trainable=self_attn", "steps=2", "model.remat=false",
             # A dense student (short compiles) with a flow term, so the first step moves it away from the teacher.
             "objective.student_attention=dense", "objective.flow_weight=1"]


@pytest.mark.matmul_precision("highest")
def test_shared_teacher_gives_the_same_steps_and_holds_only_the_trainable_leaves():
    cfg = load_config(None, OVERRIDES)
    _, abstract = abstract_model(cfg.model)
    mesh = make_mesh(cfg.mesh)
    parts, params = init_params(cfg.model, cfg.seed, param_shardings(abstract, mesh))
    labels = trainable_labels(params, cfg.optim.trainable)
    own = teacher_copy(params, labels, jnp.bfloat16)

    # Only the self-attention leaves are held, each equal to the initial value in bf16.
    held = {path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(own)[0]}
    initial = {path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert held and set(held) == {k for k in initial if "self_attn" in k}
    for name, x in held.items():
        want = np.asarray(initial[name].astype(jnp.bfloat16), np.float32)
        np.testing.assert_array_equal(np.asarray(x, np.float32), want)
    trainable_bytes = sum(initial[k].size * 2 for k in held)
    assert sum(x.nbytes for x in held.values()) == trainable_bytes
    assert trainable_bytes < 0.6 * sum(x.nbytes // 2 for x in initial.values())
    whole = teacher_params(params, own)
    assert all(whole_leaf is params_leaf for whole_leaf, params_leaf, label in
               zip(jax.tree.leaves(whole), jax.tree.leaves(params), jax.tree.leaves(labels)) if label == "freeze")

    optimizer = make_optimizer(cfg.optim, cfg.steps, params)
    step = jax.jit(make_train_step(parts, optimizer, cfg))
    loader = BatchLoader(data_source(cfg, parts.config), cfg.data.batch_size, cfg.data.grad_accum, cfg.data.seed,
                         lambda ndim: batch_sharding(mesh, ndim, 1))
    start = TrainState(jnp.int32(0), params, optimizer.init(params), jax.random.key_data(jax.random.key(0)))

    full_teacher = cast_floats(params, jnp.bfloat16)

    @jax.jit
    def reference_step(state, batch):
        """The step as it was: a separate full teacher copy, every param differentiated (grad_accum 1)."""
        keys = jax.random.split(jax.random.fold_in(state.rng, state.step), cfg.data.batch_size)
        micro_batch = jax.tree.map(lambda x: x[0], batch)

        def loss(p):
            velocity = lambda tree, mode: velocity_fn(parts, tree, mode, jnp.bfloat16)
            return distillation_loss(velocity(p, "dense"), velocity(full_teacher, "dense"), micro_batch, keys,
                                     cfg.objective)

        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        metrics["grad_norm"] = optax.global_norm(select(grads, labels, "train"))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state, state.rng), metrics

    def run(step_fn):
        state, history = start, []
        for i in range(cfg.steps):  # the second step sees trainable leaves the first one changed
            state, metrics = step_fn(state, loader.batch(i))
            history.append(metrics)
        return state, history

    want_state, want = run(reference_step)
    got_state, got = run(lambda state, batch: step(state, own, batch))
    for got_metrics, want_metrics in zip(got, want):
        for name in want_metrics:
            # atol: the first step's distill_loss is round-off (student == teacher: 0 vs 9e-14 on
            # the CPU, 6e-15 vs 1e-10 on an H200, whose fusions round the two bf16 forwards
            # differently); the second step's is ~8e-4.
            np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-5, atol=1e-8, err_msg=name)
    assert float(got[0]["distill_loss"]) < 1e-10 and float(got[1]["distill_loss"]) > 1e-6  # the teacher kept its values
    for got_leaf, want_leaf in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-6, atol=1e-9)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(params))]
    assert any(changed)


def test_resume_refuses_a_frozen_leaf_that_was_trained():
    """A resume whose optim.trainable freezes a leaf the checkpoint trained would hand the
    teacher trained weights: refused, naming the leaf."""
    initial = {"blocks": {"0": {"ffn": jnp.ones(3), "self_attn": jnp.zeros(2)}}}
    labels = {"blocks": {"0": {"ffn": "freeze", "self_attn": "train"}}}
    trained_attention = {"blocks": {"0": {"ffn": jnp.ones(3), "self_attn": jnp.full(2, 0.5)}}}
    check_frozen_unchanged(initial, trained_attention, labels)
    trained_ffn = {"blocks": {"0": {"ffn": jnp.full(3, 2.0), "self_attn": jnp.zeros(2)}}}
    with pytest.raises(ValueError, match="blocks/0/ffn"):
        check_frozen_unchanged(initial, trained_ffn, labels)
