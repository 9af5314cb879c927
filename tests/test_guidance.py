"""Classifier-free guidance (docs/math.md §6.9) on exact cases.

The data are a Gaussian mixture whose components are the classes: class c is N(μ_c, s_c² I) with
probability π_c. Its exact denoisers are known in closed form: given the class, ε̂ = σ (z - α μ_c)/v_c
with v_c = α² s_c² + σ²; without it, the same averaged over the classes' posterior probabilities
p(c | z_t) ∝ π_c N(z_t; α μ_c, v_c I) (Tweedie: ε̂ = -σ ∇log p_t(z)). `_mixture_net` is that pair as
one conditional network whose "no label" class is K.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import vdm_jax as vj

MU = np.array([[-0.5, 0.2], [0.0, -0.4], [0.5, 0.5]])
S = np.array([0.10, 0.15, 0.20])
PI = np.array([0.2, 0.3, 0.5])
NULL = len(MU)


def _mixture_net(gamma_fn, kind="eps", mu=MU, s=S, pi=PI):
    """The exact conditional network `net(z_t, t, labels)` of the mixture, predicting `kind`;
    labels == len(mu) is "no label" (the unconditional denoiser)."""
    mu, s2, log_pi = (jnp.asarray(a, jnp.float32) for a in (mu, np.square(s), np.log(pi)))

    def net(z, t, labels):
        gamma = gamma_fn(t)
        alpha, sigma = (vj.per_example(a, z)[None] for a in vj.alpha_sigma(gamma))  # [1, B, 1]
        v = alpha ** 2 * s2[:, None, None] + sigma ** 2  # [K, B, 1]
        r = z[None] - alpha * mu[:, None, :]  # [K, B, D]
        eps_c = sigma * r / v  # each class's exact ε̂ [K, B, D]
        log_p = log_pi[:, None] - 0.5 * (jnp.sum(r ** 2, -1) / v[..., 0] + z.shape[-1] * jnp.log(v[..., 0]))  # [K, B]
        uncond = jnp.einsum("kb,kbd->bd", jax.nn.softmax(log_p, axis=0), eps_c)
        cond = jnp.take_along_axis(eps_c, jnp.minimum(labels, len(mu) - 1)[None, :, None], axis=0)[0]
        eps = jnp.where((labels == len(mu))[:, None], uncond, cond)
        return vj.prediction_target(vj.x_from_eps(z, eps, gamma), eps, gamma, kind=kind)

    return net


def _convert(prediction, z, gamma, source, target):
    eps, x = vj.eps_and_x(prediction, z, gamma, kind=source)
    return vj.prediction_target(x, eps, gamma, kind=target)


VDM = vj.VDM(gamma_min=-13.3, gamma_max=10.0)  # (γ_max = 10: the prior N(0, I) is q(z_1) to 1e-5)
DDPM = vj.DDPM(timesteps=1000)


@pytest.mark.slow(20)
@pytest.mark.parametrize("family, sampler, steps", [
    (DDPM, "ancestral", 0), (VDM, "ancestral", 0), (VDM, "ddim", 100), (DDPM, "ddim", 1000),
    (VDM, "dpm_solver", 40), (DDPM, "dpm_solver", 40), (VDM, "heun", 40), (VDM, "euler", 200)])
def test_at_w_0_every_sampler_draws_each_class_own_gaussian(family, sampler, steps):
    """Guided with w = 0 is the conditional model: each class's samples have its mean and variance
    (within 5 Monte Carlo standard errors, at enough steps), whatever the sampler."""
    n = 4000
    labels = jnp.repeat(jnp.arange(len(MU)), n)
    gamma_fn = family.gamma_schedule()
    pred_fn = vj.guided(_mixture_net(gamma_fn, family.prediction), labels, 0.0, null_label=NULL)
    sample = jax.jit(lambda key: family.sample(pred_fn, (len(labels), 2), key=key, sampler=sampler,
                                               sample_steps=steps))
    x = np.asarray(sample(jax.random.key(0)), np.float64).reshape(len(MU), n, 2)
    for c in range(len(MU)):
        se_mean, se_var = S[c] / np.sqrt(n), S[c] ** 2 * np.sqrt(2 / n)
        np.testing.assert_array_less(np.abs(x[c].mean(0) - MU[c]), 5 * se_mean)
        np.testing.assert_array_less(np.abs(x[c].var(0) - S[c] ** 2), 5 * se_var)



def _guided_ode_moments(w, cond, uncond, gamma_min, gamma_max):
    """(mean, variance) of x from the guided probability-flow ODE with Gaussian data, 1-D, by scipy.

    In EDM's variables (x̃ = z/α, ς = σ/α; docs/math.md §6.5) the ODE is dx̃/dς = ε̂ and Gaussian
    data N(m, s²) has ε̂ = ς (x̃ - m)/(s² + ς²); the guided ε̂ = (1 + w) ε̂_cond - w ε̂_uncond is affine
    in x̃, a(ς) x̃ + b(ς), so the mean moves by dμ/dς = a μ + b and the variance by dV/dς = 2 a V,
    from the sampler's start z_1 ~ N(0, 1) (x̃ ~ N(0, 1 + ς_1²)) down to ς_0."""
    from scipy.integrate import solve_ivp

    def eps_coefficients(v, m, s):  # ε̂ of N(m, s²) is v (x̃ - m)/(s² + v²) = k x̃ - k m
        k = v / (s ** 2 + v ** 2)
        return k, -k * m

    def f(v, y):
        (kc, bc), (ku, bu) = eps_coefficients(v, *cond), eps_coefficients(v, *uncond)
        a, b = (1 + w) * kc - w * ku, (1 + w) * bc - w * bu
        return [a * y[0] + b, 2 * a * y[1]]

    v1, v0 = np.exp(gamma_max / 2), np.exp(gamma_min / 2)
    return solve_ivp(f, (v1, v0), [0.0, 1 + v1 ** 2], method="DOP853", rtol=1e-11, atol=1e-14).y[:, -1]


