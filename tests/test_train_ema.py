"""EMA of the trained params (`optim.ema_decay`): a float64 recurrence over the raw params of
each step, the trainable params only, sharded like them, handed out and evaluated held-out."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from train.config import OptimSettings, load_config
from train.loop import train
from train.model import abstract_model, init_params
from train.optimizer import ema_of, make_optimizer, path_string, trainable_labels
from train.report import distillation_report
from train.sharding import make_mesh, param_shardings

# A 1-layer dense model on tiny procedural clips (2 x 8 x 8 latents of 12 channels: 32 tokens).
TINY = ["model.overrides.num_layers=1", "model.overrides.in_dim=12", "model.overrides.out_dim=12",
        "model.compute_dtype=float32", "model.remat=false", "objective.student_attention=dense",
        "objective.distill_weight=0", "objective.flow_weight=1", "data.source=procedural",
        "data.procedural.frames=2", "data.procedural.height=16", "data.procedural.width=16",
        "data.procedural.space_to_depth=2", "data.batch_size=2", "optim.warmup_steps=0", "optim.lr=1e-2"]


def ema_recurrence(decay: float, history: list[np.ndarray]) -> np.ndarray:
    """float64 EMA of the params `history[0]` (initial), `history[1]` (after update 0), ...:
    ema <- d_t ema + (1 - d_t) p_{t+1}, d_t = min(decay, (1 + t) / (10 + t))."""
    ema = np.asarray(history[0], np.float64)
    for t, params in enumerate(history[1:]):
        d = min(decay, (1 + t) / (10 + t))
        ema = d * ema + (1 - d) * np.asarray(params, np.float64)
    return ema


def test_ema_follows_the_float64_recurrence_and_the_param_shardings(rng):
    params = {"attn": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)},
              "bias": jnp.asarray(rng.standard_normal(3), jnp.float32)}
    # decay 0.4: the warm-up decides updates 0-4 ((1 + t) / (10 + t) < 0.4), the cap the rest
    optimizer = make_optimizer(OptimSettings(lr=0.1, warmup_steps=0, final_lr_ratio=1.0, ema_decay=0.4), 12)
    state = optimizer.init(params)
    history = [params]
    update = jax.jit(optimizer.update)
    for _ in range(12):
        grads = jax.tree.map(lambda p: jnp.asarray(1 + rng.standard_normal(p.shape), jnp.float32), params)  # drifts
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    for path, ema in jax.tree_util.tree_flatten_with_path(ema_of(state))[0]:
        steps = [np.asarray(dict(jax.tree_util.tree_flatten_with_path(p)[0])[path]) for p in history]
        assert ema.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(ema), ema_recurrence(0.4, steps), rtol=1e-6, atol=1e-7)
        assert np.abs(np.asarray(ema) - steps[-1]).min() > 1e-2  # an average, lagging the params
    assert ema_of(make_optimizer(OptimSettings(), 12).init(params)) is None
    # Its shardings are the params' (train.step.opt_state_shardings maps param-shaped state leaves).
    marks = {"attn": {"kernel": "kernel's sharding"}, "bias": "bias's sharding"}
    mapped = optax.tree_map_params(optimizer, lambda _, mark: mark, state, marks, transform_non_params=lambda _: None)
    assert ema_of(mapped) == marks


@pytest.mark.slow
def test_trained_run_hands_out_and_evaluates_the_ema_of_its_trainable_params(tmp_path):
    steps, decay = 4, 0.3  # decays 0.1, 0.18, 0.25 (warm-up), then 0.3 (the cap)
    cfg = load_config(None, [*TINY, f"steps={steps}", f"optim.ema_decay={decay}", "optim.trainable=self_attn",
                             f"checkpoint.dir={tmp_path}", "checkpoint.every=1", f"checkpoint.keep={steps}",
                             f"eval_every={steps}", "eval_examples=1"])
    result = train(cfg, progress=False)
    flat = lambda tree: {path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    _, abstract = abstract_model(cfg.model)
    shardings = param_shardings(abstract, make_mesh(cfg.mesh))
    _, initial = init_params(cfg.model, cfg.seed, shardings, trainable_labels(abstract, cfg.optim.trainable))
    # the raw params after every step, from its checkpoint
    with ocp.StandardCheckpointer() as reader:
        saved = [reader.restore(tmp_path / str(step) / "state") for step in range(1, steps + 1)]
    history = [flat(initial), *(flat(state["params"]) for state in saved)]
    ema, handed_out, final = flat(ema_of(result.state.opt_state)), flat(result.ema_params), flat(result.state.params)
    trained = {name for name in final if "self_attn" in name}
    assert trained and set(ema) == trained, "an EMA of the trainable params only"
    assert set(handed_out) == set(final)
    for name, x in handed_out.items():
        if name in trained:
            np.testing.assert_array_equal(x, ema[name])
            np.testing.assert_allclose(x, ema_recurrence(decay, [h[name] for h in history]), rtol=1e-6, atol=1e-8)
        else:  # frozen: the params' own leaves, which never change
            np.testing.assert_array_equal(x, final[name])
    assert max(np.abs(ema[k] - final[k]).max() for k in trained) > 1e-3, "the EMA lags the trained params"
    # the last checkpoint holds the EMA (resume: tests/test_train_resume.py)
    checkpointed = {name.split("ema/", 1)[1]: x for name, x in flat(saved[-1]["opt_state"]).items() if "ema/" in name}
    assert checkpointed.keys() == ema.keys() and all(np.array_equal(checkpointed[k], ema[k]) for k in ema)

    # held-out metrics of the EMA model next to the raw ones: the same model at step 0; after 4 steps
    # the EMA lags the params, so it is nearer the teacher (the initial model) than they are
    first, last = result.evaluations
    metrics = [name for name in first if name.startswith("heldout_") and not name.endswith("_ema")]
    assert metrics and all(first[f"{name}_ema"] == first[name] for name in metrics)
    assert 0 < last["heldout_gap_ema"] < last["heldout_gap"]
    # the CLI's report measures what the run hands out: the EMA
    report = distillation_report(cfg, result, clips=1, steps=2)
    assert report["after_weights"] == "ema" and report["gap_after"] == last["heldout_gap_ema"]
    assert report["guided_gap_after"] == last["heldout_guided_gap_ema"]
