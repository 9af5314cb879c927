"""Non-finite steps: never applied; 'stop' freezes and raises naming the step and the terms, 'skip'
drops and counts them. Checked on the pure step and through the whole loop."""
import json
import os

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from vdm_jax.training import (Checkpointer, NonFiniteError, create_train_state, faults, steps, train_and_evaluate,
                              validate_config)


def _state(config):
    return create_train_state(config, validate_config(config), jax.random.key(0))


def _batch(seed=0):
    return {"image": np.random.default_rng(seed).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)}


def _poison(state, value=np.nan):
    """The state with one bias of the model set to `value`: every loss and gradient goes non-finite."""
    params = jax.tree.map(lambda x: x, state.params)  # a copy: `state` keeps its values
    bias = params["model"]["conv_out"]["bias"]
    bias[...] = jnp.full_like(bias[...], value)
    return state.replace(params=params)


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def step_fn():
    return jax.jit(steps.train_step)


def test_stop_freezes_at_the_first_bad_step_and_names_it(micro, step_fn):
    good = _state(micro())
    good, _ = step_fn(good, _batch(0), jax.random.key(1))  # one good step: step 1
    bad = _poison(good)
    after, metrics = step_fn(bad, _batch(1), jax.random.key(1))
    assert int(after.step) == 1 and float(metrics["finite"]) == 0.0
    _same(after.params, bad.params)
    _same(after.ema_params, bad.ema_params)
    _same(after.opt_state, bad.opt_state)
    record = jax.device_get(after.faults)
    assert int(record["step"]) == 1 and int(record["grad_leaf"]) >= 0
    # Frozen: a later step, even a finite one, changes nothing and keeps the first record.
    healed = after.replace(params=good.params)
    again, _ = step_fn(healed, _batch(2), jax.random.key(1))
    assert int(again.step) == 1
    _same(again.params, good.params)
    assert int(again.faults["step"]) == 1
    text = steps.explain_fault(after)
    assert text.startswith("step 2 (the update from step 1): non-finite loss terms loss, simple")
    assert "the first non-finite gradient is model/" in text
    with pytest.raises(NonFiniteError, match=r"training stopped at step 2 \(the update from step 1\)"):
        faults.check(record, "stop", 100, lambda: steps.explain_fault(after))


def test_skip_drops_bad_steps_counts_them_and_goes_on(micro, step_fn):
    config = micro()
    config.training.on_nonfinite = "skip"
    good = _state(config)
    bad = _poison(good, np.inf)
    after, metrics = step_fn(bad, _batch(0), jax.random.key(1))
    assert int(after.step) == 1 and float(metrics["skipped_steps"]) == 1.0
    _same(after.params, bad.params)
    _same(after.opt_state, bad.opt_state)
    after, _ = step_fn(after, _batch(1), jax.random.key(1))
    record = jax.device_get(after.faults)
    assert (int(after.step), int(record["skipped"]), int(record["consecutive"]), int(record["step"])) == (2, 2, 2, 1)
    with pytest.raises(NonFiniteError, match=r"after 2 non-finite steps in a row \(training.max_consecutive_skips=2\)"):
        faults.check(record, "skip", 2, lambda: steps.explain_fault(after))
    faults.check(record, "skip", 3, lambda: "")  # under the limit: goes on
    # A finite step applies again and resets the run of bad ones (the total stays).
    healed, metrics = step_fn(after.replace(params=good.params), _batch(2), jax.random.key(1))
    record = jax.device_get(healed.faults)
    assert int(healed.step) == 3 and float(metrics["finite"]) == 1.0
    assert (int(record["skipped"]), int(record["consecutive"])) == (2, 0)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(jax.device_get(healed.params)), jax.tree.leaves(jax.device_get(good.params))))


def test_steps_per_call_average_only_finite_steps(micro):
    config = micro()
    config.training.on_nonfinite = "skip"
    state = _poison(_state(config))
    batches = {"image": np.stack([_batch(i)["image"] for i in range(2)])}
    state, metrics = jax.jit(steps.train_steps)(state, batches, jax.random.key(0))
    assert int(state.step) == 2 and float(metrics["skipped_steps"]) == 2.0 and float(metrics["finite"]) == 0.0
    assert np.isnan(metrics["loss"])


def _resume_poisoned(workdir, config):
    """Trains `config` in `workdir` from a checkpoint at step 0 whose parameters give NaN."""
    state = _poison(_state(config))
    ckpt = Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(0, state.checkpoint_tree(), {})
    ckpt.close()
    return train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_loop_stops_on_a_non_finite_step_and_keeps_the_last_good_checkpoint(tmp_path, micro_run):
    with pytest.raises(NonFiniteError) as info:
        _resume_poisoned(tmp_path, micro_run())
    message = str(info.value)
    assert "training stopped at step 1 (the update from step 0): non-finite loss terms loss, simple" in message
    assert f"The last checkpoint is step 0 in {tmp_path / 'checkpoints'}" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0"]
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # nothing logged from the bad step on


@pytest.mark.slow
def test_loop_skips_non_finite_steps_and_logs_the_count(tmp_path, micro_run):
    config = micro_run()
    config.training.on_nonfinite = "skip"
    config.training.max_consecutive_skips = 4
    with pytest.raises(NonFiniteError, match=r"after 4 non-finite steps in a row"):
        _resume_poisoned(tmp_path, config)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["0", "3"]  # skipped steps are saved as usual
