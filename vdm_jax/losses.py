"""The ELBO's terms and the training objectives, per example, in nats (MATH.md §5).

Every loss returns shape [B]: summed over all dimensions of an example, never averaged over the
batch (the caller reduces and weights). γ arguments are scalars or [B].

The three denoising-matching losses are the same KL, KL(q(z_s|z_t,x) ‖ p_θ(z_s|z_t)) with the
reverse variance σ_q², written in each parameterisation (MATH.md §5):

    ½ (SNR(s) - SNR(t)) ‖x̂ - x‖²  =  ½ (SNR(s)/SNR(t) - 1) ‖ε̂ - ε‖²  =  ½ (SNR(s)/SNR(t) - 1) σ_t² ‖ŝ + ε/σ_t‖²

For s = t-1 in discrete time these are MATH.md's weights ᾱ_{t-1}β_t²/(2σ_q²(1-ᾱ_t)²) etc.
"""
from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from vdm_jax import _checks
from vdm_jax.diffusion import q_posterior, _posterior_coefficients
from vdm_jax.pixels import check_pixels, pixels_to_data
from vdm_jax.schedules import alpha_sigma

_sum = _checks.sum_per_example


def _sq_err(a, b, a_name, b_name):
    a, b = _checks.check_float(a_name, a), _checks.check_float(b_name, b)
    _checks.check_same_shape(**{a_name: a, b_name: b})
    return a, b, _sum(jnp.square(a - b))


def _gammas(gamma_s, gamma_t):
    gs, gt = _checks.check_float("gamma_s", gamma_s), _checks.check_float("gamma_t", gamma_t)
    _checks.check_less("gamma_s", gs, "gamma_t", gt)
    return gs, gt


def _batch_weight(weight, x, name="gamma_s/gamma_t"):
    """Checks a per-example weight ([B] or scalar) against x [B, ...]; returns it unchanged."""
    _checks.per_example(name, weight, x)
    return weight


# ---------------------------------------------------------------------------------------------
# Denoising matching: the three equivalent parameterisations (MATH.md §4-5)


def x0_matching(x_hat, x, gamma_s, gamma_t) -> jax.Array:
    """KL(q(z_s|z_t,x) ‖ p_θ(z_s|z_t)) with p's variance σ_q², from a data prediction (MATH.md §5).

        ½ (SNR(s) - SNR(t)) ‖x̂ - x‖²,   SNR(s) - SNR(t) = exp(-γ_s) · (-expm1(γ_s - γ_t))

    Args:
      x_hat: predicted data [B, ...]; x: the data.
      gamma_s, gamma_t: γ(s) < γ(t), scalar or [B].
    Returns:
      [B] nats.
    """
    x_hat, x, err = _sq_err(x_hat, x, "x_hat", "x")
    gs, gt = _gammas(gamma_s, gamma_t)
    weight = 0.5 * jnp.exp(-gs) * -jnp.expm1(gs - gt)
    return _batch_weight(weight, x) * err


def eps_matching(eps_hat, eps, gamma_s, gamma_t) -> jax.Array:
    """The same KL from a noise prediction: ½ (SNR(s)/SNR(t) - 1) ‖ε̂ - ε‖² = ½ expm1(γ_t - γ_s) ‖ε̂ - ε‖².

    In DDPM's terms (s = t-1) the weight is β_t² / (2 σ_q² (1-ᾱ_t) α_t) (MATH.md §5).
    """
    eps_hat, eps, err = _sq_err(eps_hat, eps, "eps_hat", "eps")
    gs, gt = _gammas(gamma_s, gamma_t)
    return _batch_weight(0.5 * jnp.expm1(gt - gs), eps) * err


