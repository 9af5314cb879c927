"""The whole ELBO (MATH.md §5): the analytic Gaussian case and DDPM's full VLB."""
import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import vdm_jax as vj

M, S = 0.5, 0.3  # data x ~ N(M, S²) per dimension: a model that does nothing can't pass
ENTROPY = 0.5 * np.log(2 * np.pi * np.e * S ** 2)


def optimal_eps(gamma_fn):
    """The Bayes-optimal noise prediction for Gaussian data: σ (z - α m) / (α² s² + σ²)."""
    def pred(z, t):
        alpha, sigma = vj.alpha_sigma(gamma_fn(t))
        alpha, sigma = alpha[:, None], sigma[:, None]
        return sigma * (z - alpha * M) / (alpha ** 2 * S ** 2 + sigma ** 2)
    return pred


@pytest.mark.slow
def test_analytic_elbo_equals_entropy():
    """Acceptance 4: with the optimal predictor, VDM's continuous ELBO = h(N(m, s²)) per dimension.

    6e7 draws in chunks; the standard error comes from the spread of independent chunk means.
    On the first chunks' draws, the discrete-time ELBO falls toward it as T grows.
    """
    sched = vj.LinearSchedule(-13.3, 8.0)
    pred = optimal_eps(sched)
    B, n_chunks, n_discrete = 1_000_000, 60, 10

    @jax.jit
    def chunk(key):
        kx, ke = jax.random.split(key)
        x = M + S * jax.random.normal(kx, (B, 1))
        terms = vj.vdm_elbo(pred, x, ke, sched, T=0, decoder="gaussian")
        return terms["total"].mean(), {k: v.mean() for k, v in terms.items()}

    @jax.jit
    def discrete(key):
        kx, ke = jax.random.split(key)
        x = M + S * jax.random.normal(kx, (B, 1))
        return jnp.stack([vj.vdm_elbo(pred, x, ke, sched, T=T, decoder="gaussian")["total"].mean()
                          for T in (10, 100, 1000)])

    means = np.array([float(chunk(jax.random.key(i))[0]) for i in range(n_chunks)])
    elbo, se = means.mean(), means.std(ddof=1) / np.sqrt(n_chunks)
    assert se < 2e-3, se
    assert abs(elbo - ENTROPY) < 3 * se, (elbo, ENTROPY, se)

    by_T = np.mean([np.asarray(discrete(jax.random.key(i))) for i in range(n_discrete)], axis=0)
    cont = means[:n_discrete].mean()
    assert by_T[0] > by_T[1] > by_T[2] > cont, (by_T, cont)
    assert by_T[2] - cont < 0.1 * (by_T[1] - cont)


def test_elbo_terms_are_consistent():
    sched = vj.LinearSchedule(-13.3, 8.0)
    x = M + S * jax.random.normal(jax.random.key(0), (4096, 1))
    terms = jax.jit(lambda x, k: vj.vdm_elbo(optimal_eps(sched), x, k, sched, decoder="gaussian"))(
        x, jax.random.key(1))
    np.testing.assert_allclose(terms["total"], terms["prior"] + terms["diffusion"] + terms["reconstruction"],
                               rtol=1e-6)
    np.testing.assert_allclose(terms["prior"], vj.prior_loss(x, sched(jnp.float32(1.0))), rtol=1e-5)
    assert np.all(terms["prior"] > 0)


def test_vdm_elbo_on_pixels_with_vdm_decoder():
    sched = vj.LinearSchedule()
    pixels = jax.random.randint(jax.random.key(0), (8, 4, 4, 3), 0, 256)
    x = vj.pixels_to_data(pixels, grid="vdm")
    pred = lambda z, t: jnp.zeros_like(z)  # noqa: E731
    terms = jax.jit(lambda k: vj.vdm_elbo(pred, x, k, sched, pixels=pixels))(jax.random.key(2))
    for name in ("prior", "diffusion", "reconstruction", "total"):
        assert terms[name].shape == (8,) and np.all(np.isfinite(terms[name])), name
    bpd = vj.bits_per_dim(terms["total"], 4 * 4 * 3)
    assert np.all(bpd > 0)


