"""benchmarks/teacher_compare.py on a small clip size: the shipped teacher against the same
architecture at its random initialisation, on the same held-out clips."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmark_scripts import load_benchmark as load
from sparge_jax.models import WanModel
from sparge_jax.models.checkpoint import read_wan_config, save_wan_params

TEACHER = "train/teacher"


@pytest.mark.slow
def test_the_trained_teacher_beats_its_random_initialisation_on_the_same_clips(tmp_path):
    config = read_wan_config(TEACHER)
    random_params = nnx.to_pure_dict(nnx.state(WanModel(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16),
                                               nnx.Param))
    save_wan_params(str(tmp_path / "random"), random_params, config)
    losses = load("teacher_compare").main([TEACHER, str(tmp_path / "random"), "--clips", "2", "--seeds", "0", "1",
                                           "--sizes", "2x32x32"])
    trained, untrained = losses[TEACHER], losses[str(tmp_path / "random")]
    assert set(trained) == set(untrained) == {"2x32x32/seed0", "2x32x32/seed1"}
    assert all(np.isfinite(v) and v > 0 for v in [*trained.values(), *untrained.values()])
    # 2.86 for the random weights, 0.27-0.40 for the shipped teacher (2026-12-02): a clearly worse model must lose
    assert all(trained[k] < 0.5 * untrained[k] for k in trained), (trained, untrained)
    assert trained["2x32x32/seed0"] != trained["2x32x32/seed1"]  # the seeds draw other clips


def test_a_directory_without_a_config_is_refused_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load("teacher_compare").main([str(tmp_path)])
    assert f"not a converted-model directory (no config.json): {tmp_path}" in capsys.readouterr().err
