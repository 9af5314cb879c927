"""Likelihoods by the probability-flow ODE (docs/math.md §6.8), checked against closed forms.

For Gaussian data x ~ N(M, S² I) with the Bayes-optimal ε̂ the ODE is linear: in x̃ = z/α and
ς² = e^γ its solution is x̃_0 = M + (x̃_1 - M) k, k = sqrt((S² + ς0²)/(S² + ς1²)) (ς0 at t_min,
ς1 at t = 1). With z_1 ~ N(0, I), x̃_1 = z_1/α_1 ~ N(0, I/α_1²), so the model's x = z_{t_min}/α(t_min)
= x̃_0 has the density N(M(1 - k), k²/α_1² I) — for any schedule, since only its end points enter.
The ODE's answer is compared with that density, written here in float64 NumPy.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import vdm_jax as vj

M, S, D = 0.5, 0.3, 3  # M, S: the data of the `optimal_pred` fixture (tests/conftest.py)
KEY = jax.random.key(0)
POINTS = np.array([[0.1, 0.5, 0.9], [0.0, -0.3, 1.2], [-1.0, 1.0, 0.5], [2.0, 0.4, -0.7]])


def _ends(gamma_fn, t_min):
    return tuple(float(gamma_fn(jnp.asarray(t, jax.dtypes.canonicalize_dtype(float)))) for t in (t_min, 1.0))


def model_log_density(gamma_fn, t_min, x):
    """log N(x; M(1 - k), k²/α_1² I) per example, and the ODE's z_1 from x (NumPy float64)."""
    g0, g1 = _ends(gamma_fn, t_min)
    k = np.sqrt((S ** 2 + np.exp(g0)) / (S ** 2 + np.exp(g1)))
    alpha_1 = np.sqrt(1.0 / (1.0 + np.exp(g1)))  # α² = sigmoid(-γ)
    mean, var = M * (1 - k), k ** 2 / alpha_1 ** 2
    log_p = np.sum(-0.5 * np.log(2 * np.pi * var) - 0.5 * (x - mean) ** 2 / var, axis=-1)
    z_1 = alpha_1 * (M + (x - M) / k)  # x̃_0 = x, run backwards to x̃_1
    return log_p, z_1


def likelihood(pred, sched, x, **kw):
    return jax.jit(lambda x, key: vj.ode_log_likelihood(pred, sched, x, key=key, **kw))(x, KEY)


SCHEDULES = {
    "linear": (lambda: vj.LinearSchedule(-13.3, 5.0), 0.0),
    "discrete": (lambda: vj.DiscreteSchedule(vj.linear_betas(1000)), 1e-3),
    "noisy": (lambda: vj.LinearSchedule(-2.0, 5.0), 0.25),  # α(t_min)² = 0.82: D log α = -0.30
}


@pytest.mark.parametrize("name, kind", [(n, k) for n in ("linear", "discrete") for k in vj.PREDICTIONS]
                         + [("noisy", "eps")])
def test_gaussian_log_likelihood_is_the_closed_form(optimal_pred, x64, name, kind):
    """log p(x) (the α(t_min) factor included), its prior term, and δ = log p - prior - D log α_0
    equal the affine flow's, to 1e-4, for every prediction kind, continuous and discrete, and at a
    t_min > 0 where α(t_min) is far from 1."""
    make, t_min = SCHEDULES[name]
    sched = make()
    x = jnp.asarray(POINTS)
    out = likelihood(optimal_pred(sched, kind), sched, x, kind=kind, t_min=t_min, rtol=1e-6, atol=1e-6)
    want, z_1 = model_log_density(sched, t_min, POINTS)
    np.testing.assert_allclose(out["log_likelihood"], want, rtol=0, atol=1e-4)
    prior = -0.5 * np.sum(np.log(2 * np.pi) + z_1 ** 2, axis=-1)
    np.testing.assert_allclose(out["prior"], prior, rtol=0, atol=1e-4)
    log_alpha_0 = -0.5 * np.log1p(np.exp(_ends(sched, t_min)[0]))
    np.testing.assert_allclose(out["log_likelihood"], out["prior"] + out["delta"] + D * log_alpha_0, atol=1e-12)


