"""Training with scanned blocks holds their params and optimizer state stacked over each run of
layers (`train.block_stacks.BlockStacks`): where the runs are cut, the round trip to the
per-layer layout, the same training as the per-layer layout, and a resume that refuses another
layout and continues the stacked run bit for bit."""

import shutil

import jax
import numpy as np
import pytest

from train.block_stacks import STACKS, BlockStacks
from train.config import load_config
from train.loop import check_block_stacks, train
from train.model import abstract_model
from train.optimizer import path_string, trainable_labels

# 2 x 3 x 5 = 30 tokens: not a multiple of the tiny config's blocks (q 32, k 16).
RUN = ["data.synthetic_latent_shape=[2,6,10]", "data.synthetic_text_len=5", "model.compute_dtype=float32",
       "optim.warmup_steps=0", "optim.eps=1e-4", "data.batch_size=2", "steps=2", "model.remat=true",
       "model.overrides.num_layers=4", "model.overrides.dense_layers=[0]"]


def stacks_of(*overrides) -> BlockStacks:
    cfg = load_config(None, [*RUN, *overrides])
    parts, like = abstract_model(cfg.model)
    return BlockStacks.for_training(parts, like, trainable_labels(like, cfg.optim.trainable), "sparse")


def flat(tree):
    return {path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_runs_follow_the_scan_and_the_trainable_params():
    assert stacks_of().runs == ()  # not scanned: per layer
    assert stacks_of("model.overrides.scan_layers=true").runs == ((1, 4),)  # layer 0 dense, a run of its own
    # layer 3's self-attention frozen: the run is cut there, and a run of one block stays per layer
    assert stacks_of("model.overrides.scan_layers=true", "optim.trainable=blocks/[0-2]/self_attn").runs == ((1, 3),)
    assert stacks_of("model.overrides.scan_layers=true", "model.overrides.dense_layers=[]").runs == ((0, 4),)


def test_stack_and_unstack_round_trip():
    stacks = BlockStacks(((1, 3),))
    tree = {"head": np.float32(7), "blocks": {i: {"w": np.full((2, 3), i, np.float32), "b": None} for i in range(4)}}
    stacked = stacks.stack(tree)
    assert sorted(stacked["blocks"]) == [0, 3]
    np.testing.assert_array_equal(stacked[STACKS][1]["w"][:, 0, 0], [1, 2])
    assert stacked[STACKS][1]["b"] is None
    back = stacks.unstack(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(got, want)
    labels = stacks.stack_labels({"head": "train", "blocks": {i: {"w": "train", "b": "freeze"} for i in range(4)}})
    assert labels[STACKS] == {1: {"w": "train", "b": "freeze"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(per-layer run, scanned run with a checkpoint) of the same training."""
    with jax.default_matmul_precision("highest"):
        plain = train(load_config(None, RUN), progress=False)
        directory = tmp_path_factory.mktemp("stacked")
        scanned = train(load_config(None, [*RUN, "model.overrides.scan_layers=true", f"checkpoint.dir={directory}",
                                           "checkpoint.every=1"]), progress=False)  # steps 1 and 2 saved
    return plain, scanned, directory


def test_scanned_training_holds_stacks_and_trains_as_per_layer(runs):
    plain, scanned, _ = runs
    params = scanned.state.params
    assert sorted(params["blocks"]) == [0] and params[STACKS][1]["self_attn"]["q"]["kernel"].shape[0] == 3
    # the optimizer's state follows: one moment array per param of a block for the run, not one per layer
    leaves = lambda tree: len(jax.tree.leaves(tree))  # noqa: E731
    assert leaves(scanned.state.opt_state) < leaves(plain.state.opt_state)
    np.testing.assert_allclose(scanned.metrics["loss"], plain.metrics["loss"], rtol=1e-5)
    want = flat(plain.state.params)
    got = flat(scanned.per_layer(params))
    assert sorted(got) == sorted(want)
    start = flat(plain.teacher)  # the initial weights
    assert max(np.max(np.abs(want[name] - start[name])) for name in want) > 1e-4  # the steps moved them
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert jax.tree.structure(scanned.per_layer(scanned.teacher)) == jax.tree.structure(plain.teacher)


def test_resume_keeps_the_stacked_layout_or_names_the_option(runs, tmp_path):
    _, scanned, saved = runs
    directory = tmp_path / "stacked"
    shutil.copytree(saved, directory)
    shutil.rmtree(directory / "2")  # resumed from step 1 (the run's own settings: its compiled programs)
    base = [*RUN, "checkpoint.every=1", "model.overrides.scan_layers=true", f"checkpoint.dir={directory}"]
    with pytest.raises(ValueError, match="stacked over layers 1..3; this config trains them every block per "
                                         "layer; resume with model.overrides.scan_layers=true"):
        train(load_config(None, [*base[:-2], "model.overrides.scan_layers=false", base[-1]]), resume=True,
              progress=False)
    # a checkpoint from before the stacked layout holds every block per layer
    with pytest.raises(ValueError, match="resume with model.overrides.scan_layers=false"):
        check_block_stacks(load_config(None, base), {"data_seed": 0})
    with jax.default_matmul_precision("highest"):
        resumed = train(load_config(None, base), resume=True, progress=False)
    assert resumed.metrics["step"] == 2
    # step 2 from the restored stacks: the uninterrupted run's params and optimizer state
    for got, want in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(scanned.state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert resumed.metrics["loss"] == scanned.metrics["loss"]
