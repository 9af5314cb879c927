"""Samplers (docs/math.md §6) checked against exact moments.

With the Bayes-optimal predictor for Gaussian data x ~ N(m, s²), every reverse step is linear-
Gaussian, z_s = A z_t + c + std·n, so each sampler's output mean and variance follow exactly by
propagating (mean, variance) through the chain. The propagation here is written independently,
in float64 NumPy, from docs/math.md's DDPM and VDM formulas.
"""
import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import vdm_jax as vj

M, S = 0.5, 0.3  # the data of the `optimal_pred` fixture (tests/conftest.py)
N = 100_000
T = 1000


def _affine_denoiser(a2):
    """x̂ = p z + q for the optimal predictor at α² = a2 (NumPy float64)."""
    a, s2 = np.sqrt(a2), 1 - a2
    denom = a2 * S ** 2 + s2
    return a * S ** 2 / denom, M * s2 / denom  # posterior mean E[x|z] = m + a s² (z - a m)/denom


def propagate_ddpm(betas, variance):
    b = np.asarray(betas, np.float64)
    abar = np.cumprod(1 - b)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    mean, var = 0.0, 1.0
    for t in range(len(b), 0, -1):
        i = t - 1
        p, q = _affine_denoiser(abar[i])
        c_x = np.sqrt(abar_prev[i]) * b[i] / (1 - abar[i])  # μ̃_t (docs/math.md §3)
        c_z = np.sqrt(1 - b[i]) * (1 - abar_prev[i]) / (1 - abar[i])
        A, c = c_x * p + c_z, c_x * q
        noise = 0.0 if t == 1 else (b[i] if variance == "beta" else b[i] * (1 - abar_prev[i]) / (1 - abar[i]))
        mean, var = A * mean + c, A ** 2 * var + noise
    return mean, var


def _a2(gamma):
    return 1 / (1 + np.exp(gamma))


def propagate_vdm(gamma_fn, num_steps):
    mean, var = 0.0, 1.0
    for i in range(num_steps, 0, -1):
        gt, gs = gamma_fn(i / num_steps), gamma_fn((i - 1) / num_steps)
        a2t, a2s = _a2(gt), _a2(gs)
        s2t, s2s = 1 - a2t, 1 - a2s
        a_ts = np.sqrt(a2t / a2s)
        s2_ts = s2t - a_ts ** 2 * s2s
        p, q = _affine_denoiser(a2t)
        c_z, c_x = a_ts * s2s / s2t, np.sqrt(a2s) * s2_ts / s2t  # docs/math.md §3
        A, c = c_z + c_x * p, c_x * q
        mean, var = A * mean + c, A ** 2 * var + s2_ts * s2s / s2t
    a0 = np.sqrt(_a2(gamma_fn(0.0)))
    return mean / a0, var / a0 ** 2


def propagate_ddim(gammas, eta):
    """gammas: γ at the decreasing times t_N, ..., t_0 (γ = -inf for clean data)."""
    mean, var = 0.0, 1.0
    for gt, gs in zip(gammas[:-1], gammas[1:]):
        a2t, a2s = _a2(gt), _a2(gs)
        s2t, s2s = 1 - a2t, 1 - a2s
        p, q = _affine_denoiser(a2t)
        # x̂ = p z + q;  ε̂ = (z - a_t x̂)/σ_t
        ex_z, ex_c = (1 - np.sqrt(a2t) * p) / np.sqrt(s2t), -np.sqrt(a2t) * q / np.sqrt(s2t)
        var_eta = eta ** 2 * s2s / s2t * (1 - a2t / a2s)
        d = np.sqrt(max(s2s - var_eta, 0.0))
        A = np.sqrt(a2s) * p + d * ex_z
        c = np.sqrt(a2s) * q + d * ex_c
        mean, var = A * mean + c, A ** 2 * var + var_eta
    return mean, var