def test_learned_schedule_gamma_prime_by_jvp(optimal_pred, x64):
    """A learned schedule's γ'(t) comes from jax.jvp; the closed form needs only its end points."""
    sched = vj.LearnedSchedule(-10.0, 6.0, hidden=16, rngs=nnx.Rngs(3))
    out = likelihood(optimal_pred(sched), sched, jnp.asarray(POINTS), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["log_likelihood"], model_log_density(sched, 0.0, POINTS)[0], atol=1e-4)


def test_hutchinson_probes(optimal_pred, x64):
    """The Jacobian here is c(t) I: Rademacher probes give its trace exactly (any number of them);
    Gaussian probes give c |ε|², unbiased: over 512 draws δ/δ_exact = mean_p |ε_p|²/D has mean 1
    (within 4 standard errors) and variance 2/(P D)."""
    sched = vj.LinearSchedule(-13.3, 5.0)
    pred = optimal_pred(sched)
    x = jnp.asarray(POINTS)
    exact = likelihood(pred, sched, x, divergence="exact")
    for num_probes in (1, 3):
        rad = likelihood(pred, sched, x, num_probes=num_probes)
        np.testing.assert_allclose(rad["log_likelihood"], exact["log_likelihood"], rtol=1e-10, atol=1e-10)
    n = 512
    copies = jnp.broadcast_to(x[:1], (n, D))
    for num_probes in (1, 4):
        gauss = likelihood(pred, sched, copies, probe="gaussian", num_probes=num_probes)
        ratio = np.asarray(gauss["delta"]) / float(exact["delta"][0])
        assert abs(ratio.mean() - 1) < 4 * ratio.std() / np.sqrt(n), (num_probes, ratio.mean())
        assert abs(ratio.var() / (2 / (num_probes * D)) - 1) < 0.3, (num_probes, ratio.var())
        assert np.all(ratio > 0) and ratio.std() > 0.1


