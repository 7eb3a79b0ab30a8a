"""Prefetched training batches (`train.prefetch`): the serial batches in order, read one step
ahead on a background thread, errors raised at the step they belong to, no thread left behind."""

import threading
import time

import jax
import numpy as np
import pytest

from train.config import MeshSettings
from train.data import BatchLoader, SyntheticLatents, global_batch_indices
from train.prefetch import BatchPrefetcher
from train.sharding import batch_sharding, make_mesh

SHAPE, TEXT_LEN, TEXT_DIM, EXAMPLES, BATCH, SEED = (1, 2, 2, 3), 3, 5, 9, 6, 7


class RecordingLatents(SyntheticLatents):
    """SyntheticLatents that records each read (indices, thread name) and raises a ValueError
    for a read holding example `poisoned`."""

    def __init__(self, poisoned: int | None = None):
        super().__init__(EXAMPLES, SHAPE, TEXT_LEN, TEXT_DIM, seed=1)
        self.poisoned, self.reads = poisoned, []

    def read(self, indices):
        self.reads.append((np.array(indices), threading.current_thread().name))
        if self.poisoned in indices:
            raise ValueError(f"example {self.poisoned} is unreadable")
        return super().read(indices)


def loader_of(source):
    mesh = make_mesh(MeshSettings(1, -1, 1))
    return BatchLoader(source, BATCH, 2, SEED, lambda ndim: batch_sharding(mesh, ndim, 1))


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("batch-prefetch")]


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.mark.parametrize("enabled", [True, False], ids=["prefetch", "serial"])
def test_batches_are_the_scheduled_examples_in_order_read_one_step_ahead(enabled):
    source, oracle = RecordingLatents(), SyntheticLatents(EXAMPLES, SHAPE, TEXT_LEN, TEXT_DIM, seed=1)
    with BatchPrefetcher(loader_of(source), stop=6, enabled=enabled) as batches:
        for step in range(2, 6):  # as after a resume at step 2
            batch = batches.batch(step)
            want = oracle.read(global_batch_indices(step, BATCH, EXAMPLES, SEED))
            for name, array in want.items():
                np.testing.assert_array_equal(np.asarray(batch[name]).reshape(array.shape), array)
            if enabled and step + 1 < 6:  # the next step is read while the caller works on this one
                wait_for(lambda: len(source.reads) == step - 2 + 2)
            assert len(source.reads) == step - 2 + (2 if enabled and step + 1 < 6 else 1)
    assert [list(i) for i, _ in source.reads] == [list(global_batch_indices(s, BATCH, EXAMPLES, SEED)) for s in range(2, 6)]
    threads = {name for _, name in source.reads}
    assert threads == ({"batch-prefetch_0"} if enabled else {threading.current_thread().name})
    assert not prefetch_threads()


class RecordingLoader(BatchLoader):
    """BatchLoader that records the thread each `place` (the copy to the devices) ran on."""

    def __init__(self, source):
        mesh = make_mesh(MeshSettings(1, -1, 1))
        super().__init__(source, BATCH, 2, SEED, lambda ndim: batch_sharding(mesh, ndim, 1))
        self.placed = []

    def place(self, local):
        self.placed.append(threading.current_thread().name)
        return super().place(local)


def test_the_batch_read_ahead_is_on_the_devices_before_it_is_asked_for():
    loader = RecordingLoader(RecordingLatents())
    with BatchPrefetcher(loader, stop=4) as batches:
        batches.batch(0)
        wait_for(lambda: len(loader.placed) == 2)  # step 1's arrays are made before step 1 asks
        batch = batches.batch(1)
        assert all(isinstance(array, jax.Array) for array in batch.values())
        wait_for(lambda: len(loader.placed) == 3)
    assert loader.placed == ["batch-prefetch_0"] * 3  # steps 0-2, none on the calling thread


@pytest.mark.parametrize("enabled", [True, False], ids=["prefetch", "serial"])
def test_a_read_error_is_raised_by_its_own_step_and_no_thread_outlives_the_loader(enabled):
    bad_step = 3
    only_there = set(global_batch_indices(bad_step, BATCH, EXAMPLES, SEED)) - set(
        global_batch_indices(bad_step - 1, BATCH, EXAMPLES, SEED))
    source = RecordingLatents(poisoned=int(min(only_there)))  # in step 3's batch, not in step 2's
    with BatchPrefetcher(loader_of(source), stop=10, enabled=enabled) as batches:
        batches.batch(bad_step - 1)
        if enabled:
            wait_for(lambda: len(source.reads) == 2)  # step 3's read has failed in the background
        with pytest.raises(ValueError, match=f"^example {source.poisoned} is unreadable$"):
            batches.batch(bad_step)
    assert not prefetch_threads()
    # a failed read of a step that is never asked for is dropped
    with BatchPrefetcher(loader_of(RecordingLatents(poisoned=source.poisoned)), stop=10, enabled=enabled) as batches:
        batches.batch(bad_step - 1)
    assert not prefetch_threads()
