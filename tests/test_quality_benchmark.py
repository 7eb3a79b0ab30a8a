"""benchmarks/quality.py in its CPU size (--small, float32), on the shipped teacher: a mask
that keeps every block must reproduce the dense samples (the sparse path against the dense
one), a 90 % mask must reach its calibrated sparsity and lose quality. (Table 2's rows run
`train.loop.train`, tested in test_train_*.py; they are left out here for time.)"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.cpu("the benchmark's small CPU mode, float32 on the CPU; on a GPU run benchmarks/quality.py itself")
def test_small_quality_run(tmp_path):
    quality = load_quality()
    results = quality.main(["--out", str(tmp_path), "--small", "--clips", "1", "--steps", "2", "--levels", "0.0",
                            "0.9", "--methods", "topk", "--bisect", "4", "--objectives", "--tune-rules"])
    saved = json.loads((tmp_path / "quality.json").read_text())
    free = {(r["method"], r["target"]): r for r in saved["free"]}
    assert saved["latent_shape"] == [4, 16, 16, 48] and saved["clips"] == 1
    every_block = free[("topk", 0.0)]
    assert every_block["sparsity"] == 0.0
    assert every_block["psnr_db"] > 45 and every_block["rel_l2"] < 2e-3 and every_block["ssim"] > 0.999
    assert abs(every_block["flow_loss"] - saved["dense_flow_loss"]) < 1e-4 * saved["dense_flow_loss"] + 1e-6
    sparse = free[("topk", 0.9)]
    assert 0.9 <= sparse["sparsity"] < 0.96 and sparse["psnr_db"] < every_block["psnr_db"] - 10
    assert np.isfinite(sparse["rel_l2"]) and sparse["rel_l2"] > 10 * every_block["rel_l2"]
    assert saved["tuned"] == [] and saved["not_run"] == []
    assert (tmp_path / "frames.npz").is_file() and results["free"] == saved["free"]
