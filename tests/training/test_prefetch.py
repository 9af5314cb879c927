"""DevicePrefetcher: the same device batches and iterator positions as reading in the loop, data
errors raised at the call that failed, and a thread that stops when asked."""
import threading
import time

import jax
import numpy as np
import pytest

from vdm_jax.training import parallel
from vdm_jax.training.prefetch import DevicePrefetcher, call_sizes, stack_batches

B = 8


class _Numbered:
    """A host iterator whose batch i is filled with i; its state is the number of batches read."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.0):
        self.i = 0
        self.fail_at = fail_at
        self.delay = delay

    def get_state(self):
        return {"next_index": self.i}

    def __next__(self):
        time.sleep(self.delay)
        if self.i == self.fail_at:
            raise OSError(f"cannot read batch {self.i}")
        batch = {"image": np.full((B, 2, 2, 1), self.i, np.uint8)}
        self.i += 1
        return batch


def _sizes(start=1, num_steps=10, per_call=3):
    return call_sizes(start, num_steps, per_call)


def test_call_sizes_follow_the_loop():
    assert _sizes() == [1, 1, 3, 3, 1]  # single steps up to the first multiple of 3, the tail single
    assert _sizes(start=0, num_steps=6) == [3, 3]
    assert _sizes(start=5, num_steps=5) == []


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_batches_and_positions_are_those_of_reading_in_the_loop(depth):
    mesh = parallel.make_mesh()
    sizes = _sizes()
    reference = _Numbered()
    prefetcher = DevicePrefetcher(_Numbered(), mesh, sizes, depth=depth)
    try:
        for k in sizes:
            before = reference.get_state()
            want = stack_batches([next(reference) for _ in range(k)], mesh)
            got = next(prefetcher)
            assert got["image"].shape == want["image"].shape == ((k, B, 2, 2, 1) if k > 1 else (B, 2, 2, 1))
            assert got["image"].sharding == want["image"].sharding
            np.testing.assert_array_equal(jax.device_get(got["image"]), jax.device_get(want["image"]))
            assert prefetcher.read_position == before
            assert prefetcher.position == reference.get_state()
        with pytest.raises(StopIteration):
            next(prefetcher)
    finally:
        prefetcher.close()


@pytest.mark.parametrize("depth", [0, 2])
def test_a_data_error_is_raised_at_its_call_with_the_position_before_it(depth):
    mesh = parallel.make_mesh()
    prefetcher = DevicePrefetcher(_Numbered(fail_at=4), mesh, [1, 3, 3], depth=depth)
    try:
        next(prefetcher)
        next(prefetcher)  # batches 1, 2, 3
        assert prefetcher.position == {"next_index": 4}
        with pytest.raises(OSError, match="cannot read batch 4"):
            next(prefetcher)
        assert prefetcher.read_position == {"next_index": 4}  # what a save before failing records
        assert prefetcher.position == {"next_index": 4}
    finally:
        prefetcher.close()


def test_reads_ahead_by_depth_and_close_stops_the_thread():
    mesh = parallel.make_mesh()
    source = _Numbered()
    prefetcher = DevicePrefetcher(source, mesh, [1] * 100, depth=2)
    deadline = time.monotonic() + 30
    while source.i < 3 and time.monotonic() < deadline:  # 2 queued, 1 waiting to be queued
        time.sleep(0.01)
    time.sleep(0.2)
    assert source.i == 3
    assert prefetcher.position == {"next_index": 0}  # nothing handed out yet
    prefetcher.close()
    assert not any(t.name == "vdm_jax-prefetch" and t.is_alive() for t in threading.enumerate())


def test_bad_depth():
    with pytest.raises(ValueError, match="depth must be an int >= 0"):
        DevicePrefetcher(_Numbered(), parallel.make_mesh(), [1], depth=-1)