def test_full_jacobian_exact_trace_and_unbiased_hutchinson(x64):
    """Correlated Gaussian data x ~ N(M, Q diag(s²) Qᵀ): the Jacobian is not diagonal, the flow is
    x̃_0 = (I - K)M + K x̃_1 with K = Q diag(k_d) Qᵀ. The exact trace gives the model's density; a
    Rademacher probe is then not exact, but its mean over draws is."""
    q, _ = np.linalg.qr(np.array([[1.0, 2.0, 0.5], [-1.0, 0.3, 2.0], [0.7, -1.2, 1.0]]))
    s2, mean = np.array([0.02, 0.3, 1.5]), np.array([0.5, -0.2, 0.1])
    sched = vj.LinearSchedule(-10.0, 6.0)

    def pred(z, t):
        alpha, sigma = (v[:, None] for v in vj.alpha_sigma(sched(t)))
        w = (z - alpha * mean[None]) @ q / (alpha ** 2 * s2[None] + sigma ** 2)  # eigen-coordinates
        return sigma * (w @ q.T)

    g0, g1 = _ends(sched, 0.0)
    k = np.sqrt((s2 + np.exp(g0)) / (s2 + np.exp(g1)))
    alpha_1 = np.sqrt(1.0 / (1.0 + np.exp(g1)))
    kmat = q @ np.diag(k) @ q.T
    y = (POINTS - mean @ (np.eye(D) - kmat).T) @ q  # eigen-coordinates of x - (I - K)M
    var = k ** 2 / alpha_1 ** 2
    want = np.sum(-0.5 * np.log(2 * np.pi * var) - 0.5 * y ** 2 / var, axis=-1)
    exact = likelihood(pred, sched, jnp.asarray(POINTS), divergence="exact", rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(exact["log_likelihood"], want, atol=1e-4)
    n = 512
    copies = jnp.broadcast_to(jnp.asarray(POINTS[:1]), (n, D))
    rad = np.asarray(likelihood(pred, sched, copies, rtol=1e-6, atol=1e-6)["log_likelihood"])
    assert rad.std() > 0.01  # off-diagonal terms: one Rademacher probe is not exact
    assert abs(rad.mean() - want[0]) < 4 * rad.std() / np.sqrt(n), (rad.mean(), want[0], rad.std())


def test_mean_negative_log_likelihood_approaches_the_data_entropy(optimal_pred, x64):
    """E_data[-log p_model(x)] = H + KL(data ‖ model) >= H = D/2 log(2πe S²). With γ from -13.3 to
    12 the model is the data to ~1e-5 nats (ς0² = e^-13.3 is tiny next to S², and q(z_1) =
    N(α_1 M, α_1² S² + σ_1²) is N(0, I) to ~1e-5 at γ_1 = 12), so the mean over 1024 draws is H
    within 4 standard errors."""
    sched = vj.LinearSchedule(-13.3, 12.0)
    n = 1024
    x = M + S * jax.random.normal(jax.random.key(5), (n, D), jnp.float64)
    nll = -np.asarray(likelihood(optimal_pred(sched), sched, x)["log_likelihood"])
    entropy = 0.5 * D * np.log(2 * np.pi * np.e * S ** 2)
    assert abs(nll.mean() - entropy) < 4 * nll.std() / np.sqrt(n), (nll.mean(), entropy)
    np.testing.assert_allclose(nll, -model_log_density(sched, 0.0, np.asarray(x))[0], atol=1e-3)


@pytest.mark.parametrize("grid", ["ddpm", "vdm"])
def test_dequantized_bits_per_dim(optimal_pred, x64, grid):
    """The bins' log-Jacobian, and both estimates against the closed-form density at the same
    dequantised points (draw n: u from split(fold_in(key, n))[0]); the importance-weighted bits/dim
    is below the plain average (Jensen), equal for one draw."""
    sched = vj.LinearSchedule(-13.3, 5.0)
    pixels = jnp.array([[0, 128, 255], [1, 2, 3], [200, 255, 17]], jnp.int32)
    width = {"vdm": np.full((3, 3), 2 / 256),
             "ddpm": np.where(np.isin(np.asarray(pixels), [0, 255]), 1 / 255, 2 / 255)}[grid]
    key = jax.random.key(7)
    run = jax.jit(lambda p, k: vj.dequantized_bits_per_dim(optimal_pred(sched), sched, p, key=k, grid=grid,
                                                           num_draws=4, rtol=1e-6, atol=1e-6))
    out = run(pixels, key)
    np.testing.assert_allclose(out["log_jacobian"], np.log(width).sum(-1), rtol=1e-12)
    # the points: each in its pixel's bin, inside [-1, 1]
    centre = np.asarray(vj.pixels_to_data(pixels, grid=grid, dtype=jnp.float64))
    lo = np.maximum(centre - (1 / 255 if grid == "ddpm" else 1 / 256), -1.0)
    log_p = []
    for n in range(4):
        u = np.asarray(jax.random.uniform(jax.random.split(jax.random.fold_in(key, n))[0], (3, 3), jnp.float64))
        x = lo + width * u
        assert np.all((x >= -1) & (x <= 1))
        np.testing.assert_array_equal(vj.data_to_pixels(jnp.asarray(x), grid=grid), pixels)
        log_p.append(model_log_density(sched, 0.0, x)[0])
    log_p = np.array(log_p)
    scale = -1 / (D * np.log(2))
    bpd = scale * (log_p.mean(0) + np.log(width).sum(-1))
    bpd_iw = scale * (np.log(np.mean(np.exp(log_p), 0)) + np.log(width).sum(-1))
    np.testing.assert_allclose(out["bits_per_dim"], bpd, atol=1e-4)
    np.testing.assert_allclose(out["bits_per_dim_iw"], bpd_iw, atol=1e-4)
    assert np.all(np.asarray(out["bits_per_dim_iw"]) < np.asarray(out["bits_per_dim"]))
    one = vj.dequantized_bits_per_dim(optimal_pred(sched), sched, pixels, key=key, grid=grid)
    np.testing.assert_allclose(one["bits_per_dim_iw"], one["bits_per_dim"], rtol=1e-12)
    assert np.all(np.asarray(out["nfe"]) > np.asarray(one["nfe"]))


def test_steps_and_network_evaluations(optimal_pred):
    """num_steps and nfe are positive integers, nfe = 6 num_steps + 1 (7-stage, first-same-as-last;
    here the first step is accepted) is the number of pred_fn calls, a looser tolerance takes fewer
    steps, and each example takes its own steps: alone, it gets the same values (float32, the
    default dtype)."""
    sched = vj.LinearSchedule(-13.3, 5.0)
    x = jnp.asarray(POINTS, jnp.float32)
    tight, loose = (likelihood(optimal_pred(sched), sched, x, rtol=tol, atol=tol, divergence="exact")
                    for tol in (1e-5, 1e-3))
    for out in (tight, loose):
        assert out["num_steps"].dtype == jnp.int32 and out["nfe"].dtype == jnp.int32
        assert np.all(np.asarray(out["num_steps"]) > 0)
        np.testing.assert_array_equal(out["nfe"], 6 * np.asarray(out["num_steps"]) + 1)
    assert np.all(np.asarray(loose["num_steps"]) < np.asarray(tight["num_steps"]))
    np.testing.assert_allclose(tight["log_likelihood"], model_log_density(sched, 0.0, POINTS)[0], rtol=2e-4, atol=1e-3)
    calls = []

    def counted(z, t):
        jax.debug.callback(lambda: calls.append(1))
        return optimal_pred(sched)(z, t)

    alone = likelihood(counted, sched, x[3:], rtol=1e-5, atol=1e-5, divergence="exact")
    jax.effects_barrier()
    assert len(calls) == int(alone["nfe"][0]), (len(calls), alone["nfe"])
    np.testing.assert_array_equal(alone["num_steps"][0], tight["num_steps"][3])
    np.testing.assert_allclose(alone["log_likelihood"][0], tight["log_likelihood"][3], rtol=1e-5)
    # Other examples (far in the tails, taking more steps) leave example 0's values as they were.
    others = likelihood(optimal_pred(sched), sched, x.at[1:].multiply(40.0), divergence="exact")
    assert np.max(np.asarray(others["num_steps"])) > int(tight["num_steps"][0])  # its loop runs on
    for name in ("log_likelihood", "num_steps", "nfe"):
        np.testing.assert_array_equal(others[name][0], tight[name][0])
    dopri = likelihood(optimal_pred(sched), sched, x, solver="dopri5", divergence="exact")
    np.testing.assert_allclose(dopri["log_likelihood"], model_log_density(sched, 0.0, POINTS)[0], rtol=2e-4, atol=1e-3)
    np.testing.assert_array_equal(dopri["nfe"], 6 * np.asarray(dopri["num_steps"]) + 1)
    assert not np.array_equal(dopri["num_steps"], tight["num_steps"])  # a different method


def test_vmap_over_batches(optimal_pred):
    """jax.vmap of ode_log_likelihood over a stack of batches equals one call per batch (float32)."""
    sched = vj.DiscreteSchedule(vj.linear_betas(1000))
    x = jnp.asarray(POINTS, jnp.float32)
    f = lambda x, key: vj.ode_log_likelihood(optimal_pred(sched), sched, x, key=key, t_min=1e-3)
    stacked = jax.jit(jax.vmap(f))(jnp.stack([x, x[::-1]]), jnp.stack([KEY, KEY]))
    np.testing.assert_allclose(stacked["log_likelihood"][1], stacked["log_likelihood"][0][::-1], rtol=1e-5)
    np.testing.assert_allclose(stacked["log_likelihood"][0], model_log_density(sched, 1e-3, POINTS)[0],
                               rtol=1e-4, atol=1e-3)


def test_max_steps_exhausted_gives_nan(optimal_pred):
    sched = vj.LinearSchedule(-13.3, 5.0)
    out = likelihood(optimal_pred(sched), sched, jnp.asarray(POINTS, jnp.float32), max_steps=3)
    assert np.all(np.isnan(np.asarray(out["log_likelihood"]))) and np.all(np.asarray(out["num_steps"]) == 3)


CONT, DISC = vj.LinearSchedule(), vj.DiscreteSchedule(vj.linear_betas(10))
X = jnp.zeros((2, 3))
PIX = jnp.zeros((2, 3), jnp.int32)


def _identity(z, t):
    return z


ERRORS = {
    vj.ode_log_likelihood: [
        ((_identity, CONT, X), {"key": KEY, "divergence": "trace"}, ValueError,
         "ode_log_likelihood: divergence must be one of 'hutchinson' or 'exact', got 'trace'"),
        ((_identity, CONT, X), {"key": KEY, "probe": "normal"}, ValueError,
         "ode_log_likelihood: probe must be one of 'rademacher' or 'gaussian', got 'normal'"),
        ((_identity, CONT, X), {"key": KEY, "solver": "euler"}, ValueError,
         "ode_log_likelihood: solver must be one of 'tsit5' or 'dopri5', got 'euler'"),
        ((_identity, CONT, X), {"key": KEY, "kind": "noise"}, ValueError, "kind must be one of"),
        ((_identity, CONT, X), {"key": KEY, "num_probes": 0}, ValueError, "ode_log_likelihood: num_probes must be an int >= 1, got 0"),
        ((_identity, CONT, X), {"key": KEY, "num_probes": 2.0}, ValueError, "num_probes must be an int >= 1, got 2.0"),
        ((_identity, CONT, X), {"key": KEY, "max_steps": 0}, ValueError, "max_steps must be an int >= 1, got 0"),
        ((_identity, CONT, X), {"key": KEY, "t_min": 1.0}, ValueError, r"ode_log_likelihood: t_min must be a real number in \[0, 1\), got 1.0"),
        ((_identity, CONT, X), {"key": KEY, "t_min": -0.1}, ValueError, r"t_min must be a real number in \[0, 1\), got -0.1"),
        ((_identity, CONT, X), {"key": KEY, "t_min": np.zeros(2)}, TypeError, "t_min must be a scalar time"),
        ((_identity, CONT, X), {"key": KEY, "t_min": "0"}, ValueError, "t_min must be a real number in"),
        ((_identity, DISC, X), {"key": KEY}, ValueError,
         r"ode_log_likelihood: t_min must be > 0 with a DiscreteSchedule: its γ\(0\) = -inf .* e.g. t_min=1e-3"),
        ((_identity, CONT, X), {"key": KEY, "rtol": 0.0}, ValueError, r"rtol must be a real number in \(0, inf\), got 0.0"),
        ((_identity, CONT, X), {"key": KEY, "atol": "small"}, ValueError, "atol must be a real number in .*, got 'small'"),
        ((_identity, CONT, jnp.zeros((2, 3), jnp.int32)), {"key": KEY}, ValueError,
         r"ode_log_likelihood: x must be a floating array \[B, ...\] with a leading batch axis, got int32"),
        ((_identity, CONT, jnp.zeros(())), {"key": KEY}, ValueError, r"x must be a floating array .*got float32 of shape \(\)"),
        ((lambda z, t: z[:, :1], CONT, X), {"key": KEY}, ValueError,
         r"pred_fn must return a prediction of z_t's shape \(2, 3\), got \(2, 1\)"),
        ((_identity, CONT, X, KEY), {}, TypeError, "takes 3 positional arguments but 4 were given"),
    ],
    vj.dequantized_bits_per_dim: [
        ((_identity, CONT, PIX), {"key": KEY, "grid": "png"}, ValueError,
         "dequantized_bits_per_dim: grid must be one of 'ddpm' or 'vdm', got 'png'"),
        ((_identity, CONT, PIX), {"key": KEY, "num_draws": 0}, ValueError, "dequantized_bits_per_dim: num_draws must be an int >= 1, got 0"),
        ((_identity, CONT, np.array([[0, 256]])), {"key": KEY}, ValueError,
         r"pixels must be an integer array \[B, ...\] in 0..255, got \[\[0, 256\]\]"),
        ((_identity, CONT, X), {"key": KEY}, ValueError, "pixels must be an integer array .*, got float32"),
        ((_identity, CONT, jnp.zeros((), jnp.int32)), {"key": KEY}, ValueError, r"pixels must be an integer array \[B, ...\] in 0..255, got int32 of shape \(\)"),
        ((_identity, CONT, PIX), {"key": KEY, "divergence": "trace"}, ValueError,
         "ode_log_likelihood: divergence must be one of 'hutchinson' or 'exact'"),
        ((_identity, DISC, PIX), {"key": KEY}, ValueError,
         "ode_log_likelihood: t_min must be > 0 with a DiscreteSchedule"),
        ((_identity, CONT, PIX), {"key": KEY, "steps": 10}, TypeError,
         "got an unexpected keyword argument 'steps'"),
        ((_identity, CONT, PIX), {"key": KEY, "x": X}, TypeError, "got multiple values for argument 'x'"),
    ],
}
CASES = [(fn, *row) for fn, rows in ERRORS.items() for row in rows]


@pytest.mark.parametrize("fn, args, kwargs, error, match", CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_bad_arguments(fn, args, kwargs, error, match, raises):
    raises(fn, args, kwargs, error, match)
