"""Context parallelism (Ulysses): the model and training on context meshes equal one device.

Multi-device runs happen in subprocesses with 8 (or 2 x 2) virtual CPU devices, since the
device count is fixed when JAX starts."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from sparge_jax.config import SparseConfig
from sparge_jax.method_config import HeadMix, Sparge2Method, SVG2Method
from sparge_jax.nn import SparseAttention
from train_launch import ROOT, SMALL, finish, free_port, start

# data x fsdp x context x tensor: context 2, 4 and 8, composed with fsdp, data and tensor.
MESHES = ("1x2x2x2", "2x1x4x1", "1x1x8x1")


@pytest.mark.slow
def test_velocity_and_distillation_gradients_equal_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip())
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "context_parallel_worker.py"), *MESHES], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(errors) == sorted([*MESHES, "svg"])
    for mesh, e in errors.items():
        assert e["velocity"] <= 1e-5 * e["velocity_scale"], (mesh, e)
        assert mesh == "svg" or e["grads"] <= 5e-5 * e["grads_scale"], (mesh, e)


@pytest.mark.slow
def test_two_processes_with_the_context_axis_across_them_train_like_one_device():
    # 2 x 8 x 8 latents: 32 tokens, 4 heads over context 4 (2 devices in each process); grad accumulation 2
    args = [*SMALL, "data.synthetic_latent_shape=[2,8,8]", "steps=2", "data.batch_size=2", "data.grad_accum=2",
            "mesh.fsdp=1"]
    port = free_port()
    procs = [start(["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *args,
                    "mesh.context=4"], devices=2) for i in range(2)]
    reference = start(args, devices=1)
    (loss0, sum0), = finish(procs[0])
    (loss1, sum1), = finish(procs[1])
    (loss, checksum), = finish(reference)
    assert (loss0, sum0) == (loss1, sum1)
    assert loss > 0
    assert abs(loss0 - loss) <= 1e-4 * loss
    assert abs(sum0 - checksum) <= 1e-6 * abs(checksum)


def _attention(num_heads, method=Sparge2Method()):
    return SparseAttention(32, num_heads, config=SparseConfig(method), layer=0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("num_heads,tokens,message", [
    (4, 8, r"num_heads \(4\) must be divisible by the context-parallel degree mesh.context \(8\)"),
    (8, 12, r"token count \(12 .*mesh.context \(8\)"),
])
def test_heads_and_tokens_that_do_not_split_are_refused(num_heads, tokens, message):
    mesh = jax.sharding.AbstractMesh((8,), ("context",), axis_types=(AxisType.Auto,))
    with jax.sharding.use_abstract_mesh(mesh), pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: _attention(num_heads)(x, mode="dense")[0],
                       jax.ShapeDtypeStruct((1, tokens, 32), np.float32))


@pytest.mark.parametrize("method", [SVG2Method(), HeadMix((Sparge2Method(),) * 8)])
def test_methods_that_need_every_head_are_refused(method):
    mesh = jax.sharding.AbstractMesh((2,), ("context",), axis_types=(AxisType.Auto,))
    with jax.sharding.use_abstract_mesh(mesh), pytest.raises(ValueError, match="not supported with context parallelism"):
        jax.eval_shape(lambda x: _attention(8, method)(x, grid=(1, 4, 4))[0],
                       jax.ShapeDtypeStruct((1, 16, 32), np.float32))
