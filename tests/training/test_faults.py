"""Non-finite steps: never applied; 'stop' freezes and raises naming the step and the terms, 'skip'
drops and counts them. Checked on the pure step and through the whole loop."""
import json
import os

import numpy as np
import jax
import pytest

from vdm_jax.training import (Checkpointer, NonFiniteError, create_train_state, faults, parallel,
                              train_and_evaluate, validate_config)
from vdm_jax.training.loop import compiled_steps


def _state(config):
    return create_train_state(config, validate_config(config), key=jax.random.key(0))


def _batch(seed=0):
    return {"image": np.random.default_rng(seed).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)}


def _poison(state, value=np.nan):
    """The state with one bias of the model set to `value`: every loss and gradient goes non-finite."""
    params = jax.tree.map(np.array, state.params)  # a copy: `state` keeps its values
    bias = params["model"]["conv_out"]["bias"]
    bias[...] = np.full_like(bias[...], value)
    return state.replace(params=params)


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("where, value", [(None, 0.0), ((2, 5), np.nan), ((0, 0), np.inf), ((3, 11), -np.inf)])
def test_inspect_names_the_first_non_finite_gradient_array(where, value):
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(2, 3)), "b": rng.normal(size=(4,)), "c": rng.normal(size=(3, 3)),
             "d": rng.normal(size=(2, 2, 3))}
    grads = {k: v.astype(np.float32) for k, v in grads.items()}
    leaves = [grads[k] for k in sorted(grads)]
    if where is not None:
        leaf, element = where
        leaves[leaf].reshape(-1)[element] = value
        leaves[-1].reshape(-1)[0] = np.nan  # a later array too: the first one is named
    terms = {"diffusion": np.ones(4, np.float32), "prior": np.array([1.0, np.inf, 0.0, 1.0], np.float32)}
    report = jax.jit(faults.inspect)(np.float32(1.0), terms, grads)
    # The batch means the host reads to name the bad terms: here only the prior's is not finite.
    values = {k: float(v) for k, v in report["values"].items()}
    assert values["loss"] == 1.0 and values["diffusion"] == 1.0 and values["prior"] == np.inf
    assert not bool(report["ok"])
    if where is None:
        assert int(report["grad_leaf"]) == -1
        norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in leaves))
        np.testing.assert_allclose(float(report["grad_norm"]), norm, rtol=1e-6)
        clean = jax.jit(faults.inspect)(np.float32(1.0), {"diffusion": terms["diffusion"]}, grads)
        assert bool(clean["ok"]) and int(clean["grad_leaf"]) == -1
    else:
        assert int(report["grad_leaf"]) == where[0]
        assert not np.isfinite(float(report["grad_norm"]))


@pytest.fixture(scope="session")  # (not module: the long tests run first, apart from the module's others)
def run_step():
    """state (host) -> (state, metrics) (host) after one step, compiled exactly as the loop compiles it
    (so the compilation cache serves these tests and the loop's alike)."""
    mesh = parallel.make_mesh()
    one, many = compiled_steps(mesh)

    def run(state, seed=0, k=1):
        if k == 1:
            batch = parallel.global_batch(_batch(seed), mesh)
            out = one(parallel.replicate(state, mesh), batch, jax.random.key(1))
        else:
            stacked = {"image": np.stack([_batch(seed + i)["image"] for i in range(k)])}
            out = many(parallel.replicate(state, mesh), parallel.global_batch(stacked, mesh, 1), jax.random.key(1))
        return jax.device_get(out)

    return run


def test_stop_freezes_at_the_first_bad_step_and_names_it(micro_run, run_step):
    good, _ = run_step(jax.device_get(_state(micro_run())))  # one good step: step 1
    bad = _poison(good)
    after, metrics = run_step(bad, 1)
    assert int(after.step) == 1 and float(metrics["finite"]) == 0.0
    _same(after.params, bad.params)
    _same(after.ema_params, bad.ema_params)
    _same(after.opt_state, bad.opt_state)
    record = after.faults
    assert int(record["step"]) == 1 and int(record["grad_leaf"]) >= 0
    # Frozen: a later step, even a finite one, changes nothing and keeps the first record.
    again, _ = run_step(after.replace(params=good.params), 2)
    assert int(again.step) == 1
    _same(again.params, good.params)
    assert int(again.faults["step"]) == 1
    text = faults.describe(record, after.params)
    assert text.startswith("step 2 (the update from step 1): non-finite loss terms loss, simple")
    assert "the first non-finite gradient is model/" in text
    with pytest.raises(NonFiniteError, match=r"training stopped at step 2 \(the update from step 1\)"):
        faults.check(record, after.params, "stop", 100)


def _skipping(micro_run):
    config = micro_run()
    config.training.on_nonfinite = "skip"
    return config


def test_skip_drops_bad_steps_counts_them_and_goes_on(micro_run, run_step):
    good = jax.device_get(_state(_skipping(micro_run)))
    bad = _poison(good, np.inf)
    after, metrics = run_step(bad, 0)
    assert int(after.step) == 1 and float(metrics["skipped_steps"]) == 1.0
    _same(after.params, bad.params)
    _same(after.opt_state, bad.opt_state)
    after, _ = run_step(after, 1)
    record = after.faults
    assert (int(after.step), int(record["skipped"]), int(record["consecutive"]), int(record["step"])) == (2, 2, 2, 1)
    with pytest.raises(NonFiniteError, match=r"after 2 non-finite steps in a row \(training.max_consecutive_skips=2\)"):
        faults.check(record, after.params, "skip", 2)
    faults.check(record, after.params, "skip", 3)  # under the limit: goes on
    # A finite step applies again and resets the run of bad ones (the total stays).
    healed, metrics = run_step(after.replace(params=good.params), 2)
    record = healed.faults
    assert int(healed.step) == 3 and float(metrics["finite"]) == 1.0
    assert (int(record["skipped"]), int(record["consecutive"])) == (2, 0)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(healed.params), jax.tree.leaves(good.params)))


def test_steps_per_call_average_only_finite_steps(micro_run, run_step):
    state, metrics = run_step(_poison(jax.device_get(_state(_skipping(micro_run)))), 0, k=2)
    assert int(state.step) == 2 and float(metrics["skipped_steps"]) == 2.0 and float(metrics["finite"]) == 0.0
    assert np.isnan(metrics["loss"])


def _resume_poisoned(workdir, config):
    """Trains `config` in `workdir` from a checkpoint at step 0 whose parameters give NaN."""
    state = _poison(_state(config))
    ckpt = Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(0, state.checkpoint_tree(), {})
    ckpt.close()
    return train_and_evaluate(config, str(workdir))


@pytest.mark.slow(6)
def test_loop_stops_on_a_non_finite_step_and_keeps_the_last_good_checkpoint(tmp_path, micro_run):
    with pytest.raises(NonFiniteError) as info:
        _resume_poisoned(tmp_path, micro_run())
    message = str(info.value)
    assert "training stopped at step 1 (the update from step 0): non-finite loss terms loss, simple" in message
    assert f"The last checkpoint is step 0 in {tmp_path / 'checkpoints'}" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0"]
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # nothing logged from the bad step on


@pytest.mark.slow(5)
def test_loop_skips_non_finite_steps_and_logs_the_count(tmp_path, micro_run):
    config = _skipping(micro_run)
    config.training.max_consecutive_skips = 4
    with pytest.raises(NonFiniteError, match=r"after 4 non-finite steps in a row"):
        _resume_poisoned(tmp_path, config)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["0", "3"]  # skipped steps are saved as usual