def _check_moments(samples, mean, var):
    samples = np.asarray(samples, np.float64).ravel()
    n = samples.size
    assert abs(samples.mean() - mean) < 5 * np.sqrt(var / n), (samples.mean(), mean)
    assert abs(samples.var() / var - 1) < 5 * np.sqrt(2 / n), (samples.var(), var)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_ancestral_matches_propagated_moments(optimal_pred, variance):
    sched = vj.DiscreteSchedule(vj.linear_betas(T))
    pred = optimal_pred(sched)
    samples = jax.jit(lambda k: vj.ddpm_sample(pred, sched, (N, 1), key=k, variance=variance))(jax.random.key(0))
    mean, var = propagate_ddpm(sched.betas, variance)
    _check_moments(samples, mean, var)
    # The propagated moments are close to the data's: within 3% (β̃ comes out ~2.5% low: the model).
    assert abs(mean / M - 1) < 0.03 and abs(var / S ** 2 - 1) < 0.03, (mean, var)


def test_vdm_ancestral_matches_propagated_moments(optimal_pred):
    sched = vj.LinearSchedule(-13.3, 8.0)
    pred = optimal_pred(sched)
    samples = jax.jit(lambda k: vj.vdm_sample(pred, sched, (N, 1), key=k, sample_steps=T))(jax.random.key(1))
    gamma64 = lambda t: -13.3 + 21.3 * t  # noqa: E731
    mean, var = propagate_vdm(gamma64, T)
    _check_moments(samples, mean, var)
    assert abs(mean / M - 1) < 0.03 and abs(var / S ** 2 - 1) < 0.03, (mean, var)


@pytest.mark.parametrize("eta,steps", [(0.0, 50), (1.0, 100), (0.5, 20)])
def test_ddim_matches_propagated_moments(optimal_pred, eta, steps):
    sched = vj.DiscreteSchedule(vj.linear_betas(T))
    times = vj.strided_times(T, steps)
    pred = optimal_pred(sched)
    samples = jax.jit(lambda k: vj.ddim_sample(pred, sched, times, (N, 1), key=k, eta=eta))(jax.random.key(2))
    gammas = np.asarray(sched.gammas, np.float64)[np.round(times * T).astype(int)]
    np.testing.assert_allclose(np.asarray(sched(times), np.float64), gammas, rtol=1e-6)  # γ(i/T) = γ_i
    mean, var = propagate_ddim(gammas, eta)
    _check_moments(samples, mean, var)


def test_ddim_deterministic_approaches_data_as_steps_grow():
    sched = vj.DiscreteSchedule(vj.linear_betas(T))
    errors = []
    for steps in (10, 50, 200, 1000):
        gammas = np.asarray(sched.gammas, np.float64)[np.round(vj.strided_times(T, steps) * T).astype(int)]
        mean, var = propagate_ddim(gammas, 0.0)
        errors.append(abs(mean - M) / M + abs(var - S ** 2) / S ** 2)
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 0.02, errors  # 1000 steps: variance ~1% low, mean 0.2% (ᾱ_T > 0)


