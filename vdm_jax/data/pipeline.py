"""Host-sharded grain pipelines: a shuffled, flipped, repeating train stream and an exact eval pass.

Both are built with grain's dataset API (`grain.MapDataset` -> `to_iter_dataset` ->
`grain.DatasetIterator`). Batches are dicts of numpy arrays; images stay uint8 (the device
scales them to [-1, 1]).

Sharding: the global batch at every step is the same whatever the number of hosts. Every host
computes the same global stream (a seeded shuffle of the whole source, every epoch, and seeded
flips) and reads only its rows of each global batch: host i of n takes rows
[i·b, (i+1)·b) with b = global_batch_size / n, which is where
`jax.make_array_from_process_local_data` puts them. So a run on 2 hosts × 4 devices trains on
exactly the batches of a run on 1 host × 8 devices, and a run may resume on another topology.

Checkpointing: `iterator.get_state()` is a small JSON-able dict: `{'next_index': 12}`, the
number of batches already returned (with worker processes, a dict of each worker's position).
`iterator.set_state(state)` on a freshly built iterator with the same arguments (num_workers
included) resumes with exactly the batches the uninterrupted iterator would have yielded:
shuffling and flips are functions of (seed, position), so the position is the whole state.
Store it as JSON next to the model checkpoint, or with orbax through
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`.
"""
import importlib.metadata
import math
from typing import Any

import absl.flags
import grain
import jax
import numpy as np

from vdm_jax._checks import check_int
from vdm_jax.data.validation import check_image, check_source


class _CheckedSource:
    """Wraps a source so that every image is checked (uint8, shape `image_shape`) when read."""

    def __init__(self, source: Any, image_shape: tuple[int, ...]):
        self.source = source
        self.image_shape = image_shape

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = self.source[index]
        check_image(example["image"], expected_shape=self.image_shape, where=_where(self.source, index))
        return example


def _where(source: Any, index: int) -> str:
    """Names example `index` in errors: `source.describe(index)` (e.g. its file) where defined."""
    describe = getattr(source, "describe", None)
    return describe(index) if callable(describe) else f"example {index} of {source!r}"


def _global_row(j: int, shard_index: int, shard_count: int, batch_size: int) -> int:
    """The position in the global stream of host `shard_index`'s j-th example (`batch_size` per host)."""
    batch, row = divmod(j, batch_size)
    return (batch * shard_count + shard_index) * batch_size + row


class _HostRows:
    """Host `shard_index`'s rows of each global batch of `stream` (a random-access dataset)."""

    def __init__(self, stream: Any, shard_index: int, shard_count: int, batch_size: int, length: int):
        self.stream = stream
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.batch_size = batch_size
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> dict:
        return self.stream[_global_row(j, self.shard_index, self.shard_count, self.batch_size)]


class _EvalShard(_HostRows):
    """One host's rows of the padded eval pass: global batch g holds examples g·B .. g·B + B - 1.

    Items past the end of the source are padding: a zero image with `mask` False, `index` -1.
    """

    def __getitem__(self, j: int) -> dict:
        index = _global_row(j, self.shard_index, self.shard_count, self.batch_size)
        if index < len(self.stream):
            example = self.stream[index]
            return {"image": example["image"], "label": example["label"], "index": index,
                    "mask": True}
        image = np.zeros(self.stream.image_shape, np.uint8)
        return {"image": image, "label": 0, "index": -1, "mask": False}


class _RandomFlip(grain.transforms.RandomMap):
    """Mirrors the image left-right with probability 1/2."""

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        if rng.random() < 0.5:
            example = {**example, "image": example["image"][:, ::-1]}
        return example


_BATCH_DTYPES = {"label": np.int32, "index": np.int32, "mask": np.bool_}


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
    """Stacks examples: `image` uint8 [b, H, W, C], `label` int32 [b] (`index`, `mask` too)."""
    batch = {"image": np.stack([example["image"] for example in examples])}
    for key, dtype in _BATCH_DTYPES.items():
        if key in examples[0]:
            batch[key] = np.array([example[key] for example in examples], dtype)
    return batch


