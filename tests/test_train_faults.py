"""Fault injection on real training runs (CPU subprocesses, the 1-layer tiny model): NaN data,
an error mid-run, Ctrl-C and SIGTERM, a damaged latest checkpoint. After each, the run resumes
without losing a good step and ends where an uninterrupted run ends."""

import json
import re
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

from train.data import SyntheticLatents, global_batch_indices, write_dataset
from train_launch import SMALL, SUMMARY, finish, outcome, start

# Every run uses the same `steps` (it is compiled into the LR schedule), shapes and EMA as
# test_train_resume, so all of them reuse the programs the first one compiled (train_launch's
# shared compilation cache).
RUN = [*SMALL, "steps=20", "data.batch_size=2", "optim.ema_decay=0.9"]
ARGS = [*RUN, "checkpoint.every=4", "checkpoint.keep=2"]
NAN_EXAMPLE = 5  # shard-00001.safetensors row 1 of 8 examples in shards of 4


def saved_state(directory, step):
    return ocp.StandardCheckpointer().restore(directory / str(step) / "state")


def steps_on_disk(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def wait_for_logged_step(directory, proc, beyond: int):
    """Until the run's metrics.jsonl has a step after `beyond` (written as each step ends)."""
    log = directory / "metrics.jsonl"
    deadline = time.monotonic() + 150
    while not (log.is_file() and any(f'"step": {s},' in log.read_text() for s in range(beyond + 1, beyond + 3))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.002)


def truncate_largest_array_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


@pytest.fixture(scope="module")
def nan_data(tmp_path_factory):
    """8 tiny examples (latents (2, 6, 6, 16), context (5, 32)) in 2 shards; one latent is NaN."""
    path = tmp_path_factory.mktemp("nan-data")
    write_dataset(path, SyntheticLatents(8, (2, 6, 6, 16), 5, 32, seed=0), 4)
    shard = load_file(str(path / "shard-00001.safetensors"))
    shard["latents"][NAN_EXAMPLE - 4, 1, 2, 3, 4] = np.nan
    save_file(shard, str(path / "shard-00001.safetensors"))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(directory, (loss, checksum)) of the reference run, done once for the module (first, so
    that the other runs find its compiled programs)."""
    directory = tmp_path_factory.mktemp("full")
    (summary,) = finish(start([*ARGS, f"checkpoint.dir={directory}"]))
    return directory, summary


def nan_steps(total: int) -> list[int]:
    """1-based steps whose batch (2 of the 8 examples) holds the NaN example."""
    return [s + 1 for s in range(total) if NAN_EXAMPLE in global_batch_indices(s, 2, 8, 0)]


def test_nan_example_is_skipped_named_and_never_saved(tmp_path, nan_data, uninterrupted):
    bad = nan_steps(12)
    assert bad[:3] == [3, 8, 9], bad  # the schedule below relies on this order (data seed 0)
    run = tmp_path / "run"
    rc, out = outcome(start([*RUN, f"data.path={nan_data}", "checkpoint.every=7",
                             "guard.max_consecutive_skips=2", f"checkpoint.dir={run}"]))
    assert rc == 1, out[-3000:]
    assert "step 3: non-finite loss or gradients, update skipped (non-finite data in example 5 = " \
           "shard-00001.safetensors row 1 (latents not finite)); 1 in a row, 1 in all" in out
    assert "error: NonFiniteError: step 9:" in out and "2 in a row, 3 in all" in out
    assert "guard.max_consecutive_skips=2" in out
    assert len(out.strip().splitlines()) == 3 and "Traceback" not in out  # 2 skip reports, the error
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["skipped"]] == [3, 8, 9]
    assert all(np.isfinite(r["loss"]) for r in log if not r["skipped"])
    assert steps_on_disk(run) == [7, 9]  # step 9 saved on the way out
    at7, at9 = saved_state(run, 7), saved_state(run, 9)
    assert int(at9["step"]) == 9
    for x, y in zip(jax.tree.leaves((at7["params"], at7["opt_state"])), jax.tree.leaves((at9["params"], at9["opt_state"]))):
        assert np.all(np.isfinite(x)) and np.array_equal(x, y), "skipped steps 8 and 9 changed nothing (nor the EMA)"


@pytest.mark.slow
def test_ctrl_c_sigterm_and_a_damaged_checkpoint_lose_no_step(tmp_path, uninterrupted):
    full, reference = uninterrupted
    cut = tmp_path / "cut"
    proc = start([*ARGS, f"checkpoint.dir={cut}"])
    wait_for_logged_step(cut, proc, 0)
    proc.send_signal(signal.SIGINT)
    rc, out = outcome(proc)
    assert rc == 130, out[-3000:]
    first = int(re.search(r"stopped by SIGINT after step (\d+) \(checkpoint at step \1 saved", out)[1])
    assert 1 <= first < 20 and steps_on_disk(cut)[-1] == first

    proc = start(["--resume", *ARGS, f"checkpoint.dir={cut}"])
    wait_for_logged_step(cut, proc, first)
    proc.send_signal(signal.SIGTERM)
    rc, out = outcome(proc)
    assert rc == 143, out[-3000:]
    second = int(re.search(r"stopped by SIGTERM after step (\d+) \(checkpoint at step \1 saved", out)[1])
    assert first < second < 20 and steps_on_disk(cut)[-1] == second
    assert "Traceback" not in out and "Event loop" not in out

    previous = steps_on_disk(cut)[-2]
    truncate_largest_array_file(cut / str(second))
    resumed = start(["--resume", *ARGS, f"checkpoint.dir={cut}"])
    rc, out = outcome(resumed)
    assert rc == 0 and f"checkpoint step {second} is damaged (" in out, out[-3000:]
    assert f"moved it to {cut / f'{second}.damaged'}, trying the previous one" in out
    (loss, checksum), = [(float(m[2]), float(m[4])) for m in SUMMARY.finditer(out)]
    assert (loss, checksum) == reference
    a, b = saved_state(full, 20)["params"], saved_state(cut, 20)["params"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(x, y), "bitwise the same parameters"
    assert (cut / f"{second}.damaged").is_dir() and previous < second


def test_validating_reader_names_the_shard_and_row_of_a_nan_example(nan_data):
    from train.data import ShardedLatents

    good = ShardedLatents(nan_data, validate=True).read(np.array([0, 4, 7]))
    assert all(np.isfinite(a).all() for a in good.values())
    with pytest.raises(ValueError) as err:
        ShardedLatents(nan_data, validate=True).read(np.array([2, NAN_EXAMPLE]))
    assert str(err.value) == (f"data.validate: {nan_data}/shard-00001.safetensors row 1 (example 5) "
                              "has non-finite values in 'latents'")
    assert not np.isfinite(ShardedLatents(nan_data).read(np.array([NAN_EXAMPLE]))["latents"]).all()


def _two_checkpoints(directory):
    from train.checkpointing import Checkpointer

    first = {"w": np.arange(5000, dtype=np.float32) * 0.5, "n": np.int32(1)}
    second = {"w": first["w"] + 1, "n": np.int32(2)}
    ckpt = Checkpointer(directory, keep=3)
    ckpt.save(1, jax.device_put(first), {"step": 1})
    ckpt.save(2, jax.device_put(second), {"step": 2})
    ckpt.wait()
    ckpt.close()
    return first, second


def _zero_largest_array_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    largest = max(files, key=lambda p: p.stat().st_size)
    largest.write_bytes(bytes(largest.stat().st_size))


@pytest.mark.parametrize("damage", [
    truncate_largest_array_file,
    _zero_largest_array_file,
    lambda step_dir: (step_dir / "meta" / "metadata").unlink(),
    lambda step_dir: (step_dir / "state" / "manifest.ocdbt").unlink(),
], ids=["truncated-array", "zeroed-array", "deleted-meta", "deleted-manifest"])
def test_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path, capsys, damage):
    from train.checkpointing import Checkpointer

    first, second = _two_checkpoints(tmp_path)
    damage(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, keep=3)
    step, state, meta = ckpt.restore_latest_good(jax.device_put(second))
    assert (step, meta) == (1, {"step": 1})
    np.testing.assert_array_equal(np.asarray(state["w"]), first["w"])
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("checkpoint step 2 is damaged (")
    assert message[0].endswith(f"moved it to {tmp_path / '2.damaged'}, trying the previous one")
    ckpt.save(2, jax.device_put(second), {"step": 2})  # the run re-reaches step 2 and saves it again
    ckpt.wait()
    assert ckpt.latest_step() == 2 and (tmp_path / "2.damaged").is_dir()
    ckpt.close()


def test_a_checkpoint_of_another_model_is_refused_not_called_damaged(tmp_path):
    """Resuming with another model (or optim.trainable) than the one that wrote the checkpoints:
    their stored shapes differ from the run's state, so every restore would fail; that is a
    clear error naming the shapes, and no checkpoint is renamed `.damaged`."""
    from train.checkpointing import Checkpointer

    _, second = _two_checkpoints(tmp_path)
    other = {"w": np.zeros(4000, np.float32), "n": np.int32(0), "b": np.zeros((2, 3), np.float32)}
    ckpt = Checkpointer(tmp_path, keep=3)
    with pytest.raises(ValueError) as err:
        ckpt.restore_latest_good(jax.device_put(other))
    assert str(err.value) == (
        "--resume: checkpoint step 2 holds a train state of another model or optim.trainable (2 arrays; this run's "
        "state has 3): only it has 1 x (5000,); only this run has 1 x (4000,), 1 x (2, 3). Resume with the model "
        "and optim.trainable settings that wrote it, or start a new checkpoint.dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    step, state, _ = ckpt.restore_latest_good(jax.device_put(second))  # the right state still restores
    assert step == 2 and np.array_equal(np.asarray(state["w"]), second["w"])
    ckpt.close()


def test_a_non_finite_state_is_never_saved_and_keep_must_be_positive(tmp_path):
    from train.checkpointing import Checkpointer

    ckpt = Checkpointer(tmp_path, keep=1)
    with pytest.raises(ValueError, match="refusing to save checkpoint 3: the state holds NaN/inf"):
        ckpt.save(3, {"w": jax.numpy.array([1.0, np.inf])}, {"step": 3})
    ckpt.wait()
    assert ckpt.latest_step() is None
    ckpt.close()
    for keep in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="keep must be an int >= 1"):
            Checkpointer(tmp_path, keep=keep)


@pytest.mark.slow
def test_a_spent_time_limit_ends_the_run_after_its_step_and_resume_finishes_it(tmp_path, uninterrupted):
    """`time_limit_s` already spent when the first step ends: the run ends there as if it were the
    last step (exit 0, metrics, checkpoint 1); resuming without the limit ends where the
    uninterrupted run ends, bit for bit."""
    from train.config import load_config

    full, reference = uninterrupted
    code, out = outcome(start([*ARGS, f"checkpoint.dir={tmp_path}", "time_limit_s=0.001"]))
    assert code == 0, out[-3000:]
    assert "time_limit_s (0.001 s) spent: stopped after step 1 of 20 (checkpoint saved" in out, out[-3000:]
    assert re.search(r"final loss \S+ after 1 steps", out) and steps_on_disk(tmp_path) == [1]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
    (summary,) = finish(start(["--resume", *ARGS, f"checkpoint.dir={tmp_path}"]))
    assert summary == reference
    a, b = saved_state(full, 20)["params"], saved_state(tmp_path, 20)["params"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(x, y), "bitwise the same parameters"
    with pytest.raises(ValueError, match=r"config time_limit_s=0: must be > 0, or null \(no limit\)"):
        load_config(None, ["time_limit_s=0"])


def test_resume_refuses_a_changed_schedule_unless_allowed(tmp_path, uninterrupted):
    from train.config import load_config
    from train.loop import check_resumable, train

    full, _ = uninterrupted
    config = lambda *more: load_config(None, [*ARGS, f"checkpoint.dir={full}", *more])
    with pytest.raises(ValueError, match=r"--resume: steps: 20 -> 24 differ from the checkpoint's config, "
                                         r"which changes the schedule or the optimizer"):
        train(config("steps=24"), resume=True, progress=False)  # refused before the model is built
    meta = json.loads((full / "20" / "meta" / "metadata").read_text())
    with pytest.raises(ValueError, match=r"--resume: optim.lr: 0.0003 -> 0.001 differ .* --allow-schedule-change"):
        check_resumable(config("optim.lr=1e-3"), meta, allow_schedule_change=False)
    check_resumable(config("optim.lr=1e-3"), meta, allow_schedule_change=True)
    check_resumable(config("log_every=5"), meta, allow_schedule_change=False)  # not part of the schedule
    with pytest.raises(ValueError, match="--resume needs checkpoint.dir"):
        train(load_config(None, ARGS), resume=True, progress=False)


def test_resume_checks_the_restored_checkpoint_once_unless_it_fell_back(tmp_path, uninterrupted):
    """`check_resumable` (it builds an abstract model) reads the newest checkpoint's metadata
    before anything is built; the restore does not check that step again, only an older one it
    fell back to past a damaged newest."""
    import shutil
    from unittest import mock

    from train.config import load_config
    from train.loop import check_resumable, train

    full, _ = uninterrupted
    for damaged in (False, True):
        directory = tmp_path / f"damaged-{damaged}"
        shutil.copytree(full, directory)
        if damaged:
            truncate_largest_array_file(directory / "20")
        with mock.patch("train.loop.check_resumable", wraps=check_resumable) as checks:
            result = train(load_config(None, [*ARGS, f"checkpoint.dir={directory}"]), resume=True, progress=False)
        assert [call.args[1]["step"] for call in checks.call_args_list] == ([20, 16] if damaged else [20])
        assert int(result.state.step) == 20