def score_matching(score_hat, eps, gamma_s, gamma_t) -> jax.Array:
    """The same KL from a score prediction (MATH.md §5).

        ½ (SNR(s)/SNR(t) - 1) σ_t² ‖ŝ - ∇log q(z_t|x)‖²,   ∇log q(z_t|x) = -ε/σ_t

    In DDPM's terms the weight is β_t² / (2 σ_q² α_t).

    Args:
      score_hat: predicted score [B, ...]; eps: the noise that made z_t.
    """
    score_hat, eps = _checks.check_float("score_hat", score_hat), _checks.check_float("eps", eps)
    _checks.check_same_shape(score_hat=score_hat, eps=eps)
    gs, gt = _gammas(gamma_s, gamma_t)
    sigma_t = _checks.per_example("gamma_t", alpha_sigma(gt)[1], eps, "eps")
    err = _sum(jnp.square(score_hat + eps / sigma_t))
    return _batch_weight(0.5 * jnp.expm1(gt - gs) * jax.nn.sigmoid(gt), eps) * err


# ---------------------------------------------------------------------------------------------
# Full KL for other reverse variances (MATH.md §5)

ReverseVariance = Literal["posterior", "beta", "learned"]
VARIANCES = ("posterior", "beta", "learned")


def check_variance(variance: str, name: str = "variance") -> str:
    """Checks a reverse-variance kind, one of 'posterior', 'beta', 'learned'."""
    if not isinstance(variance, str) or variance not in VARIANCES:
        raise ValueError(f"{name} must be 'posterior', 'beta' or 'learned', got {variance!r}.")
    return variance


def _log_floor(x):
    return jnp.maximum(x, jnp.log(jnp.finfo(jnp.result_type(x)).tiny))


def reverse_log_variance(gamma_s, gamma_t, kind: ReverseVariance = "posterior", v=None) -> jax.Array:
    """log σ² of the reverse step p_θ(z_s | z_t) (MATH.md §5).

    - 'posterior': σ_q² = β̃ = σ²_{t|s} σ_s² / σ_t² (-inf at s = 0, where it is exactly 0);
    - 'beta':      σ²_{t|s} (= β_t for s = t-1);
    - 'learned':   v log σ²_{t|s} + (1 - v) log σ_q² (Nichol & Dhariwal 2021), v the network's output;
                   log σ_q² is floored at log(float tiny) so that s = 0 gives no NaN.

    Args:
      gamma_s, gamma_t: scalars or [B].
      kind: which variance.
      v: interpolation weights for 'learned' (any shape broadcastable with the γ's, e.g. [B, ...]
        with the γ's expanded by the caller, or [B]).
    """
    check_variance(kind, "kind")
    gs, gt = _gammas(gamma_s, gamma_t)
    if v is not None and jnp.ndim(v) > max(gs.ndim, gt.ndim):  # per-dimension v, per-example γ
        gs, gt = _expand("gamma_s", gs, v, "v"), _expand("gamma_t", gt, v, "v")
    log_r = jnp.log(-jnp.expm1(gs - gt))
    if kind == "posterior":
        return log_r - jax.nn.softplus(-gs)
    if kind == "beta":
        return log_r - jax.nn.softplus(-gt)
    if v is None:
        raise ValueError("v is required for kind='learned'.")
    return v * (log_r - jax.nn.softplus(-gt)) + (1.0 - v) * _log_floor(log_r - jax.nn.softplus(-gs))


def normal_kl(mean1, log_var1, mean2, log_var2) -> jax.Array:
    """Elementwise KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)) (MATH.md §5); the arguments broadcast."""
    args = {"mean1": mean1, "log_var1": log_var1, "mean2": mean2, "log_var2": log_var2}
    mean1, log_var1, mean2, log_var2 = (_checks.check_float(n, a) for n, a in args.items())
    try:
        jnp.broadcast_shapes(mean1.shape, log_var1.shape, mean2.shape, log_var2.shape)
    except ValueError:
        shapes = ", ".join(f"{n} {jnp.shape(a)}" for n, a in args.items())
        raise ValueError(f"normal_kl's arguments must broadcast together, got {shapes}.") from None
    return 0.5 * (log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-log_var2) - 1.0)


def _expand(name, value, x, x_name="x"):
    """A per-example [B]/scalar value expanded against x; a full-shape one passed through."""
    value = jnp.asarray(value)
    if value.shape == jnp.shape(x):
        return value
    return _checks.per_example(name, value, x, x_name)


