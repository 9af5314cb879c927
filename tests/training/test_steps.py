"""Pure train/eval/sample steps: every objective, data parallelism, no recompilation."""
import functools

import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from vdm_jax.training import create_train_state, parallel, steps, validate_config
from vdm_jax.training.loop import compiled_steps


def _state(config, seed=0):
    return create_train_state(config, validate_config(config), key=jax.random.key(seed))


def _batch(n, size=8, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)}


def train_step(state, batch, key):  # positional, for jit's in_shardings (named as in loop.compiled_steps)
    return steps.train_step(state, batch, key=key)


def _compiled(mesh, fn=train_step, leading=0):
    rep = parallel.replicated(mesh)
    return jax.jit(fn, in_shardings=(rep, parallel.batch_sharding(mesh, leading), rep),
                   out_shardings=(rep, rep), donate_argnums=0)


def _run(config, mesh, batch, n_steps=1):
    state = parallel.replicate(_state(config), mesh)
    step, _ = compiled_steps(mesh)  # the loop's own program (which the resume and fault tests compile too)
    for _ in range(n_steps):
        state, metrics = step(state, parallel.global_batch(batch, mesh), jax.random.key(7))
    return jax.device_get(state.params), jax.device_get(metrics)


def test_the_compiled_step_updates_the_donated_state_in_place(micro_run):
    """No array of the donated state (parameters, EMA, optimiser state) is copied whole in the loop's
    compiled step: XLA updates each in its own buffer. (A select per array in place of the step's
    `lax.cond` made XLA:CPU copy 192 of the micro model's state arrays: docs/benchmarks.md, "The update".)"""
    from benchmarks.common import copies

    x = jnp.arange(6.0)
    duplicated = copies(jax.jit(lambda x: (2 * x, x), donate_argnums=0).lower(x).compile())
    assert duplicated["whole_argument"] == 1  # (the output x must be a buffer of its own: a copy)
    mesh = parallel.make_mesh(jax.devices()[:1])  # the program test_eight_devices_equal_one_device runs
    state = parallel.replicate(_state(micro_run("ddpm")), mesh)
    step, _ = compiled_steps(mesh)
    found = copies(step.lower(state, parallel.global_batch(_batch(16), mesh), jax.random.key(7)).compile())
    assert found["copies"] > 0 and found["whole_argument"] == 0, found


@pytest.mark.parametrize("family", ["ddpm", "vdm"])
def test_eight_devices_equal_one_device(micro_run, family):
    """Acceptance 2: two steps on 8 fake devices = the same steps on 1 device, with dropout and (vdm)
    a learned schedule: the micro run's config, so the 8-device program is the loop's (which the
    resume and fault tests compile too: the compilation cache serves them). Two steps: the vdm
    run's warm-up starts at learning rate 0."""
    assert jax.device_count() == 8
    config = micro_run(family)
    assert config.model.dropout > 0  # dropout keys must not depend on the sharding either
    batch = _batch(16)
    params8, metrics8 = _run(config, parallel.make_mesh(), batch, n_steps=2)
    params1, metrics1 = _run(config, parallel.make_mesh(jax.devices()[:1]), batch, n_steps=2)
    np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics8["grad_norm"], metrics1["grad_norm"], rtol=1e-4)
    initial = jax.device_get(_state(config).params)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(initial)))
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_step_compiles_once_and_is_reproducible(micro_run):
    """(The micro run's config: the step compiles to the loop's program, which the compilation cache has.)"""
    config = micro_run()
    mesh = parallel.make_mesh()
    rep = parallel.replicated(mesh)
    traced = chex.assert_max_traces(train_step, n=1)
    step = jax.jit(traced, in_shardings=(rep, parallel.batch_sharding(mesh), rep), out_shardings=(rep, rep),
                   donate_argnums=0)
    losses = []
    for run in range(2):
        state = parallel.replicate(_state(config), mesh)
        for i in range(3):
            state, metrics = step(state, parallel.global_batch(_batch(16, seed=i), mesh), jax.random.key(1))
            losses.append(float(metrics["loss"]))
    assert int(state.step) == 3
    assert losses[:3] == losses[3:]  # same seed, same data: bitwise the same losses
    assert len(set(losses[:3])) == 3


