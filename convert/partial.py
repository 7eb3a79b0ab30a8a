"""The converter's staging directory `.<output>.partial-*` beside the output: made with an owner
record, removed on any error or signal, and removed by a later run when its owner died (kill -9).

While Orbax writes, its threads keep writing after the main thread is interrupted, so SIGINT and
SIGTERM are held back during that phase (`deferred_signals`) and acted on once it ends."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading

OWNER_FILE = "converter-owner.json"


class Interrupted(Exception):
    """The conversion stopped on SIGINT/SIGTERM; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def _prefix(output_dir: str) -> str:
    return os.path.join(os.path.dirname(output_dir), f".{os.path.basename(output_dir)}.partial-")


def make_staging(output_dir: str) -> str:
    """A new staging directory beside `output_dir` holding an owner record (pid, host)."""
    staging = tempfile.mkdtemp(dir=os.path.dirname(output_dir), prefix=os.path.basename(_prefix(output_dir)))
    with open(os.path.join(staging, OWNER_FILE), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    return staging


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(output_dir: str) -> list[str]:
    """Remove staging directories of `output_dir` left by converters on this host that are no
    longer running (killed before they could clean up); returns them, each reported on stderr.
    Directories without an owner record, or whose owner runs, are left alone."""
    removed = []
    for path in sorted(glob.glob(glob.escape(_prefix(output_dir)) + "*")):
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                owner = json.load(f)
            pid, host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host != socket.gethostname() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        print(f"sparge-convert: removed {path}, the partial output of an earlier conversion (pid {pid}) that "
              "did not finish", file=sys.stderr, flush=True)
    return removed


def finish_staging(staging: str) -> None:
    """Drop the owner record before the staging directory becomes the output."""
    os.remove(os.path.join(staging, OWNER_FILE))


@contextlib.contextmanager
def _stop_signals_handled_by(handler):
    """SIGINT and SIGTERM go to `handler` inside the block; the previous handlers come back after."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def interruptible():
    """SIGTERM raises `Interrupted` like SIGINT does (so the caller's cleanup runs); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    with _stop_signals_handled_by(handler):
        yield


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT/SIGTERM back until the block ends, then raise `Interrupted` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if not received:
            print(f"\nsparge-convert: {signal.Signals(signum).name} received; stopping once the current write "
                  "ends, then removing the partial output", file=sys.stderr, flush=True)
        received.append(signum)

    with _stop_signals_handled_by(handler):
        yield
    if received:
        raise Interrupted(received[0])
