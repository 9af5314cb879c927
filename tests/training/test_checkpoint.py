"""Orbax checkpoints: exact round trip, restore into a target, mismatch and config reports."""
import numpy as np
import jax
import pytest

from vdm_jax.training import Checkpointer, CheckpointMismatchError, create_train_state, validate_config
from vdm_jax.training.checkpoint import config_changes, save_config


def _state(config, seed=0):
    return create_train_state(config, validate_config(config), jax.random.key(seed))


@pytest.mark.parametrize("schedule", ["linear", "learned"])
def test_round_trip_is_exact(tmp_path, micro, schedule):
    config = micro(family="vdm", timesteps=0, schedule=schedule)
    state = _state(config)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(3, state.checkpoint_tree(), {"iterator": {"next_index": 5}})
    ckpt.wait()
    target = _state(config, seed=1)  # different values, same structure
    tree, data = ckpt.restore(jax.device_get(target.checkpoint_tree()))
    assert data == {"iterator": {"next_index": 5}}
    restored = target.replace_from_checkpoint(tree)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    for a, b in zip(jax.tree.leaves(restored.checkpoint_tree()), jax.tree.leaves(state.checkpoint_tree())):
        np.testing.assert_array_equal(a, b)
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
    assert config_changes(str(tmp_path), {"a": 1, "b": {"c": 3, "d": (1, 2)}}) == ["b.c: 2 -> 3"]
    assert config_changes(str(tmp_path / "none"), {"a": 1}) == []