def test_ddim_eta0_is_deterministic_given_start(optimal_pred):
    sched = vj.DiscreteSchedule(vj.linear_betas(100))
    pred = optimal_pred(sched)
    times = vj.strided_times(100, 10)
    a = vj.ddim_sample(pred, sched, times, (16, 1), key=jax.random.key(0))
    b, z_0 = vj.ddim_sample(pred, sched, times, (16, 1), key=jax.random.key(0), return_latent=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(z_0, b)  # the schedule reaches α = 1 at t = 0: x = z_0


def test_ddim_eta1_equals_ancestral_posterior_variance(optimal_pred):
    """η = 1 is ancestral sampling with σ² = β̃ (docs/math.md §6): same noise, same samples."""
    sched = vj.DiscreteSchedule(vj.linear_betas(50, 1e-3, 0.2))
    pred = optimal_pred(sched)
    z_T = jax.random.normal(jax.random.key(3), (64, 1))
    noises = jax.random.normal(jax.random.key(4), (50, 64, 1))
    z_ddim, z_anc = z_T, z_T
    for t in range(50, 0, -1):
        tv = jnp.full((64,), t / 50)
        gt, gs = sched.gamma_step(t), sched.gamma_step(t - 1)
        eps_hat, x_hat = vj.eps_and_x(pred(z_anc, tv), z_anc, gt, kind="eps")
        mean, var = vj.q_posterior(x_hat, z_anc, gs, gt)
        z_anc = mean + jnp.sqrt(var) * noises[t - 1]
        eps_hat, x_hat = vj.eps_and_x(pred(z_ddim, tv), z_ddim, gt, kind="eps")
        a_s, s_s = vj.alpha_sigma(gs)
        a_t, s_t = vj.alpha_sigma(gt)
        var_eta = s_s ** 2 / s_t ** 2 * (1 - a_t ** 2 / a_s ** 2)
        z_ddim = a_s * x_hat + jnp.sqrt(jnp.maximum(s_s ** 2 - var_eta, 0)) * eps_hat + jnp.sqrt(var_eta) * noises[t - 1]
        np.testing.assert_allclose(var, var_eta, rtol=2e-4, atol=1e-12)
    np.testing.assert_allclose(z_ddim, z_anc, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["x", "score", "v"])
def test_samplers_accept_every_prediction_kind(optimal_pred, kind):
    sched = vj.DiscreteSchedule(vj.linear_betas(50, 1e-3, 0.2))
    key = jax.random.key(5)
    ref = vj.ddpm_sample(optimal_pred(sched), sched, (32, 2), key=key)
    out = vj.ddpm_sample(optimal_pred(sched, kind), sched, (32, 2), key=key, kind=kind)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
    cont = vj.LinearSchedule()
    ref = vj.vdm_sample(optimal_pred(cont), cont, (32, 2), key=key, sample_steps=20)
    out = vj.vdm_sample(optimal_pred(cont, kind), cont, (32, 2), key=key, sample_steps=20, kind=kind)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
    times = vj.strided_times(50, 10)
    ref = vj.ddim_sample(optimal_pred(sched), sched, times, (32, 2), key=key)
    out = vj.ddim_sample(optimal_pred(sched, kind), sched, times, (32, 2), key=key, kind=kind)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)


def test_ddpm_learned_variance_interpolates(optimal_pred):
    sched = vj.DiscreteSchedule(vj.linear_betas(30, 1e-3, 0.3))
    key = jax.random.key(6)
    base = optimal_pred(sched)
    for v, variance in ((1.0, "beta"), (0.0, "posterior")):
        learned = lambda z, t, v=v: (base(z, t), jnp.full_like(z, v))  # noqa: E731
        a = vj.ddpm_sample(learned, sched, (16, 1), key=key, variance="learned")
        b = vj.ddpm_sample(base, sched, (16, 1), key=key, variance=variance)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_clip_x():
    sched = vj.DiscreteSchedule(vj.linear_betas(20, 1e-3, 0.3))
    pred = lambda z, t: jnp.full_like(z, -50.0)  # noqa: E731  absurd ε̂: x̂ far outside [-1, 1]
    out = vj.ddpm_sample(pred, sched, (8, 3), key=jax.random.key(0), clip_x=(-1.0, 1.0))
    assert np.all(np.abs(out) <= 1.0 + 1e-6)
    out = vj.ddim_sample(pred, sched, vj.strided_times(20, 5), (8, 3), key=jax.random.key(0), clip_x=(-1.0, 1.0))
    assert np.all(np.abs(out) <= 1.0 + 1e-6)


def test_samplers_return_the_data_estimate_and_the_latent(optimal_pred):
    """x = z_0/α(t_0) for every sampler; return_latent=True gives (x, z_0)."""
    cont = vj.LinearSchedule()
    pred = optimal_pred(cont)
    key = jax.random.key(7)
    alpha_0 = vj.alpha_sigma(cont(0.0))[0]
    x, z_0 = vj.vdm_sample(pred, cont, (8, 2), key=key, sample_steps=10, return_latent=True)
    np.testing.assert_array_equal(x, vj.vdm_sample(pred, cont, (8, 2), key=key, sample_steps=10))
    np.testing.assert_allclose(x, z_0 / alpha_0, rtol=1e-6)
    times = np.linspace(1.0, 0.0, 11, dtype=np.float32)
    x, z_0 = vj.ddim_sample(pred, cont, times, (8, 2), key=key, return_latent=True)
    np.testing.assert_allclose(x, z_0 / alpha_0, rtol=1e-6)
    sched = vj.DiscreteSchedule(vj.linear_betas(20, 1e-3, 0.3))
    x, z_0 = vj.ddpm_sample(optimal_pred(sched), sched, (8, 2), key=key, return_latent=True)
    np.testing.assert_array_equal(x, z_0)


