"""Losses (docs/math.md §5): the three equivalent objectives, KL forms, decoders, VDM's diffusion loss."""
import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from scipy import stats

import vdm_jax as vj

T = 1000


def _draws(dtype, B, D=8, seed=0, noise=1.0):
    kx, ke, kn = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.uniform(kx, (B, D), dtype, -1, 1)
    eps = jax.random.normal(ke, (B, D), dtype)
    eps_hat = eps + noise * jax.random.normal(kn, (B, D), dtype)
    return x, eps, eps_hat


def _three_losses(x, eps, eps_hat, gamma_s, gamma_t):
    z = vj.q_sample(x, eps, gamma_t)
    x_hat = vj.x_from_eps(z, eps_hat, gamma_t)
    score_hat = vj.score_from_eps(eps_hat, gamma_t)
    return (vj.x0_matching(x_hat, x, gamma_s, gamma_t), vj.eps_matching(eps_hat, eps, gamma_s, gamma_t),
            vj.score_matching(score_hat, eps, gamma_s, gamma_t))


@pytest.mark.parametrize("betas_fn", [vj.linear_betas, vj.cosine_betas])
def test_three_objectives_agree_discrete(betas_fn, dtype):
    """Acceptance 3: x0-, ε- and score-matching are one KL, for every t in 2..T."""
    sched = vj.DiscreteSchedule(betas_fn(T), dtype=dtype)
    t = jnp.arange(2, T + 1)
    x, eps, eps_hat = _draws(dtype, T - 1)
    lx, le, ls = jax.jit(_three_losses)(x, eps, eps_hat, sched.gamma_step(t - 1), sched.gamma_step(t))
    rtol = 1e-4 if dtype == jnp.float32 else 1e-10
    assert np.all(np.isfinite(le)) and np.all(le > 0)
    np.testing.assert_allclose(lx, le, rtol=rtol)
    np.testing.assert_allclose(ls, le, rtol=rtol)


def test_three_objectives_agree_continuous(dtype):
    sched = vj.LinearSchedule()
    t = jnp.arange(1, T + 1, dtype=dtype) / T
    x, eps, eps_hat = _draws(dtype, T, seed=1)
    lx, le, ls = jax.jit(_three_losses)(x, eps, eps_hat, sched(t - 1.0 / T), sched(t))
    rtol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(lx, le, rtol=rtol)
    np.testing.assert_allclose(ls, le, rtol=rtol)


def test_weights_are_math_md_ddpm_weights(x64):
    """The three weights equal docs/math.md §5's DDPM expressions, formed from β in NumPy."""
    b = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - b)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    var_q = b * (1 - abar_prev) / (1 - abar)
    t = np.arange(2, T + 1)
    i = t - 1
    w_x = abar_prev[i] * b[i] ** 2 / (1 - abar[i]) ** 2 / (2 * var_q[i])
    w_eps = b[i] ** 2 / ((1 - abar[i]) * (1 - b[i])) / (2 * var_q[i])
    w_score = b[i] ** 2 / (1 - b[i]) / (2 * var_q[i])
    sched = vj.DiscreteSchedule(vj.linear_betas(T))
    gs, gt = sched.gamma_step(jnp.asarray(t - 1)), sched.gamma_step(jnp.asarray(t))
    unit = jnp.zeros((T - 1, 1), jnp.float64)
    one = jnp.ones((T - 1, 1), jnp.float64)
    np.testing.assert_allclose(vj.x0_matching(one, unit, gs, gt), w_x, rtol=1e-9)
    np.testing.assert_allclose(vj.eps_matching(one, unit, gs, gt), w_eps, rtol=1e-9)
    # ‖ŝ - ∇log q‖² = 1 with ∇log q = -ε/σ_t: ŝ = 1 - ε/σ_t; take ε = 0.
    np.testing.assert_allclose(vj.score_matching(one, unit, gs, gt), w_score, rtol=1e-9)


