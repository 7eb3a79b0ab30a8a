"""Checkpoints: a killed run resumes to the same parameters and EMA; a crash mid-save is harmless."""

import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train.checkpointing import Checkpointer
from train.config import DEFAULT_CONFIG, load_config
from train.loop import train
from train_launch import ROOT, SMALL, finish, start

ARGS = [*SMALL, "steps=20", "checkpoint.every=4", "data.batch_size=2", "optim.ema_decay=0.9"]


def saved_state(directory, step):
    with ocp.StandardCheckpointer() as reader:
        return reader.restore(directory / str(step) / "state")


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_parameters(tmp_path):
    full = start([*ARGS, f"checkpoint.dir={tmp_path / 'full'}"])
    killed = start([*ARGS, f"checkpoint.dir={tmp_path / 'cut'}"])
    deadline = time.monotonic() + 150
    while not (tmp_path / "cut" / "4").is_dir():  # the first checkpoint is committed
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0][-3000:]
        time.sleep(0.01)
    killed.kill()
    killed.wait(timeout=30)
    steps_done = sorted(int(p.name) for p in (tmp_path / "cut").iterdir() if p.name.isdigit())
    assert 20 not in steps_done, "the run was killed before it finished"

    (want_loss, want_sum), = finish(full)
    (loss, checksum), = finish(start(["--resume", *ARGS, f"checkpoint.dir={tmp_path / 'cut'}"]))
    assert (loss, checksum) == (want_loss, want_sum)
    a, b = saved_state(tmp_path / "full", 20), saved_state(tmp_path / "cut", 20)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), "bitwise the same parameters, optimizer state and EMA"
    ema = a["opt_state"][-1]["ema"]  # `train.optimizer.params_ema`, last in the optimizer chain
    lag = [np.abs(np.asarray(e) - np.asarray(p)).max() for e, p in zip(jax.tree.leaves(ema), jax.tree.leaves(a["params"]),
                                                                       strict=True)]
    assert max(lag) > 0, "an EMA, not a copy of the parameters"
    # Turning the EMA off would drop it: refused before anything is built.
    without_ema = load_config(DEFAULT_CONFIG, [*ARGS, "optim.ema_decay=null", f"checkpoint.dir={tmp_path / 'cut'}"])
    with pytest.raises(ValueError, match=r"optim.ema_decay 0.9 -> null turns the EMA of the trained parameters off, "
                                         r"but the checkpoint's optimizer state holds one"):
        train(without_ema, resume=True, progress=False, allow_schedule_change=True)


CRASH_WHILE_SAVING = """
import os, sys
import jax, jax.numpy as jnp
from train.checkpointing import Checkpointer
ckpt = Checkpointer(sys.argv[1], keep=3)
state = {"w": jnp.arange(1000, dtype=jnp.float32) * 0.5, "step": jnp.int32(1)}
ckpt.save(1, state, {"step": 1})
ckpt.wait()
big = {"w": jnp.ones((64, 1024, 1024), jnp.float32), "step": jnp.int32(2)}  # 256 MiB: slow to write
ckpt.save(2, big, {"step": 2})
os._exit(3)  # die while step 2 is being written
"""


def test_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CRASH_WHILE_SAVING, str(tmp_path)], cwd=ROOT, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert not (tmp_path / "2").exists(), "step 2 never became a complete checkpoint"
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1
    like = {"w": jnp.zeros(1000, jnp.float32), "step": jnp.int32(0)}
    state, meta = ckpt.restore(1, like)
    assert meta == {"step": 1} and int(state["step"]) == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(1000, dtype=np.float32) * 0.5)
    ckpt.close()
