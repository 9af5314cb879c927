"""Forward process, posterior and conversions (docs/math.md §2-4)."""
import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import vdm_jax as vj

N_MC = 200_000


def test_q_sample_monte_carlo_moments(dtype):
    """z_t = α x + σ ε has mean α x and variance σ² (docs/math.md §2), for ≥ 1e5 draws."""
    x = jnp.asarray([-0.7, 0.0, 0.4, 1.0], dtype)
    gamma = jnp.asarray(1.3, dtype)
    eps = jax.random.normal(jax.random.key(0), (N_MC, 4), dtype)
    z = jax.jit(vj.q_sample)(jnp.broadcast_to(x, (N_MC, 4)), eps, gamma)
    alpha, sigma = (float(v) for v in vj.alpha_sigma(gamma))
    se_mean = sigma / np.sqrt(N_MC)
    np.testing.assert_allclose(z.mean(0), alpha * np.asarray(x), atol=5 * se_mean)
    np.testing.assert_allclose(z.var(0), sigma ** 2, rtol=5 * np.sqrt(2 / N_MC))


def test_q_sample_per_example_gamma():
    x = jnp.ones((3, 2, 2, 1))
    eps = jnp.zeros_like(x)
    gamma = jnp.array([-5.0, 0.0, 5.0])
    z = jax.jit(vj.q_sample)(x, eps, gamma)
    alpha, _ = vj.alpha_sigma(gamma)
    np.testing.assert_allclose(z[:, 0, 0, 0], alpha, rtol=1e-6)


@pytest.mark.parametrize("t", [1, 10, 500, 1000])
def test_q_step_chain_matches_closed_form(t):
    """Running the one-step chain t times gives q(z_t | x)'s moments (docs/math.md §2)."""
    sched = vj.DiscreteSchedule(vj.linear_betas(1000))
    x0 = 0.8
    n = 100_000

    @jax.jit
    def chain(key):
        def step(z, inputs):
            beta, k = inputs
            return vj.q_step(z, jax.random.normal(k, z.shape), beta), None
        keys = jax.random.split(key, t)
        z, _ = jax.lax.scan(step, jnp.full((n, 1), x0), (sched.betas[:t], keys))
        return z

    z = np.asarray(chain(jax.random.key(t)), np.float64)
    alpha, sigma = (float(v) for v in vj.alpha_sigma(sched.gamma_step(t)))
    np.testing.assert_allclose(z.mean(), alpha * x0, atol=5 * sigma / np.sqrt(n))
    np.testing.assert_allclose(z.var(), sigma ** 2, rtol=5 * np.sqrt(2 / n))


def test_q_step_chain_moments_exact(x64):
    """The chain's mean factor ∏√α_s and variance recursion v ← α v + β equal ᾱ_t, 1 - ᾱ_t exactly."""
    sched = vj.DiscreteSchedule(vj.linear_betas(1000))
    mean, var = np.float64(1.0), np.float64(0.0)
    for t in range(1, 1001):
        beta = float(sched.betas[t - 1])
        # one step applied to a point mass moves (mean, var) like this; compare with q_step's action
        z = vj.q_step(jnp.array([[mean]]), jnp.array([[0.0]]), beta)
        mean, var = float(z[0, 0]), (1 - beta) * var + beta
        if t in (1, 10, 500, 1000):
            alpha, sigma = vj.alpha_sigma(sched.gamma_step(t))
            np.testing.assert_allclose(mean, float(alpha), rtol=1e-12)
            np.testing.assert_allclose(var, float(sigma) ** 2, rtol=1e-10)


def _bayes_posterior(x, z_t, gs, gt):
    """q(z_s | z_t, x) ∝ q(z_s | x) q(z_t | z_s), by completing the square, in float64 NumPy."""
    a2s, a2t = 1 / (1 + np.exp(gs)), 1 / (1 + np.exp(gt))
    s2s, s2t = 1 - a2s, 1 - a2t
    a_ts2 = a2t / a2s
    s2_ts = s2t - a_ts2 * s2s
    precision = 1 / s2s + a_ts2 / s2_ts
    var = 1 / precision
    mean = var * (np.sqrt(a2s) * x / s2s + np.sqrt(a_ts2) * z_t / s2_ts)
    return mean, var