def test_pred_fn_gets_float_t_in_unit_interval():
    """Every sampler calls pred_fn with t a float [B] in [0, 1] (DDPM step i is t = i/T)."""
    seen = []

    def pred(z, t):
        seen.append(t)
        return jnp.zeros_like(z)

    sched = vj.DiscreteSchedule(vj.linear_betas(10))
    key = jax.random.key(0)
    vj.ddpm_step(pred, sched, jnp.ones((3, 1)), 4, key=key)
    np.testing.assert_allclose(seen[-1], np.full(3, 0.4), rtol=1e-6)
    for call in (lambda: vj.ddpm_sample(pred, sched, (3, 1), key=key),
                 lambda: vj.vdm_sample(pred, vj.LinearSchedule(), (3, 1), key=key, sample_steps=4),
                 lambda: vj.ddim_sample(pred, sched, vj.strided_times(10, 5), (3, 1), key=key)):
        call()
        assert seen[-1].shape == (3,) and jnp.issubdtype(seen[-1].dtype, jnp.floating)


def test_samplers_trace_once(optimal_pred):
    sched = vj.DiscreteSchedule(vj.linear_betas(20))
    pred = optimal_pred(sched)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sample(key):
        return vj.ddpm_sample(pred, sched, (4, 1), key=key)

    a, b = sample(jax.random.key(0)), sample(jax.random.key(1))
    assert not np.allclose(a, b)


def test_whole_chain_is_one_scan():
    """The jaxpr of a 1000-step sampler has one scan and calls the predictor once (inside it)."""
    sched = vj.DiscreteSchedule(vj.linear_betas(T))
    calls = []

    def pred(z, t):
        calls.append(1)
        return jnp.zeros_like(z)

    jaxpr = jax.make_jaxpr(lambda k: vj.ddpm_sample(pred, sched, (2, 1), key=k))(jax.random.key(0))
    assert len(calls) == 1
    assert sum(eqn.primitive.name == "scan" for eqn in jaxpr.eqns) == 1


def test_python_loop_of_ddpm_step_reproduces_ddpm_sample(optimal_pred):
    """T calls of the jitted `ddpm_step` (as the sampler benchmark drives it) = `ddpm_sample`."""
    sched = vj.DiscreteSchedule(vj.linear_betas(30, 1e-3, 0.2))
    pred = optimal_pred(sched)
    key = jax.random.key(4)
    whole = jax.jit(lambda k: vj.ddpm_sample(pred, sched, (16, 1), key=k, clip_x=(-1.0, 1.0)))(key)
    key_init, key_steps = jax.random.split(key)
    step = jax.jit(lambda z, t: vj.ddpm_step(pred, sched, z, t, key=key_steps, clip_x=(-1.0, 1.0)))
    z = jax.random.normal(key_init, (16, 1))
    for t in range(30, 0, -1):
        z = step(z, jnp.int32(t))
    np.testing.assert_allclose(z, whole, rtol=1e-5, atol=1e-6)


# --- bad input: one table per sampler -------------------------------------------------------------
# (fn, args, kwargs, error, message regex); each row is checked eagerly and under jax.jit.

SCHED = vj.DiscreteSchedule(vj.linear_betas(10))
CONT = vj.LinearSchedule()
KEY = jax.random.key(0)
Z = jnp.ones((2, 1))


def _identity(z, t):
    return z


_TIMES = r"times must be a floating 1-D array of at least 2 strictly decreasing times in \[0, 1\], got "