@pytest.mark.slow(8)
def test_guided_sampling_follows_the_guided_ode_not_the_tilted_distribution():
    """w = 1, the class N(0.5, 0.2²) and the unconditional model N(0, 0.6²) (1-D): the Heun sampler's
    samples have the moments of the guided ODE (integrated independently, above), which are not
    those of p(x|c)^(1+w)/p(x)^w = N(0.529, 0.0212) (docs/math.md §6.9: the variance is 4.8 times
    smaller, the mean further from the unconditional one)."""
    w, cond, uncond, n = 1.0, (0.5, 0.2), (0.0, 0.6), 200_000
    net = _mixture_net(VDM.gamma_schedule(), mu=[[cond[0]], [uncond[0]]], s=[cond[1], uncond[1]], pi=[0.5, 0.5])
    pred_fn = vj.guided(net, jnp.zeros(n, jnp.int32), w, null_label=1)  # (class 1 plays the unconditional model)
    x = np.asarray(jax.jit(lambda key: VDM.sample(pred_fn, (n, 1), key=key, sampler="heun", sample_steps=200))(
        jax.random.key(9)), np.float64)
    mean, var = _guided_ode_moments(w, cond, uncond, VDM.gamma_min, VDM.gamma_max)
    assert abs(x.mean() - mean) < 5 * np.sqrt(var / n) and abs(x.var() / var - 1) < 5 * np.sqrt(2 / n) + 2e-3, (
        x.mean(), mean, x.var(), var)
    precision = (1 + w) / cond[1] ** 2 - w / uncond[1] ** 2  # the tilted density's: N((1+w)m_c/s_c² ...)/P
    tilted_mean, tilted_var = ((1 + w) * cond[0] / cond[1] ** 2 - w * uncond[0] / uncond[1] ** 2) / precision, 1 / precision
    assert var < tilted_var / 4 and mean > tilted_mean + 0.05, (mean, var, tilted_mean, tilted_var)

