"""Training batches read ahead on a background thread and put on the devices before they are needed.

The loop dispatches a step asynchronously, so the host has the device's step time to prepare the
next call's batch: read it from the data pipeline, stack the micro-steps of a multi-step call,
assemble the global array and copy it to the devices. `DevicePrefetcher` does that `depth` calls
ahead on its own thread, so the loop's thread only dispatches.

Exact resume is kept: every prepared call carries the data iterator's position before and after
it, and `position` is the position after the last call handed out — what a checkpoint must save —
however far the thread has read ahead. A data error is raised when the loop takes the call whose
batch failed, with `read_position` the position before it, so the steps before it are saved.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from vdm_jax.training import parallel


def call_sizes(start: int, num_steps: int, per_call: int) -> list[int]:
    """The micro-steps of each call from step `start` to `num_steps`: `per_call` for a call that starts
    at a multiple of it with that many steps left, else 1. Calls start at the same steps however often
    the run was stopped and resumed, so a resumed run computes exactly what the uninterrupted one does."""
    sizes, step = [], start
    while step < num_steps:
        sizes.append(per_call if per_call > 1 and step % per_call == 0 and num_steps - step >= per_call else 1)
        step += sizes[-1]
    return sizes


def stack_batches(batches: list[dict[str, np.ndarray]], mesh, keys=("image",)) -> dict[str, Any]:
    """One call's host batches' `keys` as global device arrays: [B, ...], or [k, B, ...] for k > 1 micro-steps."""
    k = len(batches)
    local = {name: np.stack([b[name] for b in batches]) if k > 1 else batches[0][name] for name in keys}
    return parallel.global_batch(local, mesh, leading_axes=1 if k > 1 else 0)


class DevicePrefetcher:
    """Device batches for a sequence of calls, prepared `depth` calls ahead (0: when asked for).

    Args:
      iterator: the host data iterator (`get_state()`, `next()`); after construction only this
        object reads it.
      mesh: the device mesh the batches are sharded over.
      sizes: the micro-steps of each call, in order (`call_sizes`).
      depth: calls prepared ahead on a background thread; 0 reads in `next()`.
      keys: what of each batch goes to the devices ('image'; and 'label' for a class-conditional model).
    """

    def __init__(self, iterator, mesh, sizes: Iterable[int], depth: int = 2, keys=("image",)):
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an int >= 0, got {depth!r}.")
        self._iterator, self._mesh, self._sizes, self._keys = iterator, mesh, iter(sizes), tuple(keys)
        # The iterator's position after the last call handed out, and before it (or the one asked for).
        self.position = self.read_position = iterator.get_state()
        self._queue = queue.Queue(maxsize=depth) if depth else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="vdm_jax-prefetch", daemon=True)
        if depth:
            self._thread.start()

    def _prepare(self, k: int) -> tuple[Any, Any, Any, BaseException | None]:
        before = self._iterator.get_state()
        try:
            batch = stack_batches([next(self._iterator) for _ in range(k)], self._mesh, self._keys)
        except BaseException as e:  # noqa: BLE001 - handed to the loop's thread, raised there
            return before, None, None, e
        return before, batch, self._iterator.get_state(), None

    def _work(self) -> None:
        for k in self._sizes:
            if self._stop.is_set():
                return
            item = self._prepare(k)
            self._queue.put(item)  # (blocks while the queue is full; `close` drains it)
            if item[3] is not None:
                return
        self._queue.put((self._iterator.get_state(), None, None, StopIteration()))

    def __next__(self):
        self.read_position, batch, after, error = self._queue.get() if self._queue else self._prepare(next(self._sizes))
        if error is not None:
            raise error
        self.position = after
        return batch

    def close(self) -> None:
        """Stops the thread (it finishes the batch it is reading)."""
        self._stop.set()
        if self._queue:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread.join()