def _check_reading(num_workers: int, num_threads: int) -> None:
    check_int("num_workers", num_workers, 0)
    check_int("num_threads", num_threads, 0)


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """This host's (shard_index, shard_count): JAX's process index and count by default."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    return shard_index, shard_count


def _host_batch_size(global_batch_size: int, shard_count: int) -> int:
    check_int("global_batch_size", global_batch_size, 1)
    if global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the number of "
            f"shards (hosts) {shard_count}"
        )
    return global_batch_size // shard_count


# grain up to 0.2.18 (the newest release when this was written) reads an absl flag when it starts
# worker processes, and fails with UnparsedFlagAccessError where absl's flags are not parsed
# (google/grain#1355; fixed upstream by google/grain#1362, after 0.2.18).
def _grain_reads_absl_flags() -> bool:
    try:
        version = tuple(int(part) for part in importlib.metadata.version("grain").split(".")[:3])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return version <= (0, 2, 18)


def _check_absl_flags_parsed() -> None:
    if _grain_reads_absl_flags() and not absl.flags.FLAGS.is_parsed():
        raise RuntimeError(
            "num_workers > 0: grain's worker processes read absl's flags, which this program has "
            "not parsed (google/grain#1355). Parse them first (absl.app.run(main), as the "
            "experiments do, or absl.flags.FLAGS(sys.argv)), or call "
            "absl.flags.FLAGS.mark_as_parsed() to use their defaults; or use num_workers=0.")


def _iterate(
    dataset: grain.MapDataset, num_workers: int, num_threads: int
) -> grain.DatasetIterator:
    """Reads `dataset` with `num_threads` threads, in `num_workers` processes if > 0."""
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    iter_dataset = dataset.to_iter_dataset(read_options)
    if num_workers > 0:
        _check_absl_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=num_workers)
        iter_dataset = iter_dataset.mp_prefetch(options)
    return iter(iter_dataset)


def train_iterator(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    random_flip: bool = True,
    num_epochs: int | None = None,
    num_workers: int = 0,
    num_threads: int = 1,
) -> grain.DatasetIterator:
    """Shuffled, randomly flipped training batches: this host's rows of each global batch.

    The global stream is the whole source reshuffled every epoch from `seed`, each example
    flipped with a coin that depends on (seed, position); it is the same on every host. Global
    batch g is stream[g·B .. g·B + B - 1] (B = `global_batch_size`) and host `shard_index` of
    `shard_count` yields rows [shard_index·b, (shard_index + 1)·b) of it, b = B / shard_count:
    the global batches do not depend on the number of hosts. Batches may span an epoch
    boundary; an incomplete last global batch (only with `num_epochs`) is dropped.

    Args:
        source: random access, `source[i] = {'image': uint8 [H, W, C], 'label': int}`.
        global_batch_size: examples per step over all hosts; a multiple of `shard_count`.
        seed: a non-negative int; the shuffle and the flips are functions of it and the position.
        shard_index, shard_count: this host's shard; default `jax.process_index()`,
            `jax.process_count()`.
        random_flip: mirror each image left-right with probability 1/2.
        num_epochs: passes over the source (>= 1); None repeats forever.
        num_workers: worker processes (0: read in this process); they pay on many-core hosts,
            not on a few cores. With grain 0.2.18 they need absl's flags parsed (`absl.app.run`).
        num_threads: reading threads per process: 1 reads the next batches in the background,
            0 reads in `next()`. More help I/O-bound sources (TFDS on a network disk), not
            CPU-bound decoding (the GIL).

    Returns:
        A `grain.DatasetIterator` of `{'image': uint8 [b, H, W, C], 'label': int32 [b]}` with
        `get_state()` / `set_state()` (see the module docstring).

    Raises:
        ValueError: bad shard arguments, batch size, seed, num_epochs, num_workers or num_threads;
            an empty or too small source; images that are not [H, W, C] of one shape (named when
            read, by `source.describe(index)` where the source defines it, e.g. the file).
        TypeError: arguments that are not ints; not a source; images that are not uint8.
        RuntimeError: num_workers > 0 in a program that has not parsed absl's flags (grain 0.2.18).
    """
    shard_index, shard_count = _shard(shard_index, shard_count)
    batch_size = _host_batch_size(global_batch_size, shard_count)
    check_int("seed", seed, 0)
    if num_epochs is not None:
        check_int("num_epochs", num_epochs, 1)
    _check_reading(num_workers, num_threads)
    image_shape = check_source(source)
    if num_epochs is not None and num_epochs * len(source) < global_batch_size:
        raise ValueError(
            f"{len(source)} examples for {num_epochs} epochs cannot fill one batch of {global_batch_size}")
    stream = grain.MapDataset.source(_CheckedSource(source, image_shape))
    stream = stream.seed(seed).shuffle().repeat(num_epochs)
    if random_flip:
        stream = stream.random_map(_RandomFlip())
    length = len(stream) // global_batch_size * batch_size  # whole global batches only
    rows = _HostRows(stream, shard_index, shard_count, batch_size, length)
    dataset = grain.MapDataset.source(rows).batch(batch_size, drop_remainder=True, batch_fn=_stack)
    return _iterate(dataset, num_workers, num_threads)


def num_eval_batches(length: int, global_batch_size: int, shard_count: int | None = None) -> int:
    """How many batches `eval_iterator` yields on every host for a source of `length` examples."""
    shard_count = jax.process_count() if shard_count is None else shard_count
    _host_batch_size(global_batch_size, shard_count)
    return math.ceil(length / global_batch_size)


def eval_iterator(
    source: Any,
    *,
    global_batch_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
    num_threads: int = 1,
) -> grain.DatasetIterator:
    """One pass over the whole source, in order, each example on exactly one host, once.

    Global batch g holds examples g·B .. g·B + B - 1 (B = `global_batch_size`), the last one
    padded with `mask` False examples (a zero image, label 0, index -1); host `shard_index`
    yields rows [shard_index·b, (shard_index + 1)·b) of each, b = B / shard_count. Every host
    yields ceil(N / B) batches, and the global batches do not depend on the number of hosts.
    Average a metric as sum(value * mask) / sum(mask) over all hosts.

    Args:
        source, global_batch_size, shard_index, shard_count, num_workers, num_threads: as for
            `train_iterator`.

    Returns:
        A `grain.DatasetIterator` of `{'image': uint8 [b, H, W, C], 'label': int32 [b],
        'index': int32 [b] (the example's index in `source`), 'mask': bool [b]}`.

    Raises:
        ValueError, TypeError, RuntimeError: as for `train_iterator`.
    """
    shard_index, shard_count = _shard(shard_index, shard_count)
    batch_size = _host_batch_size(global_batch_size, shard_count)
    _check_reading(num_workers, num_threads)
    image_shape = check_source(source)
    num_batches = num_eval_batches(len(source), global_batch_size, shard_count)
    shard = _EvalShard(_CheckedSource(source, image_shape), shard_index, shard_count, batch_size,
                       num_batches * batch_size)
    dataset = grain.MapDataset.source(shard).batch(batch_size, batch_fn=_stack)
    return _iterate(dataset, num_workers, num_threads)
