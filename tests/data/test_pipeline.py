"""Tests for vdm_jax.data.pipeline: determinism, sharding, flips, checkpointing, exact eval."""
import json

import absl.flags
import numpy as np
import pytest

from vdm_jax.data import ArraySource, eval_iterator, train_iterator
from vdm_jax.data import pipeline


def indexed_source(n: int, shape=(6, 5, 3)) -> ArraySource:
    """Images whose row 0 holds their index (n <= 256; unchanged by a left-right flip) and whose
    row 1 ramps up left to right (reversed by a flip); label = index % 10."""
    images = np.zeros((n, *shape), np.uint8)
    images[:, 0] = np.arange(n, dtype=np.uint8)[:, None, None]
    images[:, 1] = (1 + np.arange(shape[1], dtype=np.uint8))[None, :, None]
    return ArraySource(images, np.arange(n) % 10)


def indices(batch) -> np.ndarray:
    return batch["image"][:, 0, 0, 0].astype(int)


def flipped(batch) -> np.ndarray:
    return batch["image"][:, 1, 0, 0] > batch["image"][:, 1, -1, 0]


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_batch_shapes_and_dtypes():
    source = indexed_source(20)
    batch = next(train_iterator(source, global_batch_size=8, seed=0, shard_index=1, shard_count=2))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (4, 6, 5, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], indices(batch) % 10)


def test_default_shard_is_this_jax_process():
    batch = next(train_iterator(indexed_source(20), global_batch_size=4, seed=0))
    assert batch["image"].shape[0] == 4  # one process: all of the global batch


def test_same_seed_same_batches_other_seed_other_order():
    source = indexed_source(30)
    run = lambda seed: take(train_iterator(source, global_batch_size=6, seed=seed,
                                           shard_index=0, shard_count=1), 7)
    first = run(3)
    assert_same_batches(first, run(3))
    other = run(4)
    assert not all((indices(a) == indices(b)).all() for a, b in zip(first, other))


@pytest.mark.parametrize("shard_count", [2, 4])
def test_hosts_read_their_rows_of_the_same_global_batches(shard_count):
    """Host i's batch is rows [i·b, (i+1)·b) of the one-host batch, flips included, so the global
    batches do not depend on the number of hosts (and a run may resume on another topology)."""
    source = indexed_source(20)  # batches of 8 span epochs: 20 is not a multiple of 8
    one_host = take(train_iterator(source, global_batch_size=8, seed=3, shard_index=0, shard_count=1), 7)
    hosts = [take(train_iterator(source, global_batch_size=8, seed=3, shard_index=i, shard_count=shard_count), 7)
             for i in range(shard_count)]
    for step, whole in enumerate(one_host):
        joined = {key: np.concatenate([host[step][key] for host in hosts]) for key in whole}
        assert_same_batches([joined], [whole])


