"""Training batches read one step ahead, on a background thread, while the current step runs."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import jax

from train.data import BatchLoader


class BatchPrefetcher:
    """`batch(step)`: step `step`'s batch of `loader` (the same arrays as `loader.batch(step)`);
    it then starts making step + 1's (`loader.batch`: the read and the copy to the devices) on
    one background thread, unless step + 1 is `stop`, so that both overlap whatever the caller
    does next (the training step on the device): the next step's batch is on the devices
    when the caller asks for it.

    An error raised while reading a step is raised by `batch` of that step, not earlier; a batch
    read ahead for a step that is never asked for (the loop stopped) is dropped. `enabled=False`
    reads each batch on the calling thread when asked (no thread). A context manager: leaving it
    waits for the read in flight (its result or error is dropped) and ends the thread.
    """

    def __init__(self, loader: BatchLoader, stop: int, enabled: bool = True):
        self.loader, self.stop = loader, stop
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") if enabled else None
        self._pending: tuple[int, Future] | None = None

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._pending = None
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)

    def batch(self, step: int) -> dict[str, jax.Array]:
        pending, self._pending = self._pending, None
        batch = pending[1].result() if pending is not None and pending[0] == step else self.call(self.loader.batch, step)
        if self._reader is not None and step + 1 < self.stop:
            self._pending = (step + 1, self._reader.submit(self.loader.batch, step + 1))
        return batch

    def call(self, fn, *args):
        """`fn(*args)` on the reading thread, after the read in flight (so that the data source is
        never read by two threads at once), e.g. `nonfinite_examples`; on the calling thread when
        not enabled."""
        if self._reader is None:
            return fn(*args)
        return self._reader.submit(fn, *args).result()