def _gaussian_pixels(key, shape):
    """Integer pixels whose data values on the ddpm grid are ~ N(M, S²), clipped."""
    x = M + S * jax.random.normal(key, shape)
    return vj.data_to_pixels(x)


def test_ddpm_vlb_terms_and_optimal_predictor_beats_zero():
    sched = vj.DiscreteSchedule(vj.linear_betas(100, 1e-3, 0.2))
    pixels = _gaussian_pixels(jax.random.key(0), (512, 2))
    gamma_fn = lambda t: sched.gamma(t)  # noqa: E731

    @jax.jit
    def vlb(pixels, key):
        return (vj.ddpm_vlb(optimal_eps(gamma_fn), pixels, key, sched),
                vj.ddpm_vlb(lambda z, t: jnp.zeros_like(z), pixels, key, sched))

    good, zero = vlb(pixels, jax.random.key(1))
    assert good["denoising"].shape == (512, 99)
    np.testing.assert_allclose(good["total"], good["prior"] + good["denoising"].sum(1) + good["reconstruction"],
                               rtol=1e-5)
    assert np.all(good["denoising"] >= 0)
    # A prediction of zero noise is far worse than the optimal one.
    assert good["total"].mean() < zero["total"].mean() - 1.0
    # A bound on the discrete data's entropy: above it, and not far above it (T = 100 is coarse).
    from scipy import stats
    edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) * 2 / 255 - 1, [np.inf]])
    p = np.diff(stats.norm.cdf(edges, M, S))
    entropy_bits = -np.sum(p[p > 0] * np.log2(p[p > 0]))
    bpd = float(vj.bits_per_dim(good["total"].mean(), 2))
    assert entropy_bits < bpd < entropy_bits + 2.0, (bpd, entropy_bits)


def test_ddpm_vlb_matches_single_terms():
    """Each scanned term equals `vlb_term` computed alone on the same noise."""
    sched = vj.DiscreteSchedule(vj.linear_betas(20, 1e-3, 0.3))
    pixels = _gaussian_pixels(jax.random.key(3), (16, 3))
    key = jax.random.key(4)
    pred = optimal_eps(lambda t: sched.gamma(t))
    out = vj.ddpm_vlb(pred, pixels, key, sched, variance="beta")
    x = vj.pixels_to_data(pixels)
    for t in (2, 11, 20):
        eps = jax.random.normal(jax.random.fold_in(key, t), x.shape)
        z = vj.q_sample(x, eps, sched.gamma(t))
        x_hat = vj.x_from_eps(z, pred(z, jnp.full((16,), t)), sched.gamma(t))
        ref = vj.denoising_kl(x, z, x_hat, sched.gamma(t - 1), sched.gamma(t),
                              vj.reverse_log_variance(sched.gamma(t - 1), sched.gamma(t), "beta"))
        np.testing.assert_allclose(out["denoising"][:, t - 2], ref, rtol=1e-5, atol=1e-6)
    eps = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    z = vj.q_sample(x, eps, sched.gamma(1))
    x_hat = vj.x_from_eps(z, pred(z, jnp.full((16,), 1)), sched.gamma(1))
    np.testing.assert_allclose(out["reconstruction"], vj.ddpm_decoder_nll(pixels, x_hat, jnp.log(sched.betas[0])),
                               rtol=1e-5, atol=1e-6)


def test_ddpm_vlb_learned_variance():
    sched = vj.DiscreteSchedule(vj.linear_betas(10, 1e-3, 0.3))
    pixels = _gaussian_pixels(jax.random.key(5), (8, 2))
    pred = lambda z, t: (jnp.zeros_like(z), jnp.full_like(z, 0.5))  # noqa: E731
    out = jax.jit(lambda k: vj.ddpm_vlb(pred, pixels, k, sched, variance="learned"))(jax.random.key(0))
    assert np.all(np.isfinite(out["total"]))
    with pytest.raises(ValueError, match="must return \\(prediction, v\\)"):
        vj.ddpm_vlb(lambda z, t: z, pixels, jax.random.key(0), sched, variance="learned")