def test_denoising_kl_with_posterior_variance_equals_eps_matching(dtype):
    sched = vj.DiscreteSchedule(vj.linear_betas(T), dtype=dtype)
    t = jnp.arange(2, T + 1)
    gs, gt = sched.gamma_step(t - 1), sched.gamma_step(t)
    x, eps, eps_hat = _draws(dtype, T - 1, seed=2)
    z = vj.q_sample(x, eps, gt)
    x_hat = vj.x_from_eps(z, eps_hat, gt)
    kl = jax.jit(vj.denoising_kl)(x_hat, x, z, gs, gt, vj.reverse_log_variance(gs, gt, kind="posterior"))
    rtol = 2e-4 if dtype == jnp.float32 else 1e-9
    np.testing.assert_allclose(kl, vj.eps_matching(eps_hat, eps, gs, gt), rtol=rtol)


def test_denoising_kl_beta_variance_matches_gaussian_kl(x64):
    sched = vj.DiscreteSchedule(vj.linear_betas(T))
    t = jnp.arange(2, T + 1, 37)
    gs, gt = sched.gamma_step(t - 1), sched.gamma_step(t)
    x, eps, eps_hat = _draws(jnp.float64, t.shape[0], seed=3)
    z = vj.q_sample(x, eps, gt)
    x_hat = vj.x_from_eps(z, eps_hat, gt)
    mu_q, var_q = vj.q_posterior(x, z, gs, gt)
    mu_p, _ = vj.q_posterior(x_hat, z, gs, gt)
    var_p = np.asarray(sched.betas)[np.asarray(t) - 1][:, None]
    var_q = np.asarray(var_q)
    ref = 0.5 * np.sum(np.log(var_p / var_q) + (var_q + (np.asarray(mu_q) - np.asarray(mu_p)) ** 2) / var_p - 1, axis=1)
    log_var = vj.reverse_log_variance(gs, gt, kind="beta")
    np.testing.assert_allclose(log_var, np.log(var_p[:, 0]), rtol=1e-10)
    np.testing.assert_allclose(vj.denoising_kl(x_hat, x, z, gs, gt, log_var), ref, rtol=1e-8)


def test_reverse_log_variance_learned_interpolates(x64):
    sched = vj.DiscreteSchedule(vj.linear_betas(T))
    t = jnp.arange(2, T + 1)
    gs, gt = sched.gamma_step(t - 1), sched.gamma_step(t)
    beta = vj.reverse_log_variance(gs, gt, kind="beta")
    tilde = vj.reverse_log_variance(gs, gt, kind="posterior")
    learned = jax.jit(vj.reverse_log_variance, static_argnames="kind")
    np.testing.assert_allclose(learned(gs, gt, kind="learned", v=jnp.ones_like(gs)), beta, rtol=1e-12)
    np.testing.assert_allclose(learned(gs, gt, kind="learned", v=jnp.zeros_like(gs)), tilde, rtol=1e-12)
    v = jnp.full((T - 1, 2, 2), 0.25)
    mixed = learned(gs, gt, kind="learned", v=v)
    np.testing.assert_allclose(mixed[:, 0, 0], 0.25 * beta + 0.75 * tilde, rtol=1e-12)
    # t = 1 (s = 0): β̃_1 = 0 is floored; no NaN for any v.
    for v1 in (0.0, 0.5, 1.0):
        out = vj.reverse_log_variance(sched.gamma_step(0), sched.gamma_step(1), kind="learned", v=jnp.full((1,), v1))
        assert np.all(np.isfinite(out))


def test_prior_loss_closed_form(dtype):
    x = jnp.linspace(-1, 1, 12, dtype=dtype).reshape(3, 4)
    gamma = jnp.asarray([-2.0, 5.0, 15.0], dtype)
    a2, s2 = jax.nn.sigmoid(-gamma)[:, None], jax.nn.sigmoid(gamma)[:, None]
    ref = np.sum(0.5 * (np.asarray(s2 + a2 * x ** 2 - 1, np.float64) - np.log(np.asarray(s2, np.float64))), axis=1)
    got = jax.jit(vj.prior_loss)(x, gamma)
    np.testing.assert_allclose(got, ref, rtol=1e-4 if dtype == jnp.float32 else 1e-10, atol=1e-7)
    assert np.all(got >= 0)