def denoising_kl(x, z_t, x_hat, gamma_s, gamma_t, log_var) -> jax.Array:
    """KL(q(z_s|z_t,x) ‖ N(μ̃(x̂, z_t), e^log_var)) for any reverse variance (MATH.md §5).

    μ_q - μ_θ = α_s (σ²_{t|s}/σ_t²) (x - x̂) is formed directly, not as a difference of means.

    Args:
      x, z_t, x_hat: [B, ...].
      gamma_s, gamma_t: γ(s) < γ(t) with γ(s) finite, scalar or [B].
      log_var: log σ² of the reverse step, [B] / scalar or x's shape (e.g. `reverse_log_variance`).
    Returns:
      [B] nats.
    """
    x, z_t, x_hat = (_checks.check_float(n, a) for n, a in (("x", x), ("z_t", z_t), ("x_hat", x_hat)))
    _checks.check_same_shape(x=x, z_t=z_t, x_hat=x_hat)
    gs, gt = _gammas(gamma_s, gamma_t)
    _, coef_x, var_q = _posterior_coefficients(gs, gt)
    diff = _expand("gamma_s/gamma_t", coef_x, x) * (x - x_hat)
    log_var_q = _expand("gamma_s/gamma_t", jnp.log(var_q), x)
    log_var_p = _expand("log_var", log_var, x)
    return _sum(normal_kl(diff, log_var_q, jnp.zeros_like(diff), log_var_p))


def vlb_term(x, pixels, z_t, x_hat, gamma_s, gamma_t, log_var) -> jax.Array:
    """One term of DDPM's VLB: L_{t-1} = KL for s > 0, the decoder -log p(x | z_1) for s = 0.

    The reverse mean at s = 0 is μ̃_1(x̂, z_1) = x̂, and the decoder is the discretised Gaussian
    N(x̂, e^log_var) over the 256 pixel bins (MATH.md §5).

    Args:
      x: data [B, ...] (on the 'ddpm' grid where s = 0 matters); pixels: the same as integers 0..255.
      z_t, x_hat: [B, ...].
      gamma_s: γ(s) with -inf marking s = 0 (discrete time), scalar or [B]; gamma_t: γ(t).
      log_var: log σ² of the reverse step, [B] / scalar or x's shape.
    Returns:
      [B] nats.
    """
    gs, gt = _gammas(gamma_s, gamma_t)
    first = jnp.isneginf(gs)
    safe_gs = jnp.where(first, gt - 1.0, gs)  # any finite γ_s < γ_t: the KL branch is discarded there
    kl = denoising_kl(x, z_t, x_hat, safe_gs, gt, log_var)
    nll = ddpm_decoder_nll(pixels, x_hat, log_var)
    return jnp.where(first, nll, kl)


# ---------------------------------------------------------------------------------------------
# Training objectives that are not bounds (MATH.md §5)


def simple_loss(eps_hat, eps) -> jax.Array:
    """L_simple = ‖ε - ε̂‖², summed over an example's dimensions (Ho et al. 2020; MATH.md §5).

    Not a bound: the ELBO's weights are dropped. Ho et al.'s code averages over dimensions
    instead; that is this value / D, the same objective up to the learning rate.
    Works for any target (‖x - x̂‖², ‖v - v̂‖²) by passing the prediction and its target.
    """
    return _sq_err(eps_hat, eps, "eps_hat", "eps")[2]


def hybrid_loss(eps_hat, eps, vlb, *, num_steps: int, lam: float = 0.001) -> jax.Array:
    """Improved DDPM's L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal 2021; MATH.md §5).

    `vlb` is the one-step VLB term L_{t-1} for a uniformly drawn t, computed with the mean's
    prediction under `stop_gradient` so that L_vlb trains only the variance; scaled by T it is
    an unbiased estimate of the whole L_vlb. Both are in nats summed over dimensions; Nichol &
    Dhariwal's code uses per-dimension means and bits, i.e. the same with λ/ln 2.

    Args:
      eps_hat, eps: [B, ...].
      vlb: [B], from `vlb_term` with `x_hat` built from `stop_gradient(eps_hat)`.
      num_steps: T.
      lam: λ.
    """
    vlb = _checks.check_float("vlb", vlb)
    _checks.per_example("vlb", vlb, eps, "eps")
    _checks.check_int("num_steps", num_steps, 1)
    _checks.check_real("lam", lam)
    _checks.check_in_range("lam", lam, 0.0, jnp.inf, "[0, inf)")
    return simple_loss(eps_hat, eps) + lam * num_steps * vlb