KINDS = vj.PREDICTIONS


@pytest.mark.parametrize("source", KINDS)
def test_the_guided_prediction_is_the_same_in_every_prediction_kind(x64, source):
    """(1 + w) cond - w uncond, then converted to any kind, equals guiding that kind's network:
    the conversions are affine in the prediction and the weights 1 + w and -w sum to 1."""
    gamma_fn = vj.LinearSchedule(-10.0, 8.0)
    z = jax.random.normal(jax.random.key(1), (64, 2), jnp.float64)
    t = jax.random.uniform(jax.random.key(2), (64,), jnp.float64, 0.05, 0.95)
    labels = jax.random.randint(jax.random.key(3), (64,), 0, len(MU))
    gamma = gamma_fn(t)
    guided = vj.guided(_mixture_net(gamma_fn, source), labels, 2.5, null_label=NULL)(z, t)
    net = _mixture_net(gamma_fn, source)
    cond, uncond = net(z, t, labels), net(z, t, jnp.full_like(labels, NULL))
    np.testing.assert_allclose(guided, 3.5 * cond - 2.5 * uncond, rtol=1e-12, atol=1e-12)
    for target in KINDS:
        other = vj.guided(_mixture_net(gamma_fn, target), labels, 2.5, null_label=NULL)(z, t)
        np.testing.assert_allclose(_convert(guided, z, gamma, source, target), other, rtol=1e-9, atol=1e-9)


def test_classes_that_share_one_distribution_are_not_changed_by_guidance():
    """If every class is the same Gaussian, cond = uncond, so any w gives the conditional prediction."""
    gamma_fn = VDM.gamma_schedule()
    same = dict(mu=np.repeat(MU[:1], 3, axis=0), s=np.repeat(S[:1], 3), pi=PI)
    net = _mixture_net(gamma_fn, **same)
    z = jax.random.normal(jax.random.key(4), (96, 2))
    t = jnp.linspace(0.0, 1.0, 96)
    labels = jnp.arange(96) % 3
    for w in (1.0, 3.0, 10.0):
        np.testing.assert_allclose(jax.jit(vj.guided(net, labels, w, null_label=3))(z, t), net(z, t, labels),
                                   rtol=1e-5, atol=1e-5)


def _small_net(learned: bool):
    """A nonlinear conditional network (a label embedding into a tanh layer), optionally with a v."""
    keys = jax.random.split(jax.random.key(5), 4)
    w1, emb, u, w2 = (jax.random.normal(k, shape) for k, shape in zip(keys, [(6, 16), (5, 16), (16,), (16, 12)]))
    calls = []

    def net(z, t, labels):
        calls.append(z.shape[0])
        h = jnp.tanh(z.reshape(z.shape[0], -1) @ w1 + emb[labels] + t[:, None] * u[None])
        out = (h @ w2).reshape(z.shape[0], 2, 3, 2)
        return (out[..., :1], out[..., 1:]) if learned else out

    return net, calls