def test_ddpm_decoder_matches_scipy_and_normalises(x64):
    mean = jnp.array([[-1.0, -0.3, 0.0, 0.97, 1.2]], jnp.float64)
    log_var = jnp.log(jnp.array([1e-3], jnp.float64))
    pixels = jnp.array([[0, 89, 128, 251, 255]])
    nll = vj.ddpm_decoder_nll(mean, vj.pixels_to_data(pixels, dtype=jnp.float64), log_var)
    x = 2 * np.asarray(pixels, np.float64) / 255 - 1
    sd = np.sqrt(1e-3)
    lo = np.where(pixels == 0, -np.inf, x - 1 / 255)
    hi = np.where(pixels == 255, np.inf, x + 1 / 255)
    p = stats.norm.cdf(hi, np.asarray(mean), sd) - stats.norm.cdf(lo, np.asarray(mean), sd)
    np.testing.assert_allclose(nll, -np.log(p).sum(), rtol=1e-9)
    # Σ_k p(k) = 1 for each dimension.
    all_k = jnp.arange(256)[:, None]
    for m in (-1.3, -0.5, 0.0, 0.999, 3.0):
        nlls = vj.ddpm_decoder_nll(jnp.full((256, 1), m), vj.pixels_to_data(all_k), jnp.log(jnp.full((256,), 2e-4)))
        np.testing.assert_allclose(jax.scipy.special.logsumexp(-nlls), 0.0, atol=1e-9)


def test_ddpm_decoder_tails_and_gradient_finite():
    """Far tails (where 1 - Φ rounds to 0) give finite log-probabilities and gradients."""
    pixels = jnp.array([[0, 255, 128, 3]])
    mean = jnp.array([[0.9, -0.9, 0.6, -1.0]], jnp.float32)
    log_var = jnp.log(jnp.float32(1e-4))
    x = vj.pixels_to_data(pixels)
    nll, grad = jax.value_and_grad(lambda m: vj.ddpm_decoder_nll(m, x, log_var).sum())(mean)
    assert np.isfinite(nll) and np.all(np.isfinite(grad))
    assert nll > 1000  # the data are ~90 standard deviations away


def test_vdm_decoder_normalises_and_matches_formula(x64):
    gamma_0 = jnp.float64(-5.0)
    alpha_0 = float(vj.alpha_sigma(gamma_0)[0])
    z0 = jnp.full((256, 1), 0.1 * alpha_0, jnp.float64)
    nlls = vj.vdm_decoder_nll(z0, vj.pixels_to_data(jnp.arange(256)[:, None], grid="vdm", dtype=jnp.float64), gamma_0)
    np.testing.assert_allclose(jax.scipy.special.logsumexp(-nlls), 0.0, atol=1e-10)
    grid = 2 * (np.arange(256) + 0.5) / 256 - 1
    logits = -0.5 * (0.1 - grid) ** 2 / np.exp(-5.0)
    ref = -(logits - jax.scipy.special.logsumexp(logits))
    np.testing.assert_allclose(nlls, ref, rtol=1e-10)


def test_gaussian_decoder_matches_scipy(x64):
    x = jnp.array([[0.2, -0.5]], jnp.float64)
    z0 = jnp.array([[0.1, 0.4]], jnp.float64)
    g0 = jnp.float64(-3.0)
    a0 = float(vj.alpha_sigma(g0)[0])
    ref = -stats.norm.logpdf(np.asarray(x), np.asarray(z0) / a0, np.exp(-1.5)).sum()
    np.testing.assert_allclose(vj.gaussian_decoder_nll(z0, x, g0), ref, rtol=1e-10)


