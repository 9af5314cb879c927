"""Forward process, posterior and conversions (MATH.md §2-4)."""
import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import vdm_jax as vj

N_MC = 200_000


def test_q_sample_monte_carlo_moments(dtype):
    """z_t = α x + σ ε has mean α x and variance σ² (MATH.md §2), for ≥ 1e5 draws."""
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
    """Running the one-step chain t times gives q(z_t | x)'s moments (MATH.md §2)."""
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
    alpha, sigma = (float(v) for v in vj.alpha_sigma(sched.gamma(t)))
    np.testing.assert_allclose(z.mean(), alpha * x0, atol=5 * sigma / np.sqrt(n))
    np.testing.assert_allclose(z.var(), sigma ** 2, rtol=5 * np.sqrt(2 / n))


def test_q_step_chain_moments_exact(x64):
    """The chain's mean factor ∏√α_s and variance recursion v ← α v + β equal ᾱ_t, 1 - ᾱ_t exactly."""
    sched = vj.DiscreteSchedule(vj.linear_betas(1000, dtype=jnp.float64))
    mean, var = np.float64(1.0), np.float64(0.0)
    for t in range(1, 1001):
        beta = float(sched.betas[t - 1])
        # one step applied to a point mass moves (mean, var) like this; compare with q_step's action
        z = vj.q_step(jnp.array([[mean]]), jnp.array([[0.0]]), beta)
        mean, var = float(z[0, 0]), (1 - beta) * var + beta
        if t in (1, 10, 500, 1000):
            alpha, sigma = vj.alpha_sigma(sched.gamma(t))
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
    np.testing.assert_allclose(var, ref_var[:, 0], rtol=rtol)
    np.testing.assert_allclose(mean, ref_mean, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("betas_fn", [vj.linear_betas, vj.cosine_betas])
def test_posterior_reduces_to_ddpm(betas_fn, dtype):
    """s = t - 1 gives μ̃_t and β̃_t of MATH.md §3, computed here from β directly."""
    sched = vj.DiscreteSchedule(betas_fn(1000, dtype=dtype))
    b = np.asarray(betas_fn(1000, dtype=jnp.float64) if dtype == jnp.float64 else sched.betas, np.float64)
    abar = np.cumprod(1 - b)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    t = np.arange(1, 1001)
    x = np.linspace(-1, 1, 1000)[:, None]
    z = np.cos(np.arange(1000))[:, None]
    mu_ref = (np.sqrt(abar_prev) * b / (1 - abar))[:, None] * x + (np.sqrt(1 - b) * (1 - abar_prev) / (1 - abar))[:, None] * z
    var_ref = b * (1 - abar_prev) / (1 - abar)
    mean, var = jax.jit(vj.q_posterior)(jnp.asarray(x, dtype), jnp.asarray(z, dtype),
                                        sched.gamma(jnp.asarray(t - 1)), sched.gamma(jnp.asarray(t)))
    rtol = 2e-4 if dtype == jnp.float32 else 1e-9
    np.testing.assert_allclose(var, var_ref, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(mean, mu_ref, rtol=rtol, atol=rtol)
    # t = 1: β̃_1 = 0 and μ̃_1 = x exactly.
    assert float(var[0]) == 0.0
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
    e, xx = vj.eps_and_x(pred, z, gamma, kind)
    np.testing.assert_allclose(e, eps, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(xx, x, rtol=1e-10, atol=1e-12)


def test_tweedie():
    """E[α x | z_t] = z_t + σ² ∇log p(z_t) for Gaussian data (MATH.md §4), with the exact score."""
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


# --- bad input -------------------------------------------------------------------------------

def test_gamma_batch_mismatch():
    with pytest.raises(ValueError, match=r"gamma_t must be a scalar or have shape \[B\] = \[4\]"):
        vj.q_sample(jnp.ones((4, 2)), jnp.ones((4, 2)), jnp.zeros((3,)))
    with pytest.raises(ValueError, match="gamma_t must be a scalar or have shape"):
        vj.q_sample(jnp.ones((4, 2)), jnp.ones((4, 2)), jnp.zeros((4, 2)))


def test_x_eps_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape, got x \(4, 2\), eps \(4, 3\)"):
        vj.q_sample(jnp.ones((4, 2)), jnp.ones((4, 3)), 0.0)


def test_shape_checked_inside_jit():
    with pytest.raises(ValueError, match="gamma_s/gamma_t must be a scalar or have shape"):
        jax.jit(vj.q_posterior)(jnp.ones((4, 2)), jnp.ones((4, 2)), jnp.zeros((5,)), jnp.ones((5,)))


def test_integer_data_rejected():
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        vj.q_sample(jnp.ones((2, 2), jnp.int32), jnp.ones((2, 2)), 0.0)


def test_q_step_beta_out_of_range():
    with pytest.raises(ValueError, match=r"beta_t must lie in \[0, 1\]; got values in \[1.5, 1.5\]"):
        vj.q_step(jnp.ones((2, 2)), jnp.ones((2, 2)), 1.5)


CONVERSIONS = [vj.x_from_eps, vj.eps_from_x, vj.v_from_eps, vj.eps_from_v, vj.x_from_v]


@pytest.mark.parametrize("fn", CONVERSIONS, ids=lambda f: f.__name__)
def test_conversions_check_shapes_and_dtypes_inside_jit(fn):
    second = fn.__code__.co_varnames[1]  # eps, x or v
    with pytest.raises(ValueError, match=rf"same shape, got z_t \(2, 2\), {second} \(2, 3\)"):
        jax.jit(fn)(jnp.ones((2, 2)), jnp.ones((2, 3)), 0.0)
    with pytest.raises(TypeError, match="z_t must be a floating-point array, got dtype int32"):
        jax.jit(fn)(jnp.ones((2, 2), jnp.int32), jnp.ones((2, 2)), 0.0)
    with pytest.raises(TypeError, match=rf"{second} must be a floating-point array, got dtype int32"):
        jax.jit(fn)(jnp.ones((2, 2)), jnp.ones((2, 2), jnp.int32), 0.0)


@pytest.mark.parametrize("fn, name", [(vj.score_from_eps, "eps"), (vj.eps_from_score, "score")])
def test_score_conversions_reject_integers(fn, name):
    with pytest.raises(TypeError, match=f"{name} must be a floating-point array"):
        jax.jit(fn)(jnp.ones((2, 2), jnp.int32), 0.0)


def test_eps_and_x_checks_z_t():
    with pytest.raises(TypeError, match="z_t must be a floating-point array"):
        jax.jit(vj.eps_and_x, static_argnums=3)(jnp.ones((2, 2)), jnp.ones((2, 2), jnp.int32), 0.0, "x")


@pytest.mark.parametrize("gamma_s, gamma_t", [(2.0, 1.0), (1.0, 1.0), (jnp.array([0.0, 3.0]), jnp.array([1.0, 2.0]))])
def test_q_posterior_needs_s_before_t(gamma_s, gamma_t):
    with pytest.raises(ValueError, match="gamma_s must be < gamma_t"):
        vj.q_posterior(jnp.ones((2, 2)), jnp.ones((2, 2)), gamma_s, gamma_t)


def test_gamma_that_is_not_an_array():
    with pytest.raises(TypeError, match="gamma_t must be a floating-point array, got str"):
        vj.q_sample(jnp.ones((2, 2)), jnp.ones((2, 2)), "1.0")


def test_unknown_prediction_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        vj.eps_and_x(jnp.ones((2, 2)), jnp.ones((2, 2)), 0.0, "noise")
