"""Orbax checkpoints: exact round trip, restore into a target, mismatch and config reports, damaged
checkpoints skipped (and set aside, never deleted), a full disk reported in one error, nothing pickled."""
import errno
import logging
import os
import pickle
import shutil
import sys
import time

import numpy as np
import jax
import pytest

from vdm_jax.training import (Checkpointer, CheckpointMismatchError, CheckpointWriteError, CorruptCheckpointError,
                              create_train_state, validate_config)
from vdm_jax.training.checkpoint import save_config, saved_config
from vdm_jax.training.config import config_changes


def _state(config, seed=0):
    return create_train_state(config, validate_config(config), key=jax.random.key(seed))


@pytest.mark.parametrize("schedule", ["linear", "learned"])
def test_round_trip_is_exact(tmp_path, micro, schedule):
    config = micro(family="vdm", timesteps=0, schedule=schedule)
    if schedule == "learned":  # and the vdm recipe's masked AdamW state (optax's MaskedNode leaves)
        config.optim.update(optimizer="adamw", weight_decay=0.01)
    state = _state(config)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(3, state.checkpoint_tree(), {"iterator": {"next_index": 5}})
    ckpt.wait()
    target = _state(config, seed=1)  # different values, same structure
    tree, data = ckpt.restore(jax.device_get(target.checkpoint_tree()))
    assert data == {"iterator": {"next_index": 5}}
    restored = target.replace(**tree)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    for a, b in zip(jax.tree.leaves(restored.checkpoint_tree()), jax.tree.leaves(state.checkpoint_tree())):
        np.testing.assert_array_equal(a, b)
    ckpt.close()


def test_a_checkpoint_of_vdm_jax_0_1_is_refused_by_name(tmp_path, micro):
    """vdm_jax 0.1 kept optax's state for one raveled parameter vector and a fault bit mask."""
    import optax
    from jax.flatten_util import ravel_pytree

    state = _state(micro())
    flat = ravel_pytree(state.params)[0]
    old = {**state.checkpoint_tree(),
           "opt_state": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)).init(flat),
           "faults": {name: np.int32(0) for name in ("step", "terms", "grad_leaf", "skipped", "consecutive")}}
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(5, old, {})
    ckpt.wait()
    with pytest.raises(CheckpointMismatchError, match=r"at step 5 .* was written by vdm_jax 0.1 \(its optimiser state "
                                                      r"is one raveled vector"):
        ckpt.restore_latest(jax.device_get(state.checkpoint_tree()))
    ckpt.close()


def test_keeps_last_n_and_every_kth(tmp_path, micro):
    state = _state(micro())
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, keep_every=4, async_save=False)
    for step in range(1, 10):
        ckpt.save(step, state.checkpoint_tree(), {})
    ckpt.wait()
    assert sorted(ckpt.manager.all_steps()) == [4, 8, 9]
    ckpt.close()


def test_different_model_is_reported(tmp_path, micro):
    config = micro()
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, _state(config).checkpoint_tree(), {})
    ckpt.wait()
    config.model.base_channels = 16
    with pytest.raises(CheckpointMismatchError, match="written by a different model: .* differ in shape"):
        ckpt.restore(jax.device_get(_state(config).checkpoint_tree()))
    ckpt.close()


def test_config_changes_are_listed(tmp_path):
    save_config(str(tmp_path), {"a": 1, "b": {"c": 2, "d": [1, 2]}})
    assert config_changes(saved_config(str(tmp_path)), {"a": 1, "b": {"c": 3, "d": (1, 2)}}) == ["b.c: 2 -> 3"]
    assert config_changes(saved_config(str(tmp_path / "none")), {"a": 1}) == []


# --- damaged checkpoints ------------------------------------------------------------------------


def _tree(v):
    return {"step": np.array(v, np.int32),
            "params": {"w": np.arange(1000, dtype=np.float32).reshape(10, 100) * v, "b": np.full(7, v, np.float32)}}


def _three_steps(directory):
    ckpt = Checkpointer(str(directory), async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, _tree(step), {"iterator": {"next_index": step}})
    ckpt.close()
    return directory / "3"


def _files(step_dir):
    paths = [p for p in step_dir.rglob("*") if p.is_file()]
    return sorted(paths, key=lambda p: -p.stat().st_size)