ERRORS = {
    vj.ddpm_sample: [
        ((_identity, SCHED, (2, 1)), {"key": KEY, "kind": "noise"}, ValueError, "ddpm_sample: kind must be one of"),
        ((_identity, SCHED, ()), {"key": KEY}, ValueError,
         r"ddpm_sample: shape must be a non-empty tuple of positive ints \[B, ...\], got \(\)"),
        ((_identity, SCHED, (2, 0)), {"key": KEY}, ValueError, "shape must be a non-empty tuple of positive ints"),
        ((_identity, SCHED, 4), {"key": KEY}, ValueError, "shape must be a non-empty tuple of positive ints.*, got 4"),
        ((_identity, CONT, (2, 1)), {"key": KEY}, ValueError,
         r"ddpm_sample: schedule must be a DiscreteSchedule \(a continuous schedule goes to .*vdm_sample"),
        ((_identity, SCHED, (2, 1)), {"key": KEY, "variance": "large"}, ValueError,
         "variance must be one of 'posterior', 'beta' or 'learned', got 'large'"),
        ((_identity, SCHED, (2, 1)), {"key": KEY, "clip_x": (1.0, -1.0)}, ValueError,
         r"clip_x must be None or a pair \(lo, hi\) with lo < hi, got \(1.0, -1.0\)"),
        ((_identity, SCHED, (2, 1)), {"key": KEY, "variance": "learned"}, ValueError,
         r"with variance='learned' pred_fn must return \(prediction, v\), got one array"),
        ((lambda z, t: (z, z), SCHED, (2, 1)), {"key": KEY}, ValueError,
         "pred_fn returned a tuple of 2, but without a learned variance"),
        ((lambda z, t: z[:, :1], SCHED, (2, 3)), {"key": KEY}, ValueError,
         r"pred_fn must return a prediction of z_t's shape \(2, 3\), got \(2, 1\)"),
        ((_identity, SCHED, (2, 1), KEY), {}, TypeError, "takes 3 positional arguments but 4 were given"),
    ],
    vj.ddpm_step: [
        ((_identity, SCHED, Z, jnp.array([3, 4])), {"key": KEY}, ValueError,
         r"ddpm_step: step must be a scalar integer in 1..T, got int32 of shape \(2,\)"),
        ((_identity, SCHED, jnp.ones((2, 1), jnp.int32), 3), {"key": KEY}, ValueError,
         r"ddpm_step: z must be a floating array \[B, ...\]"),
        ((_identity, SCHED, Z, 0.5), {"key": KEY}, ValueError, "step must be a scalar integer in 1..T, got float"),
        ((_identity, CONT, Z, 3), {"key": KEY}, ValueError, "schedule must be a DiscreteSchedule"),
        ((_identity, SCHED, Z, 3, KEY), {}, TypeError, "takes 4 positional arguments but 5 were given"),
    ],
    vj.vdm_sample: [
        ((_identity, CONT, (2, 1)), {"key": KEY, "sample_steps": 0}, ValueError,
         "vdm_sample: sample_steps must be an int >= 1, got 0"),
        ((_identity, CONT, (2, 1)), {"key": KEY, "sample_steps": 10.0}, ValueError,
         r"sample_steps must be an int >= 1, got 10.0"),
        ((_identity, CONT, (2, 1)), {"key": KEY}, TypeError, "missing 1 required keyword-only argument: 'sample_steps'"),
        ((_identity, CONT, [2, "1"]), {"key": KEY, "sample_steps": 2}, ValueError,
         "shape must be a non-empty tuple of positive ints"),
        ((_identity, CONT, (2, 1)), {"key": KEY, "sample_steps": 2, "clip_x": (0.0,)}, ValueError,
         "clip_x must be None or a pair"),
    ],
    vj.ddim_sample: [
        ((_identity, SCHED, np.array([0.0, 0.5, 1.0]), (2, 1)), {"key": KEY}, ValueError,
         "ddim_sample: " + _TIMES + r"\[0.0, 0.5, 1.0\]"),
        ((_identity, SCHED, np.array([1.0, 0.5, 0.0]), (2, 1)), {"key": KEY, "eta": 1.5}, ValueError,
         r"ddim_sample: eta must be in \[0, 1\], got 1.5"),
        ((_identity, CONT, np.array([1.5, 0.5, 0.0]), (2, 1)), {"key": KEY}, ValueError, _TIMES + r"\[1.5, 0.5, 0.0\]"),
        ((_identity, SCHED, np.array([20.0, 10.0, 0.0]), (2, 1)), {"key": KEY}, ValueError, _TIMES),
        ((_identity, SCHED, np.array([20, 10, 0]), (2, 1)), {"key": KEY}, ValueError, _TIMES + r"\[20, 10, 0\]"),
        ((_identity, SCHED, jnp.ones((2, 2)), (2, 1)), {"key": KEY}, ValueError, _TIMES + r"float32 of shape \(2, 2\)"),
        ((_identity, SCHED, np.array([1.0]), (2, 1)), {"key": KEY}, ValueError, _TIMES + r"\[1.0\]"),
        ((_identity, SCHED, np.array([1.0, 0.0]), (2, 1)), {"key": KEY, "kind": "noise"}, ValueError, "kind must be one of"),
        ((_identity, SCHED, np.array([1.0, 0.0]), (2, 1), KEY), {}, TypeError, "positional arguments but 5 were given"),
    ],
    vj.dpm_solver_sample: [
        ((_identity, CONT, np.array([0.0, 1.0]), (2, 1)), {"key": KEY}, ValueError, "dpm_solver_sample: " + _TIMES),
        ((_identity, CONT, np.array([1.0, 0.0]), (2, 1)), {"key": KEY, "order": 3}, ValueError,
         "dpm_solver_sample: order must be one of 1 or 2, got 3"),
        ((_identity, CONT, np.array([1.0, 0.0]), (2, 1)), {"key": KEY, "kind": "noise"}, ValueError,
         "kind must be one of"),
    ],
    vj.ode_sample: [
        ((_identity, CONT, np.array([1.0, 0.0]), (2, 1)), {"key": KEY, "method": "rk4"}, ValueError,
         r"ode_sample: method must be one of 'heun' or 'euler', got 'rk4'"),
        ((_identity, CONT, np.array([1.0, 0.5, 1.5]), (2, 1)), {"key": KEY}, ValueError, _TIMES),
        ((_identity, CONT, (2, 1)), {"key": KEY}, TypeError, "missing 1 required positional argument: 'shape'"),
    ],
    vj.solver_times: [
        ((CONT, 0), {}, ValueError, "solver_times: sample_steps must be an int >= 1, got 0"),
        ((CONT, 4), {"spacing": "karras"}, ValueError, "spacing must be one of 'logsnr', 'time' or 'edm'"),
        ((CONT, 4.0), {}, ValueError, "sample_steps must be an int >= 1, got 4.0"),
    ],
    vj.strided_times: [
        ((20, 21), {}, ValueError, "strided_times: sample_steps must be in 1..T = 1..20, got 21"),
        ((10, 2.5), {}, ValueError, "sample_steps must be an int >= 1, got 2.5"),
        ((10.0, 2), {}, ValueError, "strided_times: T must be an int >= 0, got 10.0"),
        ((10, 0), {}, ValueError, "sample_steps must be an int >= 1, got 0"),
    ],
}
CASES = [(fn, *row) for fn, rows in ERRORS.items() for row in rows]


