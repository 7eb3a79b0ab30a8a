"""The converter under faults: kill -9 mid-save (the next run removes the partial output, saying
so), SIGTERM / Ctrl-C while staging or while Orbax writes (nothing left behind, exit 128+signal),
an unwritable output place (exit 2, one line), damaged zip .pth files ("truncated or corrupt")."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import convert.pipeline
import sparge_jax.models.checkpoint
from convert.__main__ import main
from convert.partial import OWNER_FILE
from convert.pipeline import convert_checkpoint
from sparge_jax.models import read_wan_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
T2V = os.path.join(FIXTURES, "wan_t2v")
PTH = os.path.join(T2V, "original_bf16.pth")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KILLED_WHILE_SAVING = r"""
import os, signal, sys
import sparge_jax.models.checkpoint as checkpoint
from convert.pipeline import convert_checkpoint
real = checkpoint.save_wan_params

def save_then_die(directory, params, config):
    real(directory, params, config)  # params/ written, rename not yet done
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.save_wan_params = save_then_die
convert_checkpoint(sys.argv[1], sys.argv[2], progress=False)
"""


def partials(folder):
    return sorted(p for p in os.listdir(folder) if ".partial-" in p)


def test_kill_9_mid_save_leaves_a_partial_that_the_next_run_removes(tmp_path, capsys):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, T2V, str(out)], cwd=REPO, timeout=120,
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    (stale,) = partials(tmp_path)
    assert os.path.isdir(tmp_path / stale / "params") and not out.exists()
    (tmp_path / ".other.partial-x").mkdir()  # not this output's: kept
    alive = tmp_path / ".out.partial-alive"
    alive.mkdir()
    (alive / OWNER_FILE).write_text(f'{{"pid": {os.getpid()}, "host": "{os.uname().nodename}"}}')  # running: kept

    convert_checkpoint(T2V, out, progress=False)
    err = capsys.readouterr().err
    assert f"sparge-convert: removed {tmp_path / stale}, the partial output of an earlier conversion (pid " in err
    assert partials(tmp_path) == [".other.partial-x", ".out.partial-alive"]
    assert sorted(os.listdir(out)) == ["config.json", "params"] and read_wan_config(out).num_layers == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("phase", ["staging", "saving"])
def test_a_signal_leaves_nothing_behind(tmp_path, monkeypatch, capsys, signum, phase):
    if phase == "staging":  # the signal arrives on the tenth tensor
        real, calls = convert.pipeline.torch_to_flax, []

        def flaky(array, kind):
            calls.append(kind)
            if len(calls) == 10:
                os.kill(os.getpid(), signum)
            return real(array, kind)

        monkeypatch.setattr(convert.pipeline, "torch_to_flax", flaky)
    else:  # the signal arrives while Orbax writes: held back until the write ends
        real_save = sparge_jax.models.checkpoint.save_wan_params

        def signalled(directory, params, config):
            os.kill(os.getpid(), signum)
            real_save(directory, params, config)
            assert os.path.isdir(os.path.join(directory, "params")), "the write was not cut short"

        monkeypatch.setattr(sparge_jax.models.checkpoint, "save_wan_params", signalled)
    assert main([T2V, str(tmp_path / "out"), "--no-progress"]) == 128 + signum
    assert os.listdir(tmp_path) == []
    assert capsys.readouterr().err.strip().endswith(
        f"sparge-convert: interrupted by {signal.Signals(signum).name}; nothing written")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_an_unwritable_output_place_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main([T2V, str(tmp_path / "file" / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparge-convert: error: [Errno ") and str(tmp_path / "file") in err[0]


def test_damaged_zip_pth_files_are_called_truncated_or_corrupt(tmp_path):
    data = Path(PTH).read_bytes()
    (tmp_path / "config.json").write_bytes(Path(T2V, "config.json").read_bytes())
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])  # zip directory (at the end) lost
    with pytest.raises(ValueError, match=r"cut.pth is a truncated or corrupt zip-format torch file"):
        convert_checkpoint(tmp_path / "cut.pth", tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "cut.pth"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="with torch installed its reader loads .pth files, and it does not verify the stored "
                           "data's zip CRC (docs/convert.md)")
def test_damaged_tensor_data_in_a_zip_pth_is_called_truncated_or_corrupt(tmp_path):
    data = Path(PTH).read_bytes()
    (tmp_path / "config.json").write_bytes(Path(T2V, "config.json").read_bytes())
    start = data.index(b"data/0") + 200  # past the first storage's name: its header or data
    flipped = data[:start] + bytes(b ^ 0xFF for b in data[start:start + 64]) + data[start + 64:]
    (tmp_path / "flipped.pth").write_bytes(flipped)
    with pytest.raises(ValueError, match=r"flipped.pth is truncated or corrupt: tensor .* cannot be read"):
        convert_checkpoint(tmp_path / "flipped.pth", tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "flipped.pth"]
