"""The whole ELBO (docs/math.md §5): the analytic Gaussian case and DDPM's full VLB."""
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


@pytest.mark.slow(9)
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
        terms = vj.vdm_elbo(pred, x, sched, key=ke, T=0, decoder="gaussian")
        return terms["total"].mean(), {k: v.mean() for k, v in terms.items()}

    @jax.jit
    def discrete(key):
        kx, ke = jax.random.split(key)
        x = M + S * jax.random.normal(kx, (B, 1))
        return jnp.stack([vj.vdm_elbo(pred, x, sched, key=ke, T=T, decoder="gaussian")["total"].mean()
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
    terms = jax.jit(lambda x, k: vj.vdm_elbo(optimal_eps(sched), x, sched, key=k, decoder="gaussian"))(
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
    terms = jax.jit(lambda x, k: vj.vdm_elbo(pred, x, sched, key=k))(x, jax.random.key(2))
    for name in ("prior", "diffusion", "reconstruction", "total"):
        assert terms[name].shape == (8,) and np.all(np.isfinite(terms[name])), name
    bpd = vj.bits_per_dim(terms["total"], 4 * 4 * 3)
    assert np.all(bpd > 0)
    # The decoder reads the pixels off x: the same as the decoder on the same z_0 (key_0 draws it).
    _, _, key_0 = jax.random.split(jax.random.key(2), 3)
    z_0 = vj.q_sample(x, jax.random.normal(key_0, x.shape), sched(0.0))
    # (atol: the logits scale by e^-γ_0 ≈ 6e5, so jit's and eager's float32 roundings of z_0 differ there)
    np.testing.assert_allclose(terms["reconstruction"], vj.vdm_decoder_nll(z_0, x, sched(0.0)), rtol=1e-5, atol=1e-3)


def _gaussian_data(key, shape):
    """Data on the 'ddpm' grid whose values are ~ N(M, S²), rounded to the grid and clipped."""
    x = M + S * jax.random.normal(key, shape)
    return vj.pixels_to_data(vj.data_to_pixels(x))


def test_ddpm_vlb_terms_and_optimal_predictor_beats_zero():
    sched = vj.DiscreteSchedule(vj.linear_betas(100, 1e-3, 0.2))
    x = _gaussian_data(jax.random.key(0), (512, 2))

    @jax.jit
    def vlb(x, key):
        return (vj.ddpm_vlb(optimal_eps(sched), x, sched, key=key),
                vj.ddpm_vlb(lambda z, t: jnp.zeros_like(z), x, sched, key=key))

    good, zero = vlb(x, jax.random.key(1))
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
    x = _gaussian_data(jax.random.key(3), (16, 3))
    key = jax.random.key(4)
    pred = optimal_eps(sched)
    seen = []
    out = vj.ddpm_vlb(lambda z, t: seen.append(t) or pred(z, t), x, sched, key=key, variance="beta")
    assert seen[0].dtype == x.dtype and seen[0].shape == (16,)  # pred_fn gets float t = i/T
    g = sched.gamma_step
    for i in (2, 11, 20):
        eps = jax.random.normal(jax.random.fold_in(key, i), x.shape)
        z = vj.q_sample(x, eps, g(i))
        x_hat = vj.x_from_eps(z, pred(z, jnp.full((16,), i / 20)), g(i))
        ref = vj.denoising_kl(x_hat, x, z, g(i - 1), g(i), vj.reverse_log_variance(g(i - 1), g(i), kind="beta"))
        np.testing.assert_allclose(out["denoising"][:, i - 2], ref, rtol=1e-5, atol=1e-6)
    eps = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    z = vj.q_sample(x, eps, g(1))
    x_hat = vj.x_from_eps(z, pred(z, jnp.full((16,), 1 / 20)), g(1))
    np.testing.assert_allclose(out["reconstruction"], vj.ddpm_decoder_nll(x_hat, x, jnp.log(sched.betas[0])),
                               rtol=1e-5, atol=1e-6)


def test_ddpm_vlb_learned_variance():
    sched = vj.DiscreteSchedule(vj.linear_betas(10, 1e-3, 0.3))
    x = _gaussian_data(jax.random.key(5), (8, 2))
    pred = lambda z, t: (jnp.zeros_like(z), jnp.full_like(z, 0.5))  # noqa: E731
    out = jax.jit(lambda k: vj.ddpm_vlb(pred, x, sched, key=k, variance="learned"))(jax.random.key(0))
    assert np.all(np.isfinite(out["total"]))
    with pytest.raises(ValueError, match="must return \\(prediction, v\\)"):
        vj.ddpm_vlb(lambda z, t: z, x, sched, key=jax.random.key(0), variance="learned")


def test_vdm_elbo_traces_once():
    sched = vj.LinearSchedule()
    pred = optimal_eps(sched)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def elbo(x, key):
        return vj.vdm_elbo(pred, x, sched, key=key, decoder="gaussian")["total"]

    elbo(jnp.zeros((4, 2)), jax.random.key(0))
    elbo(jnp.ones((4, 2)), jax.random.key(1))


# --- bad input: one table per public entry point ----------------------------------------------
# (fn, args, kwargs, error, message regex); each row is checked eagerly and under jax.jit.

SCHED = vj.DiscreteSchedule(vj.linear_betas(10))
KEY = jax.random.key(0)
X = vj.pixels_to_data(jnp.zeros((2, 3), jnp.int32))  # on the 'ddpm' grid
XV = vj.pixels_to_data(jnp.zeros((2, 3), jnp.int32), grid="vdm")


def _identity(z, t):
    return z


ERRORS = {
    vj.ddpm_vlb: [
        ((_identity, X, vj.LinearSchedule()), {"key": KEY}, ValueError,
         r"ddpm_vlb: schedule must be a DiscreteSchedule \(a continuous schedule goes to vdm_elbo.*got LinearSchedule"),
        ((_identity, X, SCHED), {"key": KEY, "variance": "large"}, ValueError,
         "ddpm_vlb: variance must be one of 'posterior', 'beta' or 'learned', got 'large'"),
        ((_identity, X, SCHED), {"key": KEY, "kind": "noise"}, ValueError, "kind must be one of"),
        ((_identity, jnp.float32(-1.0), SCHED), {"key": KEY}, ValueError,
         r"x must be a floating array \[B, ...\] with a leading batch axis, got float32 of shape \(\)"),
        ((_identity, jnp.zeros((2, 3), jnp.int32), SCHED), {"key": KEY}, ValueError,
         r"x must be a floating array .*got int32 of shape \(2, 3\)"),
        ((_identity, np.full((2, 3), 0.3), SCHED), {"key": KEY}, ValueError,
         "ddpm_vlb: x must be data on the 'ddpm' pixel grid"),
        ((lambda z, t: (z, z), X, SCHED), {"key": KEY}, ValueError,
         "pred_fn returned a tuple of 2, but without a learned variance it must return one array"),
        ((lambda z, t: z[:, :1], X, SCHED), {"key": KEY}, ValueError,
         r"pred_fn must return a prediction of z_t's shape \(2, 3\), got \(2, 1\)"),
        ((_identity, X, KEY, SCHED), {}, TypeError, "takes 3 positional arguments but 4 were given"),
        ((_identity, X, SCHED), {}, TypeError, "missing 1 required keyword-only argument: 'key'"),
    ],
    vj.vdm_elbo: [
        ((_identity, X, vj.LinearSchedule()), {"key": KEY, "decoder": "bernoulli"}, ValueError,
         "vdm_elbo: decoder must be one of 'vdm' or 'gaussian', got 'bernoulli'"),
        ((_identity, np.zeros((2, 2)), vj.LinearSchedule()), {"key": KEY}, ValueError,
         r"vdm_elbo: x must be data on the 'vdm' pixel grid .*got x\[0, 0\] = 0.0"),
        ((lambda z, t: (z, z), XV, vj.LinearSchedule()), {"key": KEY, "decoder": "gaussian"}, ValueError,
         "pred_fn returned a tuple of 2"),
        ((lambda z, t: z[:1], XV, vj.LinearSchedule()), {"key": KEY}, ValueError,
         r"pred_fn must return a prediction of z_t's shape \(2, 3\), got \(1, 3\)"),
        ((_identity, jnp.float32(0.0), vj.LinearSchedule()), {"key": KEY, "decoder": "gaussian"}, ValueError,
         r"vdm_elbo: x must be a floating array \[B, ...\]"),
        ((_identity, XV, vj.LinearSchedule()), {"key": KEY, "T": -1}, ValueError, "vdm_elbo: T must be an int >= 0, got -1"),
        ((_identity, XV, vj.LinearSchedule()), {"key": KEY, "kind": "noise"}, ValueError, "kind must be one of"),
        ((_identity, XV, KEY, vj.LinearSchedule()), {}, TypeError, "takes 3 positional arguments but 4 were given"),
    ],
    vj.ddpm_log_variance: [
        ((SCHED, 3), {"variance": "learned"}, ValueError, "got 'learned' without v"),
        ((SCHED, 3), {"variance": "large"}, ValueError, "ddpm_log_variance: variance must be one of"),
        ((vj.LinearSchedule(), 3), {}, ValueError, "ddpm_log_variance: schedule must be a DiscreteSchedule"),
    ],
}
CASES = [(fn, *row) for fn, rows in ERRORS.items() for row in rows]


@pytest.mark.parametrize("fn, args, kwargs, error, match", CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_bad_arguments(fn, args, kwargs, error, match, raises):
    raises(fn, args, kwargs, error, match)


def test_device_values_are_not_checked(no_host_reads):
    """Off-grid data on the device is not read back to be checked: its pixels are rounded."""
    x = jax.device_put(jnp.full((2, 3), 0.3))
    with no_host_reads():
        out = vj.vdm_elbo(_identity, x, vj.LinearSchedule(), key=KEY)
        log_var = vj.ddpm_log_variance(SCHED, jax.device_put(jnp.array([0, 3])))
    assert np.all(np.isfinite(out["total"]))
    assert np.isnan(log_var[0]) and np.isfinite(log_var[1])
