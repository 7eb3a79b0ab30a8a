"""Training logs the student's achieved block sparsity on the step's batch at every logged step
(JSONL, TensorBoard, progress bar) and warns once when a configuration skips nothing."""

import json

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train.batch_sparsity import BatchSparsity
from train.config import load_config
from train.data import global_batch_indices
from train.generate import block_sparsity, capture_layers
from train.loop import data_source, train
from train.model import abstract_model, init_params
from train.objective import sample_noise
from train.sharding import make_mesh, param_shardings

# 4 x 4 x 4 = 64 tokens: 2 q blocks x 4 k blocks of the tiny preset
SMALL = ["data.synthetic_latent_shape=[4,8,8]", "data.synthetic_text_len=5", "model.compute_dtype=float32",
         "optim.warmup_steps=0", "model.overrides.num_layers=1", "data.batch_size=4"]
# 4 x 8 blocks, Top-p 0.3: on these random weights the sparsity differs with the batch and the noise
# level (0.629..0.645 over three steps; another than the step's sigma gives another value)
VARYING = ["model.overrides.sparse.rule=topp", "model.overrides.sparse.topp=0.3", "model.overrides.sparse.block_q=16",
           "model.overrides.sparse.block_k=8"]


def test_every_logged_step_records_the_sparsity_the_student_achieves_on_its_batch(tmp_path, capsys):
    cfg = load_config(None, [*SMALL, *VARYING, "data.grad_accum=2", "steps=2", f"metrics_path={tmp_path / 'm.jsonl'}",
                             f"tensorboard_dir={tmp_path / 'tb'}"])
    train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 < r["block_sparsity"] < 1 for r in records), records

    # Independently: step 0's examples, the per-example sigma and noise of that step (the logged
    # sigma_mean pins them to the step's), the initial weights, micro-batch 0 (2 of the 4 examples).
    mesh = make_mesh(cfg.mesh)
    _, abstract = abstract_model(cfg.model)
    parts, params = init_params(cfg.model, cfg.seed, param_shardings(abstract, mesh))
    source = data_source(cfg, parts.config)
    batch = source.read(global_batch_indices(0, 4, len(source), cfg.data.seed))
    keys = jax.random.split(jax.random.fold_in(jax.random.key_data(jax.random.key(cfg.seed)), 0), 4)
    sigma, noise = sample_noise(keys, batch["latents"], cfg.objective.shift)
    assert float(np.mean(sigma)) == pytest.approx(records[0]["sigma_mean"], rel=1e-6)
    first = {name: value[:2] for name, value in batch.items()}
    captured = capture_layers(parts, params, first, sigma[:2], noise[:2])
    want = block_sparsity(captured, parts.config.sparse, cfg.data.synthetic_latent_shape, parts.config.patch_size)
    assert records[0]["block_sparsity"] == pytest.approx(want, abs=1e-9)

    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    logged = [(e.step, e.value) for e in tb.Scalars("block_sparsity")]
    assert logged == [(r["step"], pytest.approx(r["block_sparsity"], rel=1e-6)) for r in records]
    assert "warning" not in capsys.readouterr().err


def probe(overrides=(), latent=(4, 8, 8), student="sparse"):
    parts, _ = abstract_model(load_config(None, [*SMALL, *overrides]).model)
    return BatchSparsity(parts, (*latent, 16), student_mode=student, shift=5.0)


@pytest.mark.parametrize("setup,at_start,why", [
    ({"student": "dense"}, True, "student_attention is 'dense'"),
    ({"overrides": ["model.overrides.dense_layers=[0]"]}, True, "every layer is in dense_layers (0,)"),
    ({"latent": (1, 8, 8)}, False, "sequence of 16 tokens fits in one block (block_q 32, block_k 16)"),
    ({}, False, "method 'sparge2' keeps every block at this size (64 tokens, 2 x 4 blocks of 32 x 16)"),
])
def test_the_skips_nothing_warning_names_the_reason_once(setup, at_start, why):
    sparsity = probe(**setup)
    if not at_start:
        assert sparsity.warning(None) is None  # nothing known before measuring
        skipping = probe(**setup)
        assert skipping.warning(0.25) is None and skipping.warning(0.0) is None  # the first measurement decides
    first = sparsity.warning(None if at_start else 0.0)
    assert first.startswith("warning: the student skips no attention block") and why in first, first
    assert sparsity.warning(0.0) is None and sparsity.warning(None) is None  # once per run
    if at_start:
        assert sparsity(None, None, 0, {}) == 0.0  # known from the config: nothing is measured