def test_vdm_elbo_traces_once():
    sched = vj.LinearSchedule()
    pred = optimal_eps(sched)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def elbo(x, key):
        return vj.vdm_elbo(pred, x, key, sched, decoder="gaussian")["total"]

    elbo(jnp.zeros((4, 2)), jax.random.key(0))
    elbo(jnp.ones((4, 2)), jax.random.key(1))


def test_vdm_elbo_bad_decoder():
    with pytest.raises(ValueError, match="decoder must be 'vdm' or 'gaussian'"):
        vj.vdm_elbo(lambda z, t: z, jnp.zeros((2, 2)), jax.random.key(0), vj.LinearSchedule(), decoder="bernoulli")
    with pytest.raises(ValueError, match="needs the integer pixels"):
        vj.vdm_elbo(lambda z, t: z, jnp.zeros((2, 2)), jax.random.key(0), vj.LinearSchedule())


SCHED = vj.DiscreteSchedule(vj.linear_betas(10))
PIXELS = jnp.zeros((2, 3), jnp.int32)


@pytest.mark.parametrize("call, error, match", [
    (lambda: vj.ddpm_vlb(lambda z, t: z, PIXELS, jax.random.key(0), vj.LinearSchedule()), TypeError,
     "schedule must be a DiscreteSchedule, got LinearSchedule; for a continuous schedule use vdm_elbo"),
    (lambda: vj.ddpm_vlb(lambda z, t: z, PIXELS, jax.random.key(0), SCHED, variance="large"), ValueError,
     "variance must be 'posterior', 'beta' or 'learned', got 'large'"),
    (lambda: vj.ddpm_vlb(lambda z, t: z, PIXELS, jax.random.key(0), SCHED, kind="noise"), ValueError,
     "kind must be one of"),
    (lambda: vj.ddpm_vlb(lambda z, t: z, jnp.int32(3), jax.random.key(0), SCHED), ValueError,
     r"pixels must have shape \[B, ...\]"),
    (lambda: vj.ddpm_vlb(lambda z, t: (z, z), PIXELS, jax.random.key(0), SCHED), ValueError,
     "pred_fn returned a tuple of 2, but without a learned variance it must return one array"),
    (lambda: vj.ddpm_vlb(lambda z, t: z[:, :1], PIXELS, jax.random.key(0), SCHED), ValueError,
     r"same shape, got z_t \(2, 3\), prediction \(2, 1\)"),
    (lambda: vj.vdm_elbo(lambda z, t: (z, z), jnp.zeros((2, 3)), jax.random.key(0), vj.LinearSchedule(),
                         decoder="gaussian"), ValueError, "pred_fn returned a tuple of 2"),
    (lambda: vj.vdm_elbo(lambda z, t: z, jnp.float32(0.0), jax.random.key(0), vj.LinearSchedule(),
                         decoder="gaussian"), ValueError, r"x must have shape \[B, ...\]"),
    (lambda: vj.vdm_elbo(lambda z, t: z, jnp.zeros((2, 3)), jax.random.key(0), vj.LinearSchedule(),
                         pixels=PIXELS.astype(jnp.float32)), TypeError, "pixels must be integers in 0..255"),
])
def test_elbo_bad_input_inside_jit(call, error, match):
    with pytest.raises(error, match=match):
        jax.jit(call)()


def test_elbo_concrete_values_out_of_range():
    with pytest.raises(ValueError, match=r"pixels must lie in 0..255; got values in \[256, 256\]"):
        vj.ddpm_vlb(lambda z, t: z, PIXELS + 256, jax.random.key(0), SCHED)
    with pytest.raises(ValueError, match=r"t must lie in 1..T = 1..10; got values in \[0, 0\]"):
        vj.ddpm_log_variance(SCHED, 0)