# ---------------------------------------------------------------------------------------------
# Prior and reconstruction (MATH.md §5)


def prior_loss(x, gamma_1) -> jax.Array:
    """L_prior = KL(q(z_1|x) ‖ N(0, I)) = ½ Σ (α_1² x² + σ_1² - 1 - log σ_1²) (MATH.md §5).

    Written as ½ Σ (α_1² x² + g(α_1²)) with g(u) = -log(1 - u) - u = u²/2 + u³/3 + ..., summed as a
    series for small u, so the term keeps its relative precision when the prior is tiny.

    Args:
      x: data [B, ...]; gamma_1: γ at the last step / t = 1, scalar or [B].
    Returns:
      [B] nats.
    """
    x = _checks.check_float("x", x)
    g = _checks.per_example("gamma_1", _checks.check_float("gamma_1", gamma_1), x)
    u = jax.nn.sigmoid(-g)
    return _sum(0.5 * (u * jnp.square(x) + _neg_log1m_minus_u(u)))


def _neg_log1m_minus_u(u):
    """-log(1 - u) - u for u in [0, 1), without cancellation for small u."""
    series = sum(u ** k / k for k in range(2, 13))  # error < u^13/13 relative to u²/2 for u < 0.1
    return jnp.where(u < 0.1, series, -jnp.log1p(-u) - u)


def _check_pixels(pixels, like, like_name):
    pixels = check_pixels(pixels)
    _checks.check_same_shape(pixels=pixels, **{like_name: like})
    return pixels


def _log_prob_between(lo, hi):
    """log(Φ(hi) - Φ(lo)) for lo < hi, accurate in both tails (lo may be -inf, hi +inf)."""
    upper = lo > 0.0  # in the upper tail use the mirror image: Φ(-lo) - Φ(-hi)
    a, b = jnp.where(upper, -hi, lo), jnp.where(upper, -lo, hi)
    log_b, log_a = log_ndtr(b), log_ndtr(a)
    return log_b + jnp.log1p(-jnp.exp(jnp.minimum(log_a - log_b, 0.0)))


def ddpm_decoder_nll(pixels, mean, log_var) -> jax.Array:
    """-log p(x | z_1) for DDPM's discretised Gaussian decoder (Ho et al. 2020; MATH.md §5).

        p(x|z_1) = ∏_i ∫_{x_i - 1/255}^{x_i + 1/255} N(u; mean_i, σ²) du,  x = 2k/255 - 1,

    the outer bins extended to ±∞. Log-probabilities are formed from `log_ndtr` in whichever tail
    is accurate, so there is no clamp.

    Args:
      pixels: integer pixels k ∈ 0..255, [B, ...].
      mean: decoder mean (x̂ from z_1), [B, ...].
      log_var: log σ², [B] / scalar or pixels' shape.
    Returns:
      [B] nats.
    """
    mean = _checks.check_float("mean", mean)
    pixels = _check_pixels(pixels, mean, "mean")
    x = pixels_to_data(pixels, grid="ddpm", dtype=mean.dtype)
    inv_std = jnp.exp(-0.5 * _expand("log_var", log_var, mean))
    lo = jnp.where(pixels <= 0, -jnp.inf, (x - 1.0 / 255.0 - mean) * inv_std)
    hi = jnp.where(pixels >= 255, jnp.inf, (x + 1.0 / 255.0 - mean) * inv_std)
    return -_sum(_log_prob_between(lo, hi))