def test_vlb_term_is_decoder_at_first_step():
    sched = vj.DiscreteSchedule(vj.linear_betas(10))
    pixels = jnp.array([[0, 100, 255]])
    x = vj.pixels_to_data(pixels)
    z = vj.q_sample(x, jnp.zeros_like(x), sched.gamma_step(1))
    x_hat = x + 0.01
    lv = jnp.log(sched.betas[0])
    g = sched.gamma_step
    out = vj.vlb_term(x_hat, x, z, g(0), g(1), lv)
    np.testing.assert_allclose(out, vj.ddpm_decoder_nll(x_hat, x, lv), rtol=1e-6)
    kl = vj.vlb_term(x_hat, x, z, g(1), g(2), lv)
    np.testing.assert_allclose(kl, vj.denoising_kl(x_hat, x, z, g(1), g(2), lv), rtol=1e-6)
    # per example: step 1 and step 2 in one batch
    both = jnp.concatenate([x, x])
    out = jax.jit(vj.vlb_term)(jnp.concatenate([x_hat, x_hat]), both, jnp.concatenate([z, z]),
                               jnp.stack([g(0), g(1)]), jnp.stack([g(1), g(2)]), lv)
    ref = [jax.jit(vj.ddpm_decoder_nll)(x_hat, x, lv)[0], jax.jit(vj.denoising_kl)(x_hat, x, z, g(1), g(2), lv)[0]]
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert np.all(np.isfinite(out))


def test_diffusion_loss_discrete_is_T_times_eps_matching(dtype):
    """VDM's L_T term = T × the DDPM KL term with s = t - 1/T (docs/math.md §5)."""
    sched = vj.LinearSchedule()
    Ts = 100
    t = jnp.arange(1, Ts + 1, dtype=dtype) / Ts
    x, eps, eps_hat = _draws(dtype, Ts, seed=4)
    got = jax.jit(vj.diffusion_loss, static_argnums=3, static_argnames="T")(eps_hat, eps, t, sched, T=Ts)
    ref = Ts * vj.eps_matching(eps_hat, eps, sched(t - 1.0 / Ts), sched(t))
    np.testing.assert_allclose(got, ref, rtol=1e-5 if dtype == jnp.float32 else 1e-12)


def test_diffusion_loss_continuous_uses_exact_derivative(dtype):
    sched = vj.CosineSchedule()
    t = jnp.linspace(0.05, 0.95, 7, dtype=dtype)
    _, eps, eps_hat = _draws(dtype, 7, seed=5)
    got = jax.jit(vj.diffusion_loss, static_argnums=3)(eps_hat, eps, t, sched)
    u0 = 2 / np.pi * np.arctan(np.exp(-13.3 / 2))
    u1 = 2 / np.pi * np.arctan(np.exp(5.0 / 2))
    theta = np.pi / 2 * (u0 + (u1 - u0) * np.asarray(t, np.float64))
    dgamma = 2 * (np.pi / 2 * (u1 - u0)) / (np.sin(theta) * np.cos(theta))  # d/dt 2 log tan θ
    ref = 0.5 * dgamma * np.sum((np.asarray(eps) - np.asarray(eps_hat)) ** 2, axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-5 if dtype == jnp.float32 else 1e-10)


def test_simple_and_hybrid():
    eps = jnp.zeros((2, 3))
    eps_hat = jnp.ones((2, 3))
    np.testing.assert_allclose(vj.simple_loss(eps_hat, eps), [3.0, 3.0])
    vlb = jnp.array([0.5, 2.0])
    np.testing.assert_allclose(vj.hybrid_loss(eps_hat, eps, vlb, T=1000, lam=0.001), [3.5, 5.0])


def test_sample_times():
    t = vj.sample_times(8, key=jax.random.key(0))
    assert t.shape == (8,) and np.all((t >= 0) & (t < 1))
    gaps = np.diff(np.sort(np.asarray(t)))
    np.testing.assert_allclose(gaps, 1 / 8, rtol=1e-5)  # low discrepancy: evenly spread
    td = vj.sample_times(1000, key=jax.random.key(1), T=10, low_discrepancy=False)
    assert set(np.round(np.asarray(td) * 10).astype(int)) <= set(range(1, 11))