@pytest.mark.parametrize("fn, args, kwargs, error, match", CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_bad_arguments(fn, args, kwargs, error, match, raises):
    raises(fn, args, kwargs, error, match)


def test_strided_times_values():
    np.testing.assert_array_equal(vj.strided_times(10, 5), np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], np.float32))
    assert vj.strided_times(1000, 3).dtype == np.float32


def test_device_values_are_not_checked(no_host_reads):
    """Device times and steps are not read back: out-of-range values give NaN samples."""
    put = jax.device_put
    with no_host_reads():
        x = vj.ddim_sample(_identity, CONT, put(jnp.array([1.5, 0.5, 0.0])), (2, 1), key=KEY)
        z = vj.ddpm_step(_identity, SCHED, put(Z), put(jnp.int32(12)), key=KEY)
    assert np.all(np.isnan(x)) and np.all(np.isnan(z))


# --- fast deterministic samplers (docs/math.md §6.5-6.7) --------------------------------------------
#
# For Gaussian data x ~ N(M, S²) the probability-flow ODE has a closed-form solution: with
# x̃ = z/α and ς = σ/α, x̃(ς) = M + (x̃(ς_1) - M) sqrt((S² + ς²)/(S² + ς_1²)). Each sampler's output
# is compared with it from the same starting point, so its discretisation error is measured exactly.