def vdm_decoder_nll(pixels, z_0, gamma_0) -> jax.Array:
    """-log p(x | z_0) for VDM's factorised decoder over the 256 values (MATH.md §5, continuous time).

    logits_k = -½ (z_0/α_0 - v_k)² / (σ_0/α_0)²,  v_k = 2((k + 0.5)/256) - 1,  (σ_0/α_0)² = exp(γ_0).

    Args:
      pixels: integer pixels k ∈ 0..255, [B, ...].
      z_0: latent at t = 0, [B, ...].
      gamma_0: γ(0), scalar or [B].
    Returns:
      [B] nats.
    """
    z_0 = _checks.check_float("z_0", z_0)
    pixels = _check_pixels(pixels, z_0, "z_0")
    g0 = _checks.per_example("gamma_0", _checks.check_float("gamma_0", gamma_0), z_0, "z_0")
    alpha_0, _ = alpha_sigma(g0)
    grid = pixels_to_data(jnp.arange(256), grid="vdm", dtype=z_0.dtype).reshape((1,) * z_0.ndim + (256,))
    precision = jnp.exp(-g0)[..., None] if g0.ndim else jnp.exp(-g0)
    logits = -0.5 * jnp.square((z_0 / alpha_0)[..., None] - grid) * precision
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, pixels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -_sum(picked)


def gaussian_decoder_nll(x, z_0, gamma_0) -> jax.Array:
    """-log N(x; z_0/α_0, σ_0²/α_0²) for continuous data (σ_0²/α_0² = exp(γ_0)).

    The reconstruction term for real-valued data, e.g. the analytic Gaussian checks.
    """
    x, z_0 = _checks.check_float("x", x), _checks.check_float("z_0", z_0)
    _checks.check_same_shape(x=x, z_0=z_0)
    g0 = _checks.per_example("gamma_0", _checks.check_float("gamma_0", gamma_0), x)
    alpha_0, _ = alpha_sigma(g0)
    return _sum(0.5 * (jnp.log(2.0 * jnp.pi) + g0 + jnp.square(x - z_0 / alpha_0) * jnp.exp(-g0)))


# ---------------------------------------------------------------------------------------------
# VDM's diffusion loss (MATH.md §5, continuous time)


def diffusion_loss(eps, eps_hat, t, gamma_fn: Callable, T: int) -> jax.Array:
    """VDM's diffusion loss for one draw of t per example (MATH.md §5).

    - T > 0 (discrete time, s = t - 1/T):  (T/2) (exp(γ(t) - γ(s)) - 1) ‖ε - ε̂‖²
    - T = 0 (continuous time):             ½ γ'(t) ‖ε - ε̂‖², γ' from `jax.jvp`.

    With t ~ U{1/T, ..., 1} (or U(0, 1)) this is an unbiased estimate of L_T (or L_∞).

    Args:
      eps, eps_hat: [B, ...].
      t: [B] times in [0, 1] (multiples of 1/T for T > 0).
      gamma_fn: the schedule, t -> γ(t), elementwise.
      T: number of steps (a Python int), 0 for continuous time.
    Returns:
      [B] nats.
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 0:
        raise ValueError(f"T must be a non-negative Python int (0 = continuous time), got {T!r}.")
    eps_hat, eps, err = _sq_err(eps_hat, eps, "eps_hat", "eps")
    t = _checks.check_float("t", t)
    _checks.per_example("t", t, eps, "eps")
    _checks.check_in_range("t", t, 0.0, 1.0, "[0, 1]")
    if T == 0:
        _, dgamma = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
        return 0.5 * dgamma * err
    gamma_t, gamma_s = gamma_fn(t), gamma_fn(jnp.maximum(t - 1.0 / T, 0.0))
    return 0.5 * T * jnp.expm1(gamma_t - gamma_s) * err


def sample_times(key, batch_size: int, *, T: int = 0, low_discrepancy: bool = True, dtype=jnp.float32) -> jax.Array:
    """Draws t for a batch: U(0, 1), or U{1/T, ..., 1} for T > 0 (MATH.md §5).

    With `low_discrepancy`, t_i = (u + i/B) mod 1 for one u ~ U(0, 1): each t is still uniform,
    but the batch covers [0, 1] evenly, which lowers the variance of the batch's loss (VDM).
    """
    batch_size = _checks.check_int("batch_size", batch_size, 1)
    T = _checks.check_int("T", T, 0)
    if low_discrepancy:
        u = jax.random.uniform(key, (), dtype)
        t = jnp.mod(u + jnp.arange(batch_size, dtype=dtype) / batch_size, 1.0)
    else:
        t = jax.random.uniform(key, (batch_size,), dtype)
    if T > 0:
        t = jnp.maximum(jnp.ceil(t * T), 1.0) / T
    return t