def test_bits_per_dim():
    np.testing.assert_allclose(vj.bits_per_dim(3072 * np.log(2.0), 3072), 1.0)


def test_jitted_loss_traces_once():
    sched = vj.DiscreteSchedule(vj.linear_betas(T))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(eps_hat, eps, t):
        return vj.eps_matching(eps_hat, eps, sched.gamma_step(t - 1), sched.gamma_step(t))

    loss(jnp.ones((4, 3)), jnp.zeros((4, 3)), jnp.array([2, 3, 4, 5]))
    loss(jnp.zeros((4, 3)), jnp.ones((4, 3)), jnp.array([9, 8, 7, 6]))


# --- bad input: the formulas check only a per-example batch that cannot broadcast and an unknown kind -----
# (fn, args, kwargs, error, message regex); each row is checked eagerly and under jax.jit.

X = jnp.ones((2, 3))
G3 = jnp.zeros((3,))
_BATCH = r"a per-example value must be a scalar or \[B\] = \[{}\] \(the data's batch axis\), got shape \({},\)"

ERRORS = {
    vj.x0_matching: [((X, X, G3, 1.0), {}, ValueError, _BATCH.format(2, 3))],
    vj.eps_matching: [((X, X, 0.0, G3), {}, ValueError, _BATCH.format(2, 3))],
    vj.score_matching: [((X, X, G3, 1.0), {}, ValueError, _BATCH.format(2, 3))],
    vj.reverse_log_variance: [
        ((0.0, 1.0), {"kind": "large"}, ValueError,
         "reverse_log_variance: kind must be 'posterior', 'beta' or 'learned' \\(with v\\), got 'large'"),
        ((0.0, 1.0), {"kind": "learned"}, ValueError, "got 'learned' without v"),
        ((jnp.zeros(2), jnp.ones(2)), {"kind": "learned", "v": jnp.ones((3, 4))}, ValueError, _BATCH.format(3, 2)),
    ],
    vj.denoising_kl: [((X, X, X, 0.0, 1.0, G3), {}, ValueError, _BATCH.format(2, 3))],
    vj.prior_loss: [((X, G3), {}, ValueError, _BATCH.format(2, 3))],
    vj.vdm_decoder_nll: [((X[:1], X[:1], jnp.zeros((2,))), {}, ValueError, _BATCH.format(1, 2))],
    vj.pixels_to_data: [((jnp.ones((2, 2), jnp.int32),), {"grid": "jpeg"}, ValueError,
                         "pixels_to_data: grid must be one of 'ddpm' or 'vdm', got 'jpeg'")],
    vj.data_to_pixels: [((jnp.ones((2, 2)),), {"grid": "jpeg"}, ValueError, "data_to_pixels: grid must be one of")],
}
CASES = [(fn, *row) for fn, rows in ERRORS.items() for row in rows]


@pytest.mark.parametrize("fn, args, kwargs, error, match", CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_bad_arguments(fn, args, kwargs, error, match, raises):
    raises(fn, args, kwargs, error, match)


def test_device_values_are_not_checked(no_host_reads):
    """jax.Array values are never read back: t outside [0, 1] gives NaN, pixels are clipped."""
    put = jax.device_put
    with no_host_reads():
        loss = vj.diffusion_loss(put(X), put(X * 0), put(jnp.array([0.5, 1.5])), vj.LinearSchedule(), T=10)
        x = vj.pixels_to_data(put(jnp.array([[0, 300]])))
        nll = vj.ddpm_decoder_nll(put(jnp.zeros((2, 3))), put(jnp.full((2, 3), 0.3)), 0.0)  # off the grid
    assert np.isfinite(loss[0]) and np.isnan(loss[1])
    assert x.shape == (1, 2) and np.all(np.isfinite(nll))