def test_posterior_equals_bayes_for_random_s_t(dtype):
    rng = np.random.default_rng(0)
    B = 256
    g = np.sort(rng.uniform(-12.0, 8.0, size=(2, B)), axis=0)
    g[1] += 1e-2  # s < t strictly
    gs, gt = g
    x = rng.uniform(-1, 1, size=(B, 3))
    z = rng.normal(size=(B, 3))
    mean, var = jax.jit(vj.q_posterior)(*(jnp.asarray(a, dtype) for a in (x, z, gs, gt)))
    ref_mean, ref_var = _bayes_posterior(x, z, gs[:, None], gt[:, None])
    rtol = 1e-4 if dtype == jnp.float32 else 1e-9
    assert var.shape == (B, 1)  # broadcast per example, like the mean's coefficients
    np.testing.assert_allclose(var, ref_var, rtol=rtol)
    np.testing.assert_allclose(mean, ref_mean, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("betas_fn", [vj.linear_betas, vj.cosine_betas])
def test_posterior_reduces_to_ddpm(betas_fn, dtype):
    """s = t - 1 gives μ̃_t and β̃_t of docs/math.md §3, computed here from β directly."""
    sched = vj.DiscreteSchedule(betas_fn(1000), dtype=dtype)
    b = np.asarray(betas_fn(1000) if dtype == jnp.float64 else sched.betas, np.float64)
    abar = np.cumprod(1 - b)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    t = np.arange(1, 1001)
    x = np.linspace(-1, 1, 1000)[:, None]
    z = np.cos(np.arange(1000))[:, None]
    mu_ref = (np.sqrt(abar_prev) * b / (1 - abar))[:, None] * x + (np.sqrt(1 - b) * (1 - abar_prev) / (1 - abar))[:, None] * z
    var_ref = b * (1 - abar_prev) / (1 - abar)
    mean, var = jax.jit(vj.q_posterior)(jnp.asarray(x, dtype), jnp.asarray(z, dtype),
                                        sched.gamma_step(jnp.asarray(t - 1)), sched.gamma_step(jnp.asarray(t)))
    rtol = 2e-4 if dtype == jnp.float32 else 1e-9
    np.testing.assert_allclose(var[:, 0], var_ref, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(mean, mu_ref, rtol=rtol, atol=rtol)
    # t = 1: β̃_1 = 0 and μ̃_1 = x exactly.
    assert float(var[0, 0]) == 0.0
    np.testing.assert_allclose(mean[0], x[0], rtol=1e-6)


def test_posterior_continuous_edge_t1_s0():
    sched = vj.LinearSchedule()
    x = jnp.full((2, 4), 0.3)
    z = jnp.full((2, 4), -0.2)
    mean, var = vj.q_posterior(x, z, sched(jnp.float32(0.0)), sched(jnp.float32(1.0)))
    assert np.all(np.isfinite(mean)) and np.isfinite(var) and var > 0


def test_conversions_round_trip(dtype):
    key = jax.random.key(1)
    kx, ke = jax.random.split(key)
    B = 64
    x = jax.random.uniform(kx, (B, 4, 4, 3), dtype, -1, 1)
    eps = jax.random.normal(ke, x.shape, dtype)
    gamma = jnp.linspace(-15, 15, B, dtype=dtype)
    z = vj.q_sample(x, eps, gamma)
    rtol = 2e-3 if dtype == jnp.float32 else 1e-9

    @jax.jit
    def conversions(z, x, eps, gamma):
        return dict(
            x=vj.x_from_eps(z, eps, gamma), eps=vj.eps_from_x(z, x, gamma),
            eps_score=vj.eps_from_score(vj.score_from_eps(eps, gamma), gamma),
            eps_v=vj.eps_from_v(z, vj.v_from_eps(z, eps, gamma), gamma),
            x_v=vj.x_from_v(z, vj.v_from_eps(z, eps, gamma), gamma))

    out = conversions(z, x, eps, gamma)
    for name, value in out.items():
        assert np.all(np.isfinite(value)), name
    # x from ε is ill-conditioned where α is tiny (γ = 15: error × σ/α ≈ 1800), ε from x where σ is.
    mid = np.abs(np.asarray(gamma)) <= 8
    np.testing.assert_allclose(out["x"][mid], x[mid], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(out["eps"][mid], eps[mid], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(out["eps_score"], eps, rtol=1e-6 if dtype == jnp.float32 else 1e-13)
    np.testing.assert_allclose(out["eps_v"], eps, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(out["x_v"][mid], x[mid], rtol=rtol, atol=rtol)
    # v = α ε - σ x (its definition)
    alpha, sigma = vj.alpha_sigma(gamma)
    v = vj.v_from_eps(z, eps, gamma)
    np.testing.assert_allclose(v[mid], (alpha[:, None, None, None] * eps - sigma[:, None, None, None] * x)[mid],
                               rtol=rtol, atol=rtol)


@pytest.mark.parametrize("kind", ["eps", "x", "score", "v"])
def test_eps_and_x_from_any_kind(kind, x64):
    x = jnp.linspace(-1, 1, 24, dtype=jnp.float64).reshape(2, 12)
    eps = jnp.sin(jnp.arange(24.0)).reshape(2, 12)
    gamma = jnp.array([-3.0, 2.0])
    z = vj.q_sample(x, eps, gamma)
    pred = dict(eps=eps, x=x, score=vj.score_from_eps(eps, gamma), v=vj.v_from_eps(z, eps, gamma))[kind]
    e, xx = vj.eps_and_x(pred, z, gamma, kind=kind)
    np.testing.assert_allclose(e, eps, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(xx, x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(vj.prediction_target(x, eps, gamma, kind=kind), pred, rtol=1e-10, atol=1e-12)


def test_prediction_target_closed_forms(dtype):
    """ε, x, v = α ε - σ x, score = -ε/σ (docs/math.md §4), per example, under jit."""
    x = jnp.linspace(-1, 1, 12, dtype=dtype).reshape(3, 2, 2)
    eps = jnp.cos(jnp.arange(12, dtype=dtype)).reshape(3, 2, 2)
    gamma = jnp.asarray([-4.0, 0.5, 6.0], dtype)
    a, s = (np.asarray(v, np.float64)[:, None, None] for v in vj.alpha_sigma(gamma))
    target = jax.jit(vj.prediction_target, static_argnames="kind")
    rtol = 1e-6 if dtype == jnp.float32 else 1e-13
    np.testing.assert_allclose(target(x, eps, gamma, kind="eps"), eps, rtol=rtol)
    np.testing.assert_allclose(target(x, eps, gamma, kind="x"), x, rtol=rtol)
    np.testing.assert_allclose(target(x, eps, gamma, kind="v"), a * eps - s * x, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(target(x, eps, gamma, kind="score"), -eps / s, rtol=rtol)


def test_tweedie():
    """E[α x | z_t] = z_t + σ² ∇log p(z_t) for Gaussian data (docs/math.md §4), with the exact score."""
    m, s, gamma = 0.5, 0.3, 0.7
    alpha, sigma = (float(v) for v in vj.alpha_sigma(jnp.float32(gamma)))
    z = jnp.linspace(-2, 2, 9)[:, None]
    score = -(z - alpha * m) / (alpha ** 2 * s ** 2 + sigma ** 2)  # ∇ log N(z; α m, α² s² + σ²)
    posterior_mean_x = m + alpha * s ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2) * (z - alpha * m)
    np.testing.assert_allclose(alpha * posterior_mean_x, z + sigma ** 2 * score, rtol=1e-5, atol=1e-6)
    eps_hat = vj.eps_from_score(score, jnp.float32(gamma))
    np.testing.assert_allclose(vj.x_from_eps(z, eps_hat, jnp.float32(gamma)), posterior_mean_x, rtol=1e-5, atol=1e-6)


def test_no_nan_at_extreme_gamma_float32():
    x = jnp.full((4, 3), 0.5, jnp.float32)
    eps = jnp.full((4, 3), -1.2, jnp.float32)
    gamma = jnp.array([-15.0, -14.9, 14.9, 15.0], jnp.float32)
    z = vj.q_sample(x, eps, gamma)
    for value in (z, vj.x_from_eps(z, eps, gamma), vj.eps_from_x(z, x, gamma), vj.score_from_eps(eps, gamma),
                  vj.v_from_eps(z, eps, gamma), *vj.q_posterior(x, z, gamma - 0.5, gamma)):
        assert np.all(np.isfinite(value))


def test_jitted_q_sample_traces_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, eps, g):
        return vj.q_sample(x, eps, g)

    f(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.zeros((2,)))
    f(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.ones((2,)))


# --- bad input ---------------------------------------------------------------------------------
# The formulas check nothing but what would otherwise be wrong math: a per-example γ whose batch
# does not match the data's, and a kind they don't know. (fn, args, kwargs, error, message regex);
# each row is checked eagerly and under jax.jit.

X = jnp.ones((4, 2))
G3 = jnp.zeros((3,))
_BATCH = r"a per-example value must be a scalar or \[B\] = \[4\] \(the data's batch axis\), got shape \(3,\)"

ERRORS = {
    vj.q_sample: [((X, X, G3), {}, ValueError, _BATCH)],
    vj.q_step: [((X, X, G3), {}, ValueError, _BATCH)],
    vj.q_posterior: [((X, X, jnp.zeros((3,)), jnp.ones((3,))), {}, ValueError, _BATCH)],
    vj.x_from_eps: [((X, X, G3), {}, ValueError, _BATCH)],
    vj.score_from_eps: [((X, G3), {}, ValueError, _BATCH)],
    vj.eps_and_x: [((X, X, 0.0), {"kind": "noise"}, ValueError,
                    "eps_and_x: kind must be one of 'eps', 'x', 'score' or 'v', got 'noise'")],
    vj.prediction_target: [((X, X, 0.0), {"kind": "noise"}, ValueError, "prediction_target: kind must be one of")],
}
CASES = [(fn, *row) for fn, rows in ERRORS.items() for row in rows]


@pytest.mark.parametrize("fn, args, kwargs, error, match", CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_bad_arguments(fn, args, kwargs, error, match, raises):
    raises(fn, args, kwargs, error, match)


def test_device_values_are_not_checked(no_host_reads):
    """Values of jax.Arrays are never read back: β > 1 gives NaN, γ_s > γ_t a negative variance
    (so a draw mean + sqrt(var) ε is NaN), not an error."""
    x = jax.device_put(jnp.ones((2, 2)))
    with no_host_reads():
        z = vj.q_step(x, x, jax.device_put(jnp.array([0.5, 1.5])))
        mean, var = vj.q_posterior(x, x, jax.device_put(jnp.array([0.0, 2.0])), jax.device_put(jnp.array([1.0, 1.0])))
    assert np.all(np.isfinite(z[0])) and np.all(np.isnan(z[1]))
    assert var[0, 0] > 0 and var[1, 0] < 0 and np.all(np.isnan(mean[1] + jnp.sqrt(var[1]) * x[1]))
