"""Training logs the student's achieved block sparsity on the step's batch at every logged step
(JSONL, TensorBoard, progress bar) and warns once when a configuration skips nothing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pallas_kernels.blocks import num_blocks
from sparge_jax.masks import make_plan
from train.batch_sparsity import BatchSparsity, _probe
from train.config import load_config
from train.data import global_batch_indices
from train.generate import block_sparsity, capture_layers, layer_sparsity
from train.loop import data_source, train
from train.model import ModelParts, abstract_model, init_params
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
    captured = jax.jit(lambda p: capture_layers(parts, p, first, sigma[:2], noise[:2]))(params)  # not op by op
    want = block_sparsity(captured, parts.config.sparse, cfg.data.synthetic_latent_shape, parts.config.patch_size)
    assert records[0]["block_sparsity"] == pytest.approx(want, abs=1e-9)

    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    logged = [(e.step, e.value) for e in tb.Scalars("block_sparsity")]
    assert logged == [(r["step"], pytest.approx(r["block_sparsity"], rel=1e-6)) for r in records]
    assert "warning" not in capsys.readouterr().err


def probe(overrides=(), latent=(4, 8, 8), student="sparse"):
    parts, _ = abstract_model(load_config(None, [*SMALL, *overrides]).model)
    return BatchSparsity(parts, (*latent, 16), student_mode=student, shift=5.0, compute_dtype=np.float32)


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


def test_the_probe_reduces_each_layer_inside_the_forward_to_what_its_captured_qkv_give(rng):
    """`layer_sparsity` (one jitted forward, masks built per layer inside it) against the masks
    `make_plan` builds from every layer's captured q, k, v, counted in float64 as before, in
    bf16: the q, k, v the student's step predicts its masks from (float32:
    `test_every_logged_step_...`). Layer 1 runs dense."""
    cfg = load_config(None, [*SMALL, *VARYING, "model.compute_dtype=bfloat16", "model.overrides.num_layers=2",
                             "model.overrides.dense_layers=[1]"])
    _, abstract = abstract_model(cfg.model)
    parts, params = init_params(cfg.model, cfg.seed, param_shardings(abstract, make_mesh(cfg.mesh)))
    batch = {"latents": rng.standard_normal((2, 4, 8, 8, 16)).astype(np.float32),
             "context": rng.standard_normal((2, 5, parts.config.text_dim)).astype(np.float32)}
    sigma, noise = np.float32([0.3, 0.8]), rng.standard_normal((2, 4, 8, 8, 16)).astype(np.float32)
    compute = jnp.dtype(jnp.bfloat16)
    got = jax.jit(lambda p: layer_sparsity(parts, p, batch, sigma, noise, dtype=compute))(params)
    captured = jax.jit(lambda p: capture_layers(parts, p, batch, sigma, noise, dtype=compute))(params)
    config = parts.config.sparse
    want = []
    for layer in range(2):
        q, k, v = captured[f"L{layer}"]
        assert q.dtype == k.dtype == compute
        plan, _ = make_plan(q, k, v, config.method, config.kernel, grid=(4, 4, 4), layer=layer, key=jax.random.key(0))
        nq, nk = num_blocks(64, config.kernel.block_q), num_blocks(64, config.kernel.block_k)
        want.append(0.0 if layer == 1 else 1 - np.mean(np.asarray(plan.mask)[..., :nq, :nk]))
    assert got.shape == (2,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    assert 0 < want[0] < 1


@pytest.mark.cpu("a bound on XLA's CPU memory plan; a GPU's plan differs (see the docstring)")
def test_the_probes_compiled_memory_does_not_grow_with_the_layers_like_their_qkv():
    """Compiled (not run) at 4 and 8 layers of the tiny preset, 1024 tokens, float32 (so no
    param casts): the old probe (every layer's q, k, v out of the forward) grows by 4 layers'
    q, k, v; the lean one by less than one layer's. (XLA's CPU schedule overlaps the attention
    of up to three layers at any depth, so fewer than 4 layers would measure that instead.)
    Compiled for an H200 (2026-12-01, autotune level 0) the lean probe grew by 1.01 layers'
    q, k, v (0.79 MB; the old one by >= 4): GPU plans schedule other fusions and hold kernel
    workspace, so the one-layer bound is stated for the CPU's plan."""
    tokens, dim = 4 * 16 * 16, 64
    qkv_bytes = 3 * tokens * dim * 4  # one layer, batch 1, float32

    def footprint(layers, lean):
        cfg = load_config(None, ["data.synthetic_latent_shape=[4,32,32]", "model.compute_dtype=float32",
                                 f"model.overrides.num_layers={layers}"])
        parts, params = abstract_model(cfg.model)
        batch = {"latents": jax.ShapeDtypeStruct((1, 1, 4, 32, 32, 16), jnp.float32),
                 "context": jax.ShapeDtypeStruct((1, 1, 5, parts.config.text_dim), jnp.float32)}
        if lean:
            rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
            lowered = _probe.lower(params, parts.rest, rng, 0, batch, graphdef=parts.graphdef, config=parts.config,
                                   shift=5.0, dtype=jnp.dtype(jnp.float32))
        else:
            def capture_all(params, rest, batch):
                micro = {name: value[0] for name, value in batch.items()}
                return capture_layers(ModelParts(parts.graphdef, rest, parts.config), params, micro, 0.5)
            lowered = jax.jit(capture_all).lower(params, parts.rest, batch)
        memory = lowered.compile().memory_analysis()
        return memory.temp_size_in_bytes + memory.output_size_in_bytes

    assert footprint(8, lean=False) - footprint(4, lean=False) >= 4 * qkv_bytes
    assert footprint(8, lean=True) - footprint(4, lean=True) < qkv_bytes