FAST = {
    "dpm_solver": lambda pred, g, times, shape, key, **kw: vj.dpm_solver_sample(pred, g, times, shape, key=key, **kw),
    "heun": lambda pred, g, times, shape, key, **kw: vj.ode_sample(pred, g, times, shape, key=key, method="heun", **kw),
    "euler": lambda pred, g, times, shape, key, **kw: vj.ode_sample(pred, g, times, shape, key=key,
                                                                     method="euler", **kw),
}


def exact_flow(gamma_fn, times, shape, key, dtype=jnp.float32):
    """The exact ODE map of the samplers' starting noise z ~ N(0, I) at times[0] to times[-1]."""
    z = jax.random.normal(jax.random.split(key)[0], shape, dtype)
    g1, g0 = (float(gamma_fn(jnp.asarray(t, dtype))) for t in (times[0], times[-1]))
    x1 = np.asarray(z, np.float64) * np.sqrt(1 + np.exp(g1))  # z/α
    ratio = np.sqrt((S ** 2 + np.exp(g0)) / (S ** 2 + np.exp(g1)))  # ς² = exp(γ)
    return M + (x1 - M) * ratio


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpm_solver", 2)])
def test_fast_samplers_converge_at_their_order(optimal_pred, x64, name, order):
    """The error against the exact ODE solution falls as N^-order (float64, Gaussian data)."""
    sched = vj.LinearSchedule(-10.0, 10.0)
    kw = {"lower_order_final": False} if name == "dpm_solver" else {}
    key, shape = jax.random.key(11), (64, 1)
    errors = []
    for steps in (16, 32, 64, 128):
        times = vj.solver_times(sched, steps, dtype=jnp.float64)
        x = FAST[name](optimal_pred(sched), sched, times, shape, key, dtype=jnp.float64, **kw)
        errors.append(np.abs(np.asarray(x) - exact_flow(sched, times, shape, key, jnp.float64)).max())
    slopes = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))  # measured: 0.94-0.99, 1.79-1.99
    assert np.all(np.abs(slopes - order) < 0.25) and abs(slopes[-1] - order) < 0.05, (errors, slopes)


@pytest.mark.parametrize("discrete", [False, True])
def test_fast_samplers_match_the_data_moments(optimal_pred, discrete):
    """The ODE carries N(0, I) to the data distribution: the exact flow's samples have the data's mean
    and variance within Monte Carlo error. So do the samplers' with 100 steps (Euler: within 7%).
    With 20 steps their means do, and their variances are off by the method's error, measured
    (Gaussian data, steps evenly spaced in log-SNR): DPM-Solver++(2M) +3%, Heun +8%, Euler -23%."""
    sched = vj.DiscreteSchedule(vj.linear_betas(T)) if discrete else vj.LinearSchedule(-13.3, 8.0)
    key = jax.random.key(12)
    tolerance = {20: {"dpm_solver": 0.05, "heun": 0.12, "euler": 0.3}, 100: {"euler": 0.07}}
    for steps in (20, 100):
        times = vj.solver_times(sched, steps)
        exact = exact_flow(sched, times, (N, 1), key)
        _check_moments(exact, M, S ** 2)
        for name, sample in FAST.items():
            x = np.asarray(jax.jit(lambda k: sample(optimal_pred(sched), sched, times, (N, 1), k))(key), np.float64)
            assert abs(x.mean() - M) < 5 * S / np.sqrt(N), (name, steps, x.mean())
            bound = tolerance[steps].get(name)
            if bound is None:
                _check_moments(x, M, S ** 2)
            else:
                assert abs(x.var() / exact.var() - 1) < bound, (name, steps, x.var() / exact.var())