def _truncate_largest(step_dir):
    path = _files(step_dir)[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(step_dir):
    path = next(p for p in _files(step_dir) if p.parent.name == "d")  # an array chunk
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(name):
    def damage(step_dir):
        path = step_dir / name
        path.write_bytes(path.read_bytes()[:5])
    return damage


def _half_written_copy(step_dir):
    """A step 4 directory with its metadata but without its array files."""
    shutil.copytree(step_dir, step_dir.parent / "4")
    for path in (step_dir.parent / "4").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.unlink()


def _empty_step(step_dir):
    (step_dir.parent / "4").mkdir()


# Orbax's asyncio loop, closed after a failed read, drops a late callback: noise from inside orbax.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage, why", [
    (_truncate_largest, "can't be read"),
    (_flip_a_byte, "differ from what was saved"),
    (_truncate("state/_METADATA"), "no readable metadata"),
    (_truncate("data/metadata"), "can't be read"),
    (_half_written_copy, "no readable metadata"),
    (_empty_step, "no readable metadata"),
])
def test_damaged_latest_checkpoint_is_skipped(tmp_path, caplog, damage, why):
    directory = tmp_path / "checkpoints"
    damage(_three_steps(directory))
    bad = max(int(d) for d in os.listdir(directory))
    ckpt = Checkpointer(str(directory))
    with caplog.at_level(logging.WARNING, logger="vdm_jax.training.checkpoint"):
        step, tree, data = ckpt.restore_latest(_tree(0))
    good = 3 if bad == 4 else 2
    assert step == good and data == {"iterator": {"next_index": good}}
    np.testing.assert_array_equal(tree["params"]["w"], _tree(good)["params"]["w"])
    warning = next(r.getMessage() for r in caplog.records if "corrupt" in r.getMessage())
    assert f"{directory / str(bad)}" in warning and why in warning
    # Set aside, not deleted; the good steps stay; the step can be written again.
    assert ckpt.all_steps() == list(range(1, good + 1))
    assert os.listdir(tmp_path / "checkpoints_corrupt") == [str(bad)]
    ckpt.save(bad, _tree(bad), {})
    ckpt.wait()
    assert ckpt.all_steps()[-1] == bad
    ckpt.close()


def test_read_only_skips_without_moving(tmp_path):
    directory = tmp_path / "checkpoints"
    _truncate_largest(_three_steps(directory))
    ckpt = Checkpointer(str(directory), read_only=True)
    assert ckpt.restore_latest(_tree(0))[0] == 2
    with pytest.raises(CorruptCheckpointError, match=r"checkpoints/3 can't be read"):
        ckpt.restore(_tree(0), 3)
    ckpt.close()
    assert sorted(os.listdir(directory), key=str) == ["1", "2", "3"] and not (tmp_path / "checkpoints_corrupt").exists()


def test_no_intact_checkpoint_is_an_error(tmp_path):
    directory = tmp_path / "checkpoints"
    _three_steps(directory)
    for step in ("1", "2", "3"):
        _truncate("state/_METADATA")(directory / step)
    ckpt = Checkpointer(str(directory))
    with pytest.raises(CorruptCheckpointError, match=r"no checkpoint in .* can be restored: .*3 has no readable "
                                                     r".*Nothing was moved or deleted"):
        ckpt.restore_latest(_tree(0))
    ckpt.close()
    assert sorted(os.listdir(directory)) == ["1", "2", "3"]