def test_every_epoch_covers_the_source_once_reshuffled():
    n, batch = 48, 8  # 6 global batches per epoch
    iterator = train_iterator(indexed_source(n), global_batch_size=batch, seed=0, shard_index=0, shard_count=1)
    epochs = [np.concatenate([indices(b) for b in take(iterator, n // batch)]) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))
    assert (epochs[0] != epochs[1]).any()


def test_uneven_source_drops_only_the_last_partial_global_batch():
    seen = []
    for shard_index in range(3):  # 23 examples, one epoch, global batches of 21: one batch, 2 unread
        (batch,) = list(train_iterator(indexed_source(23), global_batch_size=21, seed=0, shard_index=shard_index,
                                       shard_count=3, num_epochs=1))
        seen += indices(batch).tolist()
    assert len(seen) == len(set(seen)) == 21 and set(seen) <= set(range(23))


def test_random_flip():
    source = indexed_source(64)
    batches = take(train_iterator(source, global_batch_size=64, seed=1, shard_index=0,
                                  shard_count=1), 2)
    flips = np.concatenate([flipped(b) for b in batches])
    assert 0.25 < flips.mean() < 0.75
    batch = batches[0]
    for image, index, flip in zip(batch["image"], indices(batch), flipped(batch)):
        expected = source[index]["image"]
        np.testing.assert_array_equal(image, expected[:, ::-1] if flip else expected)
    unflipped = next(train_iterator(source, global_batch_size=64, seed=1, shard_index=0,
                                    shard_count=1, random_flip=False))
    assert not flipped(unflipped).any()


def test_num_epochs_drops_the_remainder():
    iterator = train_iterator(indexed_source(10), global_batch_size=4, seed=0, shard_index=0,
                              shard_count=1, num_epochs=2)
    assert len(list(iterator)) == 5  # 20 examples, batches may span the epoch boundary


def test_checkpoint_state_round_trip_across_epochs():
    source = indexed_source(10)  # 10 examples, batches of 4: epochs end mid-batch
    make = lambda: train_iterator(source, global_batch_size=4, seed=7, shard_index=0,
                                  shard_count=1)
    iterator = make()
    take(iterator, 2)
    state = iterator.get_state()
    assert isinstance(state, dict)
    saved = json.loads(json.dumps(state))  # plain data
    expected = take(iterator, 6)  # crosses two epoch boundaries
    restored = make()
    restored.set_state(saved)
    assert_same_batches(take(restored, 6), expected)


@pytest.fixture
def absl_flags_parsed():
    """absl's flags parsed (their defaults), as in an absl program; unparsed again afterwards."""
    was_parsed = absl.flags.FLAGS.is_parsed()
    absl.flags.FLAGS.mark_as_parsed()
    yield
    if not was_parsed:
        absl.flags.FLAGS.unparse_flags()


def test_workers_without_parsed_absl_flags_say_how_to_fix_it():
    """grain 0.2.18's workers fail on unparsed absl flags (google/grain#1355): the library says so
    when the iterator is built, and never parses or marks the flags itself."""
    if absl.flags.FLAGS.is_parsed():
        pytest.skip("absl's flags were parsed by an earlier test in this process")
    if not pipeline._grain_reads_absl_flags():
        pytest.skip("this grain starts its workers without absl's flags")
    for make in (train_iterator, eval_iterator):
        kwargs = {"seed": 0} if make is train_iterator else {}
        with pytest.raises(RuntimeError, match=r"num_workers > 0: .*absl\.flags\.FLAGS\.mark_as_parsed\(\)"):
            make(indexed_source(10), global_batch_size=2, shard_index=0, shard_count=1, num_workers=1, **kwargs)
    assert not absl.flags.FLAGS.is_parsed()


@pytest.mark.slow(8)
def test_worker_processes_give_the_same_batches_and_state(absl_flags_parsed):
    source = indexed_source(30)
    make = lambda workers: train_iterator(source, global_batch_size=6, seed=2, shard_index=0,
                                          shard_count=1, num_workers=workers)
    in_process = take(make(0), 6)
    iterator = make(1)
    try:
        assert_same_batches(take(iterator, 3), in_process[:3])
        state = json.loads(json.dumps(iterator.get_state()))
    finally:
        iterator.close()
    restored = make(1)
    try:
        restored.set_state(state)
        assert_same_batches(take(restored, 3), in_process[3:])
    finally:
        restored.close()


@pytest.mark.parametrize(
    "n, global_batch_size, shard_count",
    [(23, 6, 3), (24, 6, 3), (5, 8, 4), (7, 4, 1), (2, 4, 4)],
)
def test_eval_covers_every_example_exactly_once(n, global_batch_size, shard_count):
    source = indexed_source(n)
    batch_size = global_batch_size // shard_count
    seen, num_batches = [], set()
    for shard_index in range(shard_count):
        batches = list(eval_iterator(source, global_batch_size=global_batch_size,
                                     shard_index=shard_index, shard_count=shard_count))
        num_batches.add(len(batches))
        for batch in batches:
            assert batch["image"].shape == (batch_size, 6, 5, 3)
            assert batch["mask"].dtype == np.bool_ and batch["index"].dtype == np.int32
            mask = batch["mask"]
            np.testing.assert_array_equal(indices(batch)[mask], batch["index"][mask])  # no flip
            np.testing.assert_array_equal(batch["label"][mask], batch["index"][mask] % 10)
            assert (batch["image"][~mask] == 0).all() and (batch["index"][~mask] == -1).all()
            seen += batch["index"][mask].tolist()
    assert len(num_batches) == 1  # every host runs the same number of steps
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("shard_count", [2, 4])
def test_eval_global_batches_do_not_depend_on_the_hosts(shard_count):
    source = indexed_source(21)
    one = list(eval_iterator(source, global_batch_size=8, shard_index=0, shard_count=1))
    hosts = [list(eval_iterator(source, global_batch_size=8, shard_index=i, shard_count=shard_count))
             for i in range(shard_count)]
    assert [len(h) for h in hosts] == [len(one)] * shard_count == [3] * shard_count
    for step, whole in enumerate(one):
        joined = {key: np.concatenate([host[step][key] for host in hosts]) for key in whole}
        assert_same_batches([joined], [whole])
    np.testing.assert_array_equal(one[0]["index"], np.arange(8))


def test_argument_errors():
    source = indexed_source(10)
    with pytest.raises(ValueError, match="global_batch_size 10 must be a positive multiple .* 3"):
        train_iterator(source, global_batch_size=10, seed=0, shard_index=0, shard_count=3)
    with pytest.raises(ValueError, match="global_batch_size 10 must be a positive multiple .* 4"):
        eval_iterator(source, global_batch_size=10, shard_index=0, shard_count=4)
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        train_iterator(source, global_batch_size=4, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="10 examples for 1 epochs cannot fill one batch of 16"):
        train_iterator(source, global_batch_size=16, seed=0, shard_index=0, shard_count=1,
                       num_epochs=1)
    with pytest.raises(ValueError, match="source is empty"):
        train_iterator([], global_batch_size=4, seed=0, shard_index=0, shard_count=1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
    ({"seed": 1.5}, TypeError, r"seed must be an int, got 1.5 \(float\)"),
    ({"global_batch_size": 4.0}, TypeError, r"global_batch_size must be an int, got 4.0 \(float\)"),
    ({"global_batch_size": 0}, ValueError, "global_batch_size must be >= 1, got 0"),
    ({"num_epochs": 0}, ValueError, "num_epochs must be >= 1, got 0"),
    ({"num_workers": -1}, ValueError, "num_workers must be >= 0, got -1"),
    ({"num_threads": -2}, ValueError, "num_threads must be >= 0, got -2"),
    ({"source": 5}, TypeError, r"source must support len\(\) and \[index\] \(e.g. from load_source\), got int"),
])
def test_bad_train_iterator_arguments(kwargs, error, match):
    args = {"source": indexed_source(10), "global_batch_size": 4, "seed": 0, "shard_index": 0,
            "shard_count": 1, **kwargs}
    with pytest.raises(error, match=match):
        train_iterator(args.pop("source"), **args)


def test_bad_eval_iterator_arguments():
    with pytest.raises(TypeError, match="global_batch_size must be an int, got 2.5"):
        eval_iterator(indexed_source(10), global_batch_size=2.5, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        eval_iterator(indexed_source(10), global_batch_size=2, shard_index=0, shard_count=1, num_workers=-1)


def _example(image) -> dict:
    return {"image": image, "label": 0}


def test_bad_images_are_caught_when_batched():
    good = np.zeros((4, 4, 3), np.uint8)
    odd_shape = [_example(good)] * 5 + [_example(np.zeros((4, 5, 3), np.uint8))]
    with pytest.raises(ValueError, match=r"got \(4, 5, 3\), expected \(4, 4, 3\) .*example 5"):
        list(eval_iterator(odd_shape, global_batch_size=2, shard_index=0, shard_count=1))
    odd_dtype = [_example(good), _example(good.astype(np.float32) / 255)]
    with pytest.raises(TypeError, match=r"uint8, got float32 \(values in \[0, 0\]: convert with "
                                        r"np.round\(images \* 255\).astype\(np.uint8\)\) \(example 1"):
        list(eval_iterator(odd_dtype, global_batch_size=2, shard_index=0, shard_count=1))
    with pytest.raises(ValueError, match=r"\[H, W, C\], got \(4, 4\)"):
        train_iterator([_example(good[..., 0])], global_batch_size=1, seed=0)
    with pytest.raises(TypeError, match="uint8, got float64"):
        train_iterator([_example(np.zeros((4, 4, 3)))], global_batch_size=1, seed=0)