def test_first_order_fast_samplers_are_ddim(optimal_pred):
    """DPM-Solver++ of order 1 and Euler's method on the EDM ODE are DDIM with η = 0, on any schedule."""
    key = jax.random.key(13)
    for sched in (vj.DiscreteSchedule(vj.linear_betas(100)), vj.LinearSchedule()):
        times = vj.solver_times(sched, 10)
        pred = optimal_pred(sched)
        ref = vj.ddim_sample(pred, sched, times, (64, 2), key=key)
        euler = vj.ode_sample(pred, sched, times, (64, 2), key=key, method="euler")
        dpm1 = vj.dpm_solver_sample(pred, sched, times, (64, 2), key=key, order=1)
        np.testing.assert_allclose(euler, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dpm1, ref, rtol=1e-4, atol=1e-5)


def test_fast_sampler_network_evaluations(optimal_pred):
    """DPM-Solver++ and Euler call the network once per step; Heun twice, but once at a last step
    that lands on σ = 0 (a discrete schedule's t = 0)."""
    def counted(sched):
        calls = []
        base = optimal_pred(sched)

        def pred(z, t):
            jax.debug.callback(lambda: calls.append(1))
            return base(z, t)
        return pred, calls

    for sched, heun_calls in ((vj.DiscreteSchedule(vj.linear_betas(100)), 2 * 8 - 1), (vj.LinearSchedule(), 2 * 8)):
        times = vj.solver_times(sched, 8)
        for name, want in (("dpm_solver", 8), ("euler", 8), ("heun", heun_calls)):
            pred, calls = counted(sched)
            jax.block_until_ready(jax.jit(lambda k: FAST[name](pred, sched, times, (4, 1), k))(KEY))
            jax.effects_barrier()
            assert len(calls) == want, (name, type(sched).__name__, len(calls))


@pytest.mark.parametrize("kind", ["x", "score", "v"])
def test_fast_samplers_accept_every_prediction_kind(optimal_pred, kind):
    sched = vj.LinearSchedule()
    times = vj.solver_times(sched, 10)
    for name, sample in FAST.items():
        ref = sample(optimal_pred(sched), sched, times, (32, 2), KEY)
        out = sample(optimal_pred(sched, kind), sched, times, (32, 2), KEY, kind=kind)
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3, err_msg=name)


def test_solver_times_spacings():
    cont, disc = vj.LinearSchedule(-13.3, 5.0), vj.DiscreteSchedule(vj.linear_betas(1000))
    # 'logsnr': γ linear in the step, from γ(1) down to γ(0) (continuous).
    times = jax.jit(lambda: vj.solver_times(cont, 8))()
    assert times.shape == (9,) and times[0] == 1.0 and times[-1] == 0.0
    np.testing.assert_allclose(np.diff(np.asarray(cont(times), np.float64)), -18.3 / 8, rtol=1e-4)
    # 'time': t itself; a discrete schedule ends with the step from 1/T to 0.
    np.testing.assert_allclose(vj.solver_times(cont, 4, spacing="time"), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
    times = vj.solver_times(disc, 4, spacing="time")
    np.testing.assert_allclose(times, [1.0, 1 - 0.999 / 3, 1 - 2 * 0.999 / 3, 0.001, 0.0], atol=1e-6)
    # 'edm': ς^(1/ρ) = exp(γ/(2ρ)) linear in the step (the discrete schedule: its first N points).
    times = vj.solver_times(disc, 6, spacing="edm", rho=7.0)
    assert times.shape == (7,) and times[-1] == 0.0 and times[-2] == np.float32(0.001)
    root = np.exp(np.asarray(disc(times[:-1]), np.float64) / 14.0)
    np.testing.assert_allclose(np.diff(root), (root[-1] - root[0]) / 5, rtol=1e-3)
    times = vj.solver_times(disc, 6)  # 'logsnr' on the discrete schedule
    np.testing.assert_allclose(np.diff(np.asarray(disc(times[:-1]), np.float64)),
                               (float(disc.gamma_step(1)) - float(disc.gamma_step(1000))) / 5, rtol=1e-3)
    np.testing.assert_array_equal(vj.solver_times(disc, 1), [1.0, 0.0])
    for spacing in vj.SPACINGS:
        for sched in (cont, disc):
            assert np.all(np.diff(np.asarray(vj.solver_times(sched, 12, spacing=spacing))) < 0)
