"""Orderly stops of a training run: SIGTERM (preemption) and Ctrl-C become a request that the
step loop honours between steps (finish the step, save, exit non-zero)."""

from __future__ import annotations

import signal
import sys
import threading


class StopRequested(Exception):
    """The run stopped on a signal after `step` steps; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, saved: bool):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        where = f"checkpoint at step {step} saved; continue with --resume" if saved else "no checkpoint written"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} ({where})")


class StopRequests:
    """Context manager: while active (main thread only), SIGTERM and a first SIGINT set `signum`
    instead of killing the process; a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
