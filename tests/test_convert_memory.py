"""Peak memory of the checkpoint converter: it must stream tensor by tensor, not hold the model
twice (once converted, once more in Orbax's host copy, or beside a memory map of the input).

A child interpreter converts a random ~230 MB Wan2.1-shaped checkpoint (bf16 in two shards,
fp32 out: the output is twice the input) and reports how far its memory rose above what it held
after the imports and a warm-up conversion: anonymous memory (`RssAnon` and `RssShmem` of
/proc/self/status, sampled every 5 ms), the whole resident set (`VmRSS`, file-backed pages of
the memory-mapped staging file included) and the peak of Python/NumPy allocations
(`tracemalloc`, exact). Holding the params a second time (Orbax's host copy, a whole-file read
of the input) adds ~1x the checkpoint's size to the first and last; keeping the staging map's
pages resident while Orbax reads them adds the output's size (2x the input) to `VmRSS`.

A host-memory test: the child runs on the CPU (`JAX_PLATFORMS=cpu`) on any machine. It needs an
Orbax whose `NumpyHandler` takes `deepcopy_host_arrays` (orbax-checkpoint >= 0.12); an older one
copies every host array before writing (`save_wan_params` documents this), which is ~1x the
checkpoint in anonymous memory, and the test skips there."""

import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

from convert.keys import param_table
from convert.original import flax_to_original
from sparge_jax.models import WanConfig, read_wan_config
from sparge_jax.models.checkpoint import _in_place_numpy_registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2V = os.path.join(REPO, "tests", "fixtures", "wan_t2v")

# ~105M params: 210 MB in bf16. Big enough that a second copy stands far above the noise
# (allocator arenas, tensorstore buffers), small enough for a few seconds on two cores.
CONFIG = WanConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=6)

CHILD = r"""
import json, sys, threading, tracemalloc
from convert.pipeline import convert_checkpoint
from sparge_jax.models import WanConfig

FIELDS = ("RssAnon", "RssShmem", "RssFile", "VmRSS")

def status():
    with open("/proc/self/status") as f:
        rows = dict(line.split(":", 1) for line in f)
    return {field: int(rows[field].split()[0]) * 1024 for field in FIELDS}

warm_src, src, warm_out, out, config, dtype = sys.argv[1:7]
convert_checkpoint(warm_src, warm_out, progress=False)  # imports, jax/orbax/tensorstore start-up
base = status()
peak = dict(base)
stop = threading.Event()

def sample():
    while not stop.wait(0.005):
        for field, value in status().items():
            peak[field] = max(peak[field], value)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
tracemalloc.start()
convert_checkpoint(src, out, config=WanConfig.from_dict(json.loads(config)), dtype=dtype, progress=False)
traced_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
stop.set()
sampler.join()
growth = {field: peak[field] - base[field] for field in FIELDS}
print(json.dumps({**growth, "traced": traced_peak}))
"""


def _random_checkpoint(folder) -> tuple[dict, int]:
    """Original-format state dict of CONFIG, random finite bf16 values, written to `folder` as
    two safetensors shards with an index. Returns (state, bytes of the larger shard)."""
    rng = np.random.default_rng(0)
    state = {}
    for name, spec in param_table(CONFIG).items():
        bits = np.frombuffer(rng.bytes(2 * int(np.prod(spec.shape))), np.uint16) & 0xBFFF  # exponent < 128
        state[name] = bits.view(ml_dtypes.bfloat16).reshape(spec.shape)
    os.makedirs(folder)
    names, half, done, shards = sorted(state), sum(v.nbytes for v in state.values()) / 2, 0, ([], [])
    for name in names:
        shards[done >= half].append(name)
        done += state[name].nbytes
    weight_map = {}
    for number, keys in enumerate(shards):
        file = f"model-{number + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in keys}, os.path.join(folder, file))
        weight_map.update(dict.fromkeys(keys, file))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    return state, max(os.path.getsize(os.path.join(folder, file)) for file in set(weight_map.values()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif(_in_place_numpy_registry() is None,
                    reason=f"orbax-checkpoint {ocp.__version__} copies host arrays before saving them")
def test_conversion_peak_memory_is_about_one_copy(tmp_path):
    try:
        _check_conversion_memory(tmp_path)
    finally:  # ~0.4 GB that pytest would keep
        shutil.rmtree(tmp_path, ignore_errors=True)


def _check_conversion_memory(tmp_path):
    source, largest_shard = _random_checkpoint(tmp_path / "model")
    size = sum(v.nbytes for v in source.values())
    largest_output_array = 4 * max(v.size for v in source.values())  # fp32
    assert 150e6 < size < 300e6 and largest_shard < 0.6 * size
    run = subprocess.run(
        [sys.executable, "-c", CHILD, T2V, str(tmp_path / "model"), str(tmp_path / "warm"),
         str(tmp_path / "out"), json.dumps(CONFIG.to_dict()), "fp32"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    ratios = {k: v / size for k, v in measured.items()}
    versions = f"orbax-checkpoint {ocp.__version__}, numpy {np.__version__}"
    assert ratios["RssAnon"] + ratios["RssShmem"] < 0.5, (ratios, versions)
    assert ratios["traced"] < 0.5, (ratios, versions)
    # The whole resident set, page-cache pages mapped by the process included (issue #21's bound).
    assert measured["VmRSS"] <= 1.2 * largest_shard + largest_output_array, (measured, largest_shard, versions)
    # Nothing but the output is left, and it holds exactly the source tensors.
    assert sorted(os.listdir(tmp_path)) == ["model", "out", "warm"]
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "params"]
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(str(tmp_path / "out" / "params"))
    back = flax_to_original(params, read_wan_config(tmp_path / "out"))
    assert back.keys() == source.keys()
    for key, value in source.items():
        assert back[key].dtype == np.float32, key
        assert np.array_equal(back[key].astype(ml_dtypes.bfloat16).view(np.uint16), value.view(np.uint16)), key