def test_temporary_directories_of_killed_saves_are_removed(tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(_three_steps(directory), directory / "4.orbax-checkpoint-tmp-1234")
    ckpt = Checkpointer(str(directory))
    assert ckpt.restore_latest(_tree(0))[0] == 3
    ckpt.close()
    assert sorted(os.listdir(directory)) == ["1", "2", "3"]


def test_checkpoints_are_arrays_and_json_only(tmp_path, monkeypatch):
    """No file is a pickle, and restoring works with unpickling made impossible."""
    directory = tmp_path / "checkpoints"
    _three_steps(directory)
    for path in directory.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert not (len(head) == 2 and head[0] == 0x80 and head[1] <= 5), f"{path} looks like a pickle"

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint must not be unpickled")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    ckpt = Checkpointer(str(directory), read_only=True)
    step, tree, _ = ckpt.restore_latest(_tree(0))
    ckpt.close()
    assert step == 3 and int(tree["step"]) == 3


def _big_tree(v):
    """400 kB that don't compress (orbax may compress its chunks), `w[0]` = v."""
    w = np.random.default_rng(v).standard_normal(100_000).astype(np.float32)
    return {"step": np.array(v, np.int32), "params": {"w": np.concatenate([[v], w[1:]]).astype(np.float32)}}


def _full_disk_error(directory, step, last):
    return (f"could not save the checkpoint at step {step} in {directory}: no space left on device. Training "
            f"stopped; the last complete checkpoint is step {last}; rerun to resume from it once there is space (or "
            "with a --workdir on another disk).")


def test_a_write_that_fills_the_disk_is_one_error_naming_the_step_and_the_last_good_one(small_disk, monkeypatch,
                                                                                       capfd, caplog):
    """The disk fills while orbax writes in the background: the next wait (or save) raises
    CheckpointWriteError (an OSError, ENOSPC); the step's partial files are removed; the steps
    before it still restore; nothing of orbax's threads reaches standard error or the logs."""
    unraisable = []  # what reaches the hook that prints unraisable exceptions (pytest's, here)
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(repr(u.exc_value)))
    directory = small_disk("1m") / "checkpoints"  # room for two of `_big_tree`'s checkpoints, not three
    ckpt = Checkpointer(str(directory))
    ckpt.save(1, _big_tree(1), {})
    ckpt.save(2, _big_tree(2), {})
    monkeypatch.setattr(Checkpointer, "_check_space", lambda *args: None)  # (so that the write itself fails)
    ckpt.save(3, _big_tree(3), {})
    with caplog.at_level(logging.DEBUG, logger="absl"), pytest.raises(CheckpointWriteError) as failed:
        ckpt.wait()
    assert isinstance(failed.value, OSError) and failed.value.errno == errno.ENOSPC
    assert (failed.value.step, failed.value.last_step) == (3, 2)
    assert str(failed.value) == _full_disk_error(directory, 3, 2)
    assert "No space left on device" in str(failed.value.__cause__)  # (the cause is kept, for a traceback)
    ckpt.close()
    time.sleep(0.5)  # (the writes' late callbacks)
    assert sorted(os.listdir(directory)) == ["1", "2"]  # the partial step 3 is gone: its space is free again
    assert not unraisable, unraisable[:3]
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Traceback" not in err, err[-3000:]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    ckpt = Checkpointer(str(directory), read_only=True)
    step, tree, _ = ckpt.restore_latest(_big_tree(0))
    np.testing.assert_array_equal(tree["params"]["w"], _big_tree(2)["params"]["w"])
    assert step == 2
    ckpt.close()


def test_asyncio_reports_of_orbax_writes_left_failing_are_dropped_and_others_kept(tmp_path, caplog):
    """A failed save's other writes end as tasks whose exception no one retrieves; asyncio logs each
    (hundreds of tracebacks after the one-line CheckpointWriteError). Those from orbax are dropped."""
    Checkpointer(str(tmp_path / "checkpoints")).close()  # (installs the filters, once per process)
    orbax = os.path.join(os.sep, "venv", "orbax", "checkpoint", "type_handlers.py")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: <Task finished coro=<"
                                           "NumpyHandler._open_and_write() done, defined at %s:114>>", orbax)
        logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: <Task finished coro=<mine()>>")
    assert [r.getMessage()[-20:] for r in caplog.records] == ["finished coro=<mine()>>"[-20:]]


def test_a_save_larger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    """Where the disk has less free space than the arrays need, nothing of the step is written."""
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(str(directory))
    ckpt.save(1, _big_tree(1), {})
    ckpt.wait()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=399_999))
    with pytest.raises(CheckpointWriteError) as refused:
        ckpt.save(2, _big_tree(2), {})
    assert refused.value.errno == errno.ENOSPC and str(refused.value) == _full_disk_error(directory, 2, 1)
    assert "needs 0.4 MiB, 0.4 MiB are free" in str(refused.value.__cause__)
    ckpt.close()
    assert os.listdir(directory) == ["1"]
