"""On-disk latent shards, synthetic data, deterministic order by (seed, step), config parsing."""

import json

import ml_dtypes
import numpy as np
import pytest

from train.config import MeshSettings, load_config
from train.data import BatchLoader, ShardedLatents, SyntheticLatents, global_batch_indices, write_dataset
from train.sharding import batch_sharding, make_mesh


def test_shards_round_trip(tmp_path, rng):
    source = SyntheticLatents(11, (2, 3, 5, 4), text_len=6, text_dim=7, seed=int(rng.integers(1000)))
    write_dataset(tmp_path / "ds", source, examples_per_shard=4)  # 4 + 4 + 3 examples
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [4, 4, 3]
    disk = ShardedLatents(tmp_path / "ds")
    assert len(disk) == 11 and disk.shapes == source.shapes
    picks = rng.permutation(11)[:7]
    got, want = disk.read(picks), source.read(picks)
    for name in ("latents", "context"):
        assert np.array_equal(got[name], want[name])
    write_dataset(tmp_path / "bf16", source, examples_per_shard=5, dtype=ml_dtypes.bfloat16)
    half = ShardedLatents(tmp_path / "bf16").read(picks)
    np.testing.assert_allclose(half["latents"], want["latents"], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="index.json"):
        ShardedLatents(tmp_path / "missing")


def test_order_is_a_permutation_per_epoch_and_deterministic():
    n, g = 10, 4
    stream = np.concatenate([global_batch_indices(step, g, n, seed=3) for step in range(5)])  # 20 = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20]), "each epoch is reshuffled"
    assert np.array_equal(global_batch_indices(3, g, n, seed=3), stream[12:16])
    assert not np.array_equal(global_batch_indices(0, g, n, seed=4), stream[:4])


def test_loader_batches_hold_the_scheduled_examples(rng):
    source = SyntheticLatents(9, (1, 2, 2, 3), text_len=3, text_dim=5, seed=1)
    mesh = make_mesh(MeshSettings(1, -1, 1))
    loader = BatchLoader(source, global_batch=6, grad_accum=2, seed=7, sharding_for=lambda nd: batch_sharding(mesh, nd, 1))
    batch = loader.batch(2)
    want = source.read(global_batch_indices(2, 6, 9, seed=7))
    assert batch["latents"].shape == (2, 3, 1, 2, 2, 3) and batch["context"].shape == (2, 3, 3, 5)
    np.testing.assert_array_equal(np.asarray(batch["latents"]).reshape(6, 1, 2, 2, 3), want["latents"])
    np.testing.assert_array_equal(np.asarray(batch["context"]).reshape(6, 3, 5), want["context"])
    assert loader.position(5) == 30


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(None, ["optim.lr=0.01", "steps=7", "data.synthetic_latent_shape=[1,4,4]", "model.overrides={\"num_layers\": 1}"])
    assert cfg.optim.lr == 0.01 and cfg.steps == 7 and cfg.data.synthetic_latent_shape == (1, 4, 4)
    assert cfg.model.overrides == {"num_layers": 1} and cfg.model.preset == "tiny"
    with pytest.raises(ValueError, match=r"unknown OptimSettings field\(s\) \[.learning_rate.\]"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="multiple of data.grad_accum"):
        load_config(None, ["data.batch_size=3", "data.grad_accum=2"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["steps"])
