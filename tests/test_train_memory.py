"""The training step's memory (docs/training.md, "Memory model"): no copy of the optimizer
state, and the options that trade numerics for memory, against the default run as the oracle:
`optim.mu_dtype=bfloat16` (AdamW's first moment in bf16) and `model.remat_input_dtype=bfloat16`
(each block's input saved in bf16 for the backward)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmark_scripts import load_benchmark
from train.config import load_config
from train.loop import train
from train.model import abstract_model, init_params
from train.optimizer import trainable_labels
from train.sharding import make_mesh, param_shardings

step_memory = load_benchmark("step_memory")

# Small and scanned (model.remat_input_dtype applies to scanned blocks); four steps at a large
# enough learning rate that the moments matter. Adam's eps well above round-off: parameters whose
# exact gradient is ~0 must not turn round-off differences into full-size steps.
RUN = ["data.synthetic_latent_shape=[2,8,8]", "data.synthetic_text_len=5", "model.compute_dtype=bfloat16",
       "model.overrides.num_layers=2", "model.overrides.scan_layers=true", "model.remat=true", "optim.warmup_steps=0",
       "optim.lr=1e-3", "optim.eps=1e-4", "data.batch_size=2", "steps=4", "optim.trainable=self_attn"]


def run(tmp_path_factory, *overrides):
    metrics = tmp_path_factory.mktemp("run") / "metrics.jsonl"
    result = train(load_config(None, [*RUN, *overrides, f"metrics_path={metrics}"]), progress=False)
    return result, [json.loads(line) for line in metrics.read_text().splitlines()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return run(tmp_path_factory)


def changes(result, start):
    """The trainable params' change over the run, one flat float32 vector."""
    return np.concatenate([np.ravel(np.asarray(new, np.float32) - np.asarray(old, np.float32))
                           for new, old in zip(jax.tree.leaves(result.per_layer(result.state.params)),
                                               jax.tree.leaves(start), strict=True)
                           if new.dtype == jnp.float32])


def relative_error(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def start_params():
    """The params every run starts from (the same seed), as training holds them."""
    cfg = load_config(None, RUN)
    _, abstract = abstract_model(cfg.model)
    labels = trainable_labels(abstract, cfg.optim.trainable)
    return init_params(cfg.model, cfg.seed, param_shardings(abstract, make_mesh(cfg.mesh)), labels)[1]


def test_the_step_copies_no_optimizer_state():
    """The non-finite guard branches (`jax.lax.cond`) instead of selecting between the updated
    and the old state: a select read the old optimizer state after its in-place update, and XLA
    copied all of it (twice the trainable params in float32: 31 GiB at 14B with self_attn)."""
    cfg = step_memory.step_config("tiny", (2, 4, 4), ["model.overrides.dim=256", "model.overrides.num_layers=4",
                                                      "optim.trainable=self_attn"])
    text = step_memory.lower_step(cfg).compile().as_text()
    names = re.findall(r"%(\S+) = \S+ parameter\(\d+\).*op_name=\"state\.opt_state", text)
    # mu and nu of the 10 self-attention leaves of a block, each stacked over the 4 scanned layers, and 2 counts
    assert len(names) == 2 * 10 + 2
    assert [name for name in names if f"copy(%{name})" in text] == []


def test_bf16_first_moment_is_held_in_bf16_and_tracks_the_float32_one(tmp_path_factory, default_run, start_params):
    """`optim.mu_dtype=bfloat16`: mu is bf16 (2 bytes per trainable param less), nu stays float32;
    the first update is the default's (it uses mu before the rounding), and after four steps
    the losses agree to 5e-3 and the trainable params' change to 1 % (0.1 % and 0.3 % here)."""
    (want, want_log), (got, got_log) = default_run, run(tmp_path_factory, "optim.mu_dtype=bfloat16")
    adam = optax.tree_utils.tree_get(got.state.opt_state, "ScaleByAdamState")
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    default_mu = optax.tree_utils.tree_get(want.state.opt_state, "ScaleByAdamState").mu
    assert sum(x.nbytes for x in jax.tree.leaves(adam.mu)) * 2 == sum(x.nbytes for x in jax.tree.leaves(default_mu))
    assert [r["loss"] for r in got_log[:2]] == [r["loss"] for r in want_log[:2]]
    np.testing.assert_allclose([r["loss"] for r in got_log], [r["loss"] for r in want_log], rtol=5e-3)
    assert relative_error(changes(got, start_params), changes(want, start_params)) < 1e-2


def test_bf16_saved_block_inputs_keep_the_loss_and_track_the_float32_gradients(tmp_path_factory, default_run,
                                                                               start_params):
    """`model.remat_input_dtype=bfloat16`: the forward (the first loss) is the default's; the
    gradients are taken at the bf16-rounded block inputs (first grad norm within 1e-3; 1.4e-4
    here), and after four steps the losses agree to 5e-3 and the trainable params' change to 3 %
    (0.13 % and 0.7 % here)."""
    (want, want_log), (got, got_log) = default_run, run(tmp_path_factory, "model.remat_input_dtype=bfloat16")
    assert got_log[0]["loss"] == want_log[0]["loss"]
    np.testing.assert_allclose(got_log[0]["grad_norm"], want_log[0]["grad_norm"], rtol=1e-3)
    np.testing.assert_allclose([r["loss"] for r in got_log], [r["loss"] for r in want_log], rtol=5e-3)
    assert relative_error(changes(got, start_params), changes(want, start_params)) < 3e-2