@pytest.mark.parametrize("unroll", [None, False])
def test_several_steps_per_call_equal_single_steps(micro, unroll):
    """Both ways of running k steps per call: unrolled (the CPU default) and the scanned loop."""
    config = micro()
    mesh = parallel.make_mesh()
    batches = [_batch(16, seed=i) for i in range(2)]
    state = parallel.replicate(_state(config), mesh)
    one = _compiled(mesh)
    for b in batches:
        state, _ = one(state, parallel.global_batch(b, mesh), jax.random.key(3))
    state2 = parallel.replicate(_state(config), mesh)
    stacked = {"image": np.stack([b["image"] for b in batches])}
    def train_steps(state, batches, key):
        return steps.train_steps(state, batches, key=key, unroll=unroll)

    many = _compiled(mesh, train_steps, leading=1)
    args = (state2, parallel.global_batch(stacked, mesh, leading_axes=1), jax.random.key(3))
    state2, metrics = many(*args)
    assert int(state2.step) == 2
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(state2.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_several_steps_per_call_unroll_on_cpu(micro):
    """On a CPU `train_steps` unrolls its steps by default: XLA:CPU's convolution gradients are
    slow inside a loop body (the scanned step measured 13× slower; jax-ml/jax#12868)."""
    config = micro()
    state = _state(config)
    batches = {"image": np.stack([_batch(16, seed=i)["image"] for i in range(2)])}

    def loops(unroll):  # while loops in the lowered program (the PRNG has some of its own)
        fn = jax.jit(functools.partial(steps.train_steps, unroll=unroll))
        return fn.lower(state, batches, key=jax.random.key(0)).as_text().count("stablehlo.while")

    assert jax.default_backend() == "cpu"
    assert loops(None) == loops(True) < loops(False)


@pytest.mark.parametrize("diffusion", [
    dict(loss="simple"),
    dict(loss="vlb", variance="beta", schedule="cosine"),
    dict(loss="hybrid", variance="learned"),
    dict(loss="vlb", variance="learned"),
    dict(family="vdm", timesteps=0, schedule="linear"),
    dict(family="vdm", timesteps=10, schedule="cosine"),
    dict(family="vdm", timesteps=0, schedule="learned", variance_minimisation=False),
])
def test_every_objective_trains(micro, diffusion):
    config = micro(**diffusion)
    if diffusion.get("variance") == "learned":
        config.model.learned_variance = True
    state = _state(config)
    before = jax.device_get(state.params)
    step = jax.jit(steps.train_step)
    state, metrics = step(state, _batch(16), key=jax.random.key(0))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)))]
    assert any(moved)
    if diffusion.get("schedule") == "learned":
        sched_before = jax.tree.leaves(before["schedule"])
        sched_after = jax.tree.leaves(jax.device_get(state.params["schedule"]))
        assert any(not np.allclose(a, b) for a, b in zip(sched_before, sched_after))


def test_hybrid_trains_the_variance_through_the_vlb_only(micro):
    """With L_hybrid the variance channels get gradient only from λ·L_vlb (the mean is under
    stop_gradient there); with λ = 0 they get none."""
    def v_channel_grads(lam):
        config = micro(loss="hybrid", variance="learned", hybrid_lambda=lam)
        config.model.learned_variance = True
        state = _state(config)
        _, terms, grads = jax.jit(steps._grads)(state, _batch(16), jax.random.key(0))
        kernel = grads["model"]["conv_out"]["kernel"][...]  # [3, 3, in, 2C]: ε channels, then v
        return terms, np.abs(np.asarray(kernel)[..., 1:]).max(), np.abs(np.asarray(kernel)[..., :1]).max()

    terms, v_grad, eps_grad = v_channel_grads(0.001)
    assert "vlb_t" in terms and "simple" in terms
    assert v_grad > 0 and eps_grad > 0
    _, v_grad0, eps_grad0 = v_channel_grads(0.0)
    assert v_grad0 == 0.0 and eps_grad0 > 0


@pytest.mark.parametrize("full_vlb", [False, True])
def test_eval_step_terms(micro, full_vlb):
    config = micro(timesteps=10)
    state = _state(config)
    out = jax.jit(lambda s, b, k: steps.eval_step(s, b, key=k, draws=3, full_vlb=full_vlb))(
        state, _batch(16), jax.random.key(0))
    np.testing.assert_allclose(out["total"], out["prior"] + out["diffusion"] + out["reconstruction"], rtol=1e-5)
    assert out["total"].shape == (16,) and np.all(np.isfinite(out["total"])) and np.all(out["total"] > 0)
    if full_vlb:
        assert out["per_t"].shape == (16, 10)
        np.testing.assert_allclose(out["per_t"][:, 0], out["reconstruction"], rtol=1e-6)
        np.testing.assert_allclose(out["per_t"][:, 1:].sum(axis=1), out["diffusion"], rtol=1e-5)
    with pytest.raises(ValueError, match="draws must be a positive int"):
        steps.eval_step(state, _batch(16), key=jax.random.key(0), draws=0)


@pytest.mark.parametrize("family,sampler", [("ddpm", "ancestral"), ("ddpm", "ddim"), ("vdm", "ancestral"), ("vdm", "ddim"),
                                            ("ddpm", "dpm_solver"), ("vdm", "heun")])
def test_sample_step(micro, family, sampler):
    config = micro(family=family, timesteps=0 if family == "vdm" else 20)
    state = _state(config)
    sample_steps = 0 if (family, sampler) == ("ddpm", "ancestral") else 5  # (a DDPM's ancestral chain: all T)
    out = jax.jit(lambda s, k: steps.sample_step(s, key=k, num=4, sampler=sampler, sample_steps=sample_steps))(
        state, jax.random.key(0))
    assert out.shape == (4, 8, 8, 1) and out.dtype == jnp.uint8
