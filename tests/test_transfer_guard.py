"""No public core function reads a device array back to the host (issue 14, convention 8).

Every public function runs eagerly on `jax.device_put` inputs under the `no_host_reads` fixture
(tests/conftest.py): the transfer guard, plus NumPy conversions and the array type's scalar
conversions made to raise, since on CPU the guard never fires. Each call's result is checked
to hold no NaN once the guard has ended.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import vdm_jax as vj

B = 2
KEY = jax.random.key(0)


def _put(a):
    return jax.device_put(jnp.asarray(a))


def test_the_fixture_catches_host_reads(no_host_reads):
    a = _put(jnp.ones((2, 2)))
    with no_host_reads():
        assert (a + 1).shape == (2, 2)  # computing on the device is fine
    for read in (lambda: np.asarray(a), lambda: np.array(a), lambda: np.asanyarray(a), lambda: float(a[0, 0]),
                 lambda: int(a[0, 0]), lambda: bool(a[0, 0]), lambda: a.tolist(), lambda: a[0, 0].item(),
                 lambda: range(10)[a[0, 0].astype(jnp.int32)], lambda: np.asarray([a[0], a[1]])):
        with no_host_reads(), pytest.raises(AssertionError, match="device-to-host read"):
            read()
    assert float(a[0, 0]) == 1.0 and np.asarray(a).tolist() == [[1.0, 1.0], [1.0, 1.0]]  # restored


def _data(shape=(B, 4, 4, 1)):
    k1, k2, k3 = jax.random.split(KEY, 3)
    x = _put(vj.pixels_to_data(jax.random.randint(k1, shape, 0, 256)))
    return x, _put(jax.random.normal(k2, shape)), _put(jax.random.normal(k3, shape))


def _pred(z, t):
    return 0.1 * z


def _learned_pred(z, t):
    return 0.1 * z, jnp.full_like(z, 0.5)


def _core_calls():
    """(name, thunk) for every public core function, on device arrays."""
    x, eps, eps_hat = _data()
    sched = vj.DiscreteSchedule(vj.linear_betas(8, 1e-3, 0.2))
    cont = vj.LinearSchedule()
    t, gs, gt = _put(jnp.array([0.25, 0.75])), _put(jnp.array([-2.0, 0.5])), _put(jnp.array([-1.0, 1.5]))
    z = vj.q_sample(x, eps, gt)
    x_vdm = vj.pixels_to_data(_put(jnp.full((B, 4, 4, 1), 7, jnp.int32)), grid="vdm")
    v = _put(jnp.full(x.shape, 0.3))
    steps = _put(jnp.array([1, 5], jnp.int32))
    return [
        ("alpha_sigma", lambda: vj.alpha_sigma(gt)),
        ("snr", lambda: vj.snr(gt)),
        ("DiscreteSchedule", lambda: vj.DiscreteSchedule(_put(jnp.full((5,), 0.1))).gammas),
        ("DiscreteSchedule.from_alpha_bars", lambda: vj.DiscreteSchedule.from_alpha_bars(sched.alpha_bars).betas),
        ("DiscreteSchedule.__call__", lambda: sched(t)),
        ("DiscreteSchedule.gamma", lambda: sched.gamma(t)),
        ("DiscreteSchedule.gamma_step", lambda: sched.gamma_step(steps)),
        ("LinearSchedule", lambda: cont(t)),
        ("CosineSchedule", lambda: vj.CosineSchedule().gamma(t)),
        ("LearnedSchedule", lambda: vj.LearnedSchedule(hidden=4, rngs=nnx.Rngs(0))(t)),
        ("LearnedLinearSchedule", lambda: vj.LearnedLinearSchedule()(t)),
        ("per_example", lambda: vj.per_example(gt, x)),
        ("q_sample", lambda: vj.q_sample(x, eps, gt)),
        ("q_step", lambda: vj.q_step(x, eps, _put(jnp.array([0.1, 0.2])))),
        ("q_posterior", lambda: vj.q_posterior(x, z, gs, gt)),
        ("x_from_eps", lambda: vj.x_from_eps(z, eps, gt)),
        ("eps_from_x", lambda: vj.eps_from_x(z, x, gt)),
        ("score_from_eps", lambda: vj.score_from_eps(eps, gt)),
        ("eps_from_score", lambda: vj.eps_from_score(eps, gt)),
        ("v_from_eps", lambda: vj.v_from_eps(z, eps, gt)),
        ("eps_from_v", lambda: vj.eps_from_v(z, eps, gt)),
        ("x_from_v", lambda: vj.x_from_v(z, eps, gt)),
        *[(f"eps_and_x[{k}]", lambda k=k: vj.eps_and_x(eps_hat, z, gt, kind=k)) for k in vj.PREDICTIONS],
        *[(f"prediction_target[{k}]", lambda k=k: vj.prediction_target(x, eps, gt, kind=k)) for k in vj.PREDICTIONS],
        ("pixels_to_data", lambda: vj.pixels_to_data(_put(jnp.array([[0, 255]])), grid="vdm")),
        ("data_to_pixels", lambda: vj.data_to_pixels(x)),
        ("x0_matching", lambda: vj.x0_matching(eps_hat, x, gs, gt)),
        ("eps_matching", lambda: vj.eps_matching(eps_hat, eps, gs, gt)),
        ("score_matching", lambda: vj.score_matching(eps_hat, eps, gs, gt)),
        *[(f"reverse_log_variance[{k}]", lambda k=k: vj.reverse_log_variance(gs, gt, kind=k, v=v))
          for k in ("posterior", "beta", "learned")],
        ("normal_kl", lambda: vj.normal_kl(x, gs[0], eps, gt[0])),
        ("denoising_kl", lambda: vj.denoising_kl(eps_hat, x, z, gs, gt, gt)),
        ("vlb_term", lambda: vj.vlb_term(eps_hat, x, z, _put(jnp.array([-jnp.inf, 0.5])), gt, gt)),
        ("simple_loss", lambda: vj.simple_loss(eps_hat, eps)),
        ("hybrid_loss", lambda: vj.hybrid_loss(eps_hat, eps, gt, T=8)),
        ("prior_loss", lambda: vj.prior_loss(x, gt)),
        ("ddpm_decoder_nll", lambda: vj.ddpm_decoder_nll(eps_hat, x, gs)),
        ("vdm_decoder_nll", lambda: vj.vdm_decoder_nll(z, x_vdm, gs)),
        ("gaussian_decoder_nll", lambda: vj.gaussian_decoder_nll(z, x, gs)),
        ("diffusion_loss[T=0]", lambda: vj.diffusion_loss(eps_hat, eps, t, cont)),
        ("diffusion_loss[T=8]", lambda: vj.diffusion_loss(eps_hat, eps, t, sched, T=8)),
        ("sample_times", lambda: vj.sample_times(B, key=KEY, T=8)),
        ("bits_per_dim", lambda: vj.bits_per_dim(gt, 16)),
        *[(f"ddpm_log_variance[{k}]", lambda k=k: vj.ddpm_log_variance(sched, steps, variance=k, v=steps * 0.1))
          for k in ("posterior", "beta", "learned")],
        ("ddpm_vlb", lambda: vj.ddpm_vlb(_pred, x, sched, key=KEY)),
        ("ddpm_vlb[learned]", lambda: vj.ddpm_vlb(_learned_pred, x, sched, key=KEY, variance="learned")),
        ("vdm_elbo[vdm]", lambda: vj.vdm_elbo(_pred, x_vdm, cont, key=KEY)),
        ("vdm_elbo[gaussian, T=8]", lambda: vj.vdm_elbo(_pred, x, cont, key=KEY, T=8, decoder="gaussian")),
        ("ddpm_sample", lambda: vj.ddpm_sample(_pred, sched, (B, 3), key=KEY, clip_x=(-1.0, 1.0))),
        ("ddpm_sample[learned]", lambda: vj.ddpm_sample(_learned_pred, sched, (B, 3), key=KEY, variance="learned",
                                                        return_latent=True)),
        ("ddpm_step", lambda: vj.ddpm_step(_pred, sched, z, _put(jnp.int32(3)), key=KEY)),
        ("vdm_sample", lambda: vj.vdm_sample(_pred, cont, (B, 3), key=KEY, sample_steps=4)),
        ("ddim_sample", lambda: vj.ddim_sample(_pred, sched, _put(vj.strided_times(8, 4)), (B, 3), key=KEY,
                                               eta=0.5, return_latent=True)),
        ("solver_times", lambda: vj.solver_times(sched, 4)),
        ("solver_times[edm]", lambda: vj.solver_times(cont, 4, spacing="edm")),
        ("dpm_solver_sample", lambda: vj.dpm_solver_sample(_pred, sched, vj.solver_times(sched, 4), (B, 3), key=KEY,
                                                           clip_x=(-1.0, 1.0), return_latent=True)),
        ("ode_sample[heun]", lambda: vj.ode_sample(_pred, cont, vj.solver_times(cont, 4), (B, 3), key=KEY)),
        ("ode_sample[euler]", lambda: vj.ode_sample(_pred, sched, vj.solver_times(sched, 4), (B, 3), key=KEY,
                                                    method="euler")),
        ("ode_log_likelihood", lambda: vj.ode_log_likelihood(_pred, cont, x, key=KEY, rtol=1e-3, atol=1e-3)),
        ("dequantized_bits_per_dim", lambda: vj.dequantized_bits_per_dim(
            _pred, sched, _put(jnp.full((B, 3), 100, jnp.int32)), key=KEY, t_min=1.0 / 8, rtol=1e-3, atol=1e-3)),
        ("DDPM.loss", lambda: vj.DDPM(timesteps=8, loss_type="hybrid", variance="learned").loss(_learned_pred, x,
                                                                                              key=KEY)),
        ("DDPM.bound", lambda: vj.DDPM(timesteps=8).bound(_pred, x, key=KEY)),
        ("DDPM.full_bound", lambda: vj.DDPM(timesteps=8).full_bound(_pred, x, key=KEY)),
        ("DDPM.sample", lambda: vj.DDPM(timesteps=8).sample(_pred, (B, 3), key=KEY, sampler="heun", sample_steps=4)),
        ("VDM.loss", lambda: vj.VDM().loss(_pred, x_vdm, key=KEY)),
        ("VDM.sample", lambda: vj.VDM().sample(_pred, (B, 3), key=KEY, sampler="dpm_solver", sample_steps=4)),
        ("guided", lambda: vj.guided(lambda z_, t_, c: _pred(z_, t_) + vj.per_example(c.astype(z_.dtype), z_),
                                     _put(jnp.array([0, 1])), _put(jnp.float32(2.0)), null_label=2,
                                     interval=(-5.0, 5.0), gamma_fn=cont)(z, t)),
        ("variance_minimising_grads", lambda: vj.variance_minimising_grads(
            lambda p, s: (p * s * gt, p * gt), _put(jnp.float32(2.0)), _put(jnp.float32(3.0)))),
    ]


CALLS = _core_calls()


@pytest.mark.parametrize("name, call", CALLS, ids=[name for name, _ in CALLS])
def test_public_function_reads_nothing_back(name, call, no_host_reads):
    with no_host_reads():
        result = jax.block_until_ready(call())
    for leaf in jax.tree_util.tree_leaves(result):
        assert not np.any(np.isnan(leaf)), name  # (γ_0 = -inf is a value)


def test_every_public_name_is_covered():
    covered = {name.split("[")[0].split(".")[0] for name, _ in CALLS}
    host_only = {"linear_betas", "cosine_betas", "strided_times", "set_cpu_xla_flags",  # take Python values
                 "Sampler",  # (a registry entry: functions and a name)
                 # sample quality: NumPy float64 on the host, by design (docs/math.md §7)
                 "FeatureStatistics", "frechet_distance", "kernel_inception_distance", "inception_score",
                 "sample_quality", "save_statistics", "load_statistics"}
    callables = {n for n in vj.__all__ if callable(getattr(vj, n))} - host_only
    assert callables <= covered, callables - covered


def test_train_step_reads_nothing_back(no_host_reads):
    """The loop's compiled train step (`loop.compiled_steps`, the program tests/training/test_faults.py
    builds for the same micro run, so the compilation cache serves it) on state and batch already
    on the devices: no transfer in either direction, no host read."""
    import importlib.util
    import os

    from vdm_jax.training import create_train_state, parallel, validate_config
    from vdm_jax.training.loop import compiled_steps

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "training", "micro_config.py")
    spec = importlib.util.spec_from_file_location("micro_config", path)
    micro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(micro)
    config = micro.get_config()
    mesh = parallel.make_mesh()
    one, _ = compiled_steps(mesh)
    rep = parallel.replicated(mesh)
    state = jax.device_put(create_train_state(config, validate_config(config), key=jax.random.key(0)), rep)
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    batch = jax.device_put({"image": images}, parallel.batch_sharding(mesh))
    key = jax.device_put(jax.random.key(1), rep)
    with no_host_reads(), jax.transfer_guard("disallow"):
        state, metrics = one(state, batch, key)
        state = jax.block_until_ready(state)
    assert int(state.step) == 1
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert float(metrics["finite"]) == 1.0 and float(metrics["grad_norm"]) > 0
