"""Live parity with diffusers: a fresh tiny random `WanTransformer3DModel` (torch, CPU) is
converted by our CLI pipeline and must give the same float32 output; our original-format
writer must be accepted by diffusers' own single-file conversion.

Needs torch and diffusers (the `parity` extra); skipped without them. Where torch has no
wheel for this Python (as on the CI machines here), the committed fixtures of
`test_wan_parity.py`, made by the same builder (tests/fixtures/make_wan_fixtures.py), stand in.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402

from convert.pipeline import convert_checkpoint  # noqa: E402
from sparge_jax.models import load_wan  # noqa: E402
from tests.fixtures import make_wan_fixtures as fixtures  # noqa: E402
from tests.test_wan_parity import run_fixture  # noqa: E402


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_fresh_diffusers_model_matches(kind, tmp_path, rng):
    from diffusers import WanTransformer3DModel

    config = fixtures.MODELS[kind]
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    model = WanTransformer3DModel(**config).eval()
    fixtures.randomize(model, generator)
    inputs = fixtures.make_inputs(kind, config, generator)
    expected = fixtures.run(model, inputs)

    source = tmp_path / "diffusers"
    source.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(source / "diffusion_pytorch_model.safetensors"))
    with open(source / "config.json", "w") as f:
        json.dump(dict(model.config), f, default=list)
    np.savez(source / "io.npz", output=expected, **{k: v.numpy() for k, v in inputs.items()})

    convert_checkpoint(str(source), str(tmp_path / "ours"), dtype="fp32", progress=False)
    ours, want = run_fixture(load_wan(str(tmp_path / "ours")), kind, str(source))
    rel = np.linalg.norm(ours - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel

    report = fixtures.round_trip(kind, model, inputs, expected, str(tmp_path))
    assert report["ok"], report
