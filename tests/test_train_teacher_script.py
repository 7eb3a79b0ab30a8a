"""benchmarks/train_teacher.py on the CPU with a tiny recipe of its own (`--config`): clips of
space-to-depth 2 (12 latent channels, where teacher.json has 48), so the script must take the
study size from that config. The exported teacher (teacher.tar, bf16), reloaded by
benchmarks/teacher_compare.py with the same `--config`, scores the held-out flow loss the summary
reports, and its samples are at the config's clip size."""

import json
import tarfile

import numpy as np
import pytest

from benchmark_scripts import load_benchmark
from sparge_jax.models.checkpoint import read_wan_config

RECIPE = {
    "model": {"preset": "tiny", "compute_dtype": "float32", "remat": False,
              "overrides": {"dim": 64, "ffn_dim": 128, "num_heads": 1, "num_layers": 2, "freq_dim": 64,
                            "in_dim": 12, "out_dim": 12, "text_dim": 64}},
    "objective": {"distill_weight": 0.0, "flow_weight": 1.0, "shift": 3.0, "student_attention": "dense"},
    "optim": {"lr": 1e-3, "warmup_steps": 0},
    "data": {"source": "procedural", "batch_size": 2, "seed": 0,
             "procedural": {"examples": 64, "frames": 4, "height": 32, "width": 32, "space_to_depth": 2,
                            "max_shapes": 2}},
    "steps": 3, "seed": 0, "log_every": 1, "eval_every": 0, "eval_examples": 2,
}


@pytest.mark.slow
@pytest.mark.matmul_precision("highest")
def test_a_recipe_of_other_clips_trains_exports_and_evaluates_at_its_own_size(tmp_path):
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps(RECIPE))
    out = tmp_path / "out"
    summary = load_benchmark("train_teacher").main(["--out", str(out), "--config", str(config), "--steps", "3",
                                                    "--samples", "1", "--sample-steps", "2", "--guidance", "1"])
    assert (summary["steps"], summary["steps_planned"], summary["shift"]) == (3, 3, RECIPE["objective"]["shift"])
    samples = np.load(out / "teacher_samples.npz")
    assert samples["samples"].shape == samples["heldout"].shape == (1, 4, 32, 32, 3)

    with tarfile.open(out / "teacher.tar") as tar:
        tar.extractall(tmp_path)
    teacher = tmp_path / "teacher"
    config_of = read_wan_config(str(teacher))
    assert (config_of.in_dim, config_of.out_dim) == (12, 12)
    # teacher_compare reloads the export (bf16 on disk) and scores the same 8 held-out clips of seed 0
    reloaded = load_benchmark("teacher_compare").main([str(teacher), "--config", str(config), "--clips", "8",
                                                       "--seeds", "0", "--sizes", "4x32x32"])
    loss = reloaded[str(teacher)]["4x32x32/seed0"]
    assert np.isfinite(loss) and loss > 0
    assert loss == pytest.approx(summary["heldout_flow_loss"]["study"], rel=1e-5)

    # --no-train reads the export back and measures the same summary without training
    again = load_benchmark("train_teacher").main(["--out", str(tmp_path / "again"), "--config", str(config),
                                                  "--no-train", "--samples", "1", "--sample-steps", "2",
                                                  "--guidance", "1", f"model.weights={teacher}"])
    assert again["steps"] == 0 and not (tmp_path / "again" / "teacher.tar").exists()
    assert again["heldout_flow_loss"] == pytest.approx(summary["heldout_flow_loss"], rel=1e-5)
    for sigma, fractions in summary["attention_blocks_for_90pct_mass"].items():
        assert again["attention_blocks_for_90pct_mass"][sigma] == pytest.approx(fractions, rel=1e-5)
    again_samples = np.load(tmp_path / "again" / "teacher_samples.npz")
    np.testing.assert_array_equal(again_samples["heldout"], samples["heldout"])


@pytest.mark.parametrize("argv, message", [
    (["--no-train"], "model.weights must be a teacher directory"),
    (["--no-train", "model.weights=/nonexistent/teacher"], "got '/nonexistent/teacher'"),
    (["--no-train", "--steps", "5", "model.weights=train/teacher"], "drop --steps"),
])
def test_no_train_refuses_missing_weights_and_steps_in_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("train_teacher").main(["--out", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and message in err[-1], err