@pytest.mark.parametrize("learned", [False, True])
def test_the_doubled_batch_call_equals_two_separate_calls(learned):
    """One network call on [z; z] with [labels; null] gives what two calls give (float32 tolerance),
    under jit; a learned variance's v is the conditional one's."""
    net, calls = _small_net(learned)
    z = jax.random.normal(jax.random.key(6), (8, 2, 3, 1))
    t = jax.random.uniform(jax.random.key(7), (8,))
    labels = jnp.array([0, 1, 2, 3, 0, 1, 2, 3])
    got = jax.jit(vj.guided(net, labels, 1.5, null_label=4))(z, t)
    assert calls == [16]  # one call, on the doubled batch
    cond, uncond = net(z, t, labels), net(z, t, jnp.full_like(labels, 4))
    if learned:
        np.testing.assert_allclose(got[0], 2.5 * cond[0] - 1.5 * uncond[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], cond[1], rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(got, 2.5 * cond - 1.5 * uncond, rtol=1e-5, atol=1e-6)


def test_guidance_is_off_outside_its_interval():
    """With interval (lo, hi) of γ, the prediction is guided where lo < γ(t) <= hi, conditional elsewhere."""
    net, _ = _small_net(False)
    gamma_fn = vj.LinearSchedule(-10.0, 10.0)
    z = jax.random.normal(jax.random.key(8), (11, 2, 3, 1))
    t = jnp.linspace(0.0, 1.0, 11)  # γ = -10, -8, ..., 10
    labels = jnp.arange(11) % 4
    got = vj.guided(net, labels, 2.0, null_label=4, interval=(-4.0, 2.0), gamma_fn=gamma_fn)(z, t)
    full = vj.guided(net, labels, 2.0, null_label=4)(z, t)
    cond = net(z, t, labels)
    inside = np.array([-4.0 < g <= 2.0 for g in np.linspace(-10, 10, 11)])
    assert inside.sum() == 3  # γ = -2, 0, 2
    np.testing.assert_allclose(got[inside], full[inside], rtol=1e-6)
    np.testing.assert_allclose(got[~inside], cond[~inside], rtol=1e-6)


def test_a_traced_weight_sweeps_without_recompiling():
    net, _ = _small_net(False)
    z, t, labels = jnp.ones((4, 2, 3, 1)), jnp.full((4,), 0.5), jnp.arange(4)
    traces = []

    @jax.jit
    def f(w):
        traces.append(1)
        return vj.guided(net, labels, w, null_label=4)(z, t)

    cond, uncond = net(z, t, labels), net(z, t, jnp.full_like(labels, 4))
    for w in (0.0, 1.0, 3.0):
        np.testing.assert_allclose(f(jnp.float32(w)), (1 + w) * cond - w * uncond, rtol=1e-5, atol=1e-6)
    assert len(traces) == 1


LABELS = jnp.arange(4)
CASES = [
    ({"labels": jnp.arange(4.0)}, "guided: labels must be an integer array \\[B\\] of classes >= 0, got float32"),
    ({"labels": np.arange(4).reshape(2, 2)}, "guided: labels must be an integer array \\[B\\]"),
    ({"labels": np.array([0, -1, 2, 3])}, "guided: labels must be .*classes >= 0, got \\[0, -1, 2, 3\\]"),
    ({"weight": float("nan")}, "guided: weight must be a finite real number, got nan"),
    ({"weight": "2"}, "guided: weight must be a finite real number, got '2'"),
    ({"null_label": -1}, "guided: null_label must be an int >= 0 \\(the network's 'no label' class\\), got -1"),
    ({"null_label": 4.0}, "guided: null_label must be an int >= 0"),
    ({"interval": (2.0, -4.0), "gamma_fn": vj.LinearSchedule()}, "guided: interval must be None or a pair \\(lo, hi\\)"),
    ({"interval": (-4.0, 2.0)}, "guided: an interval of γ needs gamma_fn"),
]


@pytest.mark.parametrize("change, match", CASES, ids=[m.split(" must")[0].split(":")[-1] for _, m in CASES])
def test_bad_arguments(change, match):
    args = {"labels": LABELS, "weight": 1.0, "null_label": 4, **change}
    with pytest.raises(ValueError, match=match):
        vj.guided(_small_net(False)[0], args.pop("labels"), args.pop("weight"), **args)


def test_labels_of_another_batch_are_an_error_naming_them():
    pred_fn = vj.guided(_small_net(False)[0], jnp.arange(3), 1.0, null_label=4)
    with pytest.raises(ValueError, match=r"guided: labels must be \[B\] = \[4\] \(z_t's batch\), got shape \(3,\)"):
        jax.jit(pred_fn)(jnp.ones((4, 2, 3, 1)), jnp.full((4,), 0.5))
