"""The ELBO's terms and the training objectives, per example, in nats (docs/math.md §5).

Every loss returns shape [B]: summed over all dimensions of an example, never averaged over the
batch (the caller reduces and weights). Predictions come before targets; γ arguments are scalars
or [B], broadcast per example by `per_example`. These are formulas: they check nothing (the
families and the ELBOs that call them do).

The three denoising-matching losses are the same KL, KL(q(z_s|z_t,x) ‖ p_θ(z_s|z_t)) with the
reverse variance σ_q², written in each parameterisation (docs/math.md §5):

    ½ (SNR(s) - SNR(t)) ‖x̂ - x‖²  =  ½ (SNR(s)/SNR(t) - 1) ‖ε̂ - ε‖²  =  ½ (SNR(s)/SNR(t) - 1) σ_t² ‖ŝ + ε/σ_t‖²

For s = t-1 in discrete time these are DDPM's weights ᾱ_{t-1}β_t²/(2σ_q²(1-ᾱ_t)²) etc.
"""
from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from vdm_jax.diffusion import _posterior_coefficients, per_example
from vdm_jax.pixels import data_to_pixels, pixels_to_data
from vdm_jax.schedules import alpha_sigma

ReverseVariance = Literal["posterior", "beta", "learned"]
VARIANCES = ("posterior", "beta", "learned")


def _sum(x: jax.Array) -> jax.Array:
    """Sums over every axis but the first: [B, ...] -> [B]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------
# Denoising matching: the three equivalent parameterisations (docs/math.md §5.2)

def x0_matching(x_hat, x, gamma_s, gamma_t) -> jax.Array:
    """The denoising KL with p's variance σ_q², from a data prediction (docs/math.md §5.2).

        KL(q(z_s|z_t,x) ‖ p_θ(z_s|z_t)) = ½ (SNR(s) - SNR(t)) ‖x̂ - x‖²,
        SNR(s) - SNR(t) = exp(-γ_s) · (-expm1(γ_s - γ_t))

    Args:
      x_hat: predicted data [B, ...]; x: the data.
      gamma_s, gamma_t: γ(s) < γ(t), scalar or [B].
    Returns:
      [B] nats.
    """
    gamma_s, gamma_t = per_example(gamma_s, x), per_example(gamma_t, x)
    return _sum(0.5 * jnp.exp(-gamma_s) * -jnp.expm1(gamma_s - gamma_t) * jnp.square(x_hat - x))


def eps_matching(eps_hat, eps, gamma_s, gamma_t) -> jax.Array:
    """The same KL from a noise prediction (docs/math.md §5.2).

        ½ (SNR(s)/SNR(t) - 1) ‖ε̂ - ε‖² = ½ expm1(γ_t - γ_s) ‖ε̂ - ε‖²

    In DDPM's terms (s = t-1) the weight is β_t² / (2 σ_q² (1-ᾱ_t) α_t).
    Args and returns as `x0_matching`, with eps_hat, eps [B, ...].
    """
    gamma_s, gamma_t = per_example(gamma_s, eps), per_example(gamma_t, eps)
    return _sum(0.5 * jnp.expm1(gamma_t - gamma_s) * jnp.square(eps_hat - eps))


def score_matching(score_hat, eps, gamma_s, gamma_t) -> jax.Array:
    """The same KL from a score prediction (docs/math.md §5.2).

        ½ (SNR(s)/SNR(t) - 1) σ_t² ‖ŝ - ∇log q(z_t|x)‖²,   ∇log q(z_t|x) = -ε/σ_t

    In DDPM's terms the weight is β_t² / (2 σ_q² α_t).

    Args:
      score_hat: predicted score [B, ...]; eps: the noise that made z_t.
      gamma_s, gamma_t: γ(s) < γ(t), scalar or [B].
    Returns:
      [B] nats.
    """
    gamma_s, gamma_t = per_example(gamma_s, eps), per_example(gamma_t, eps)
    sigma_t = alpha_sigma(gamma_t)[1]
    weight = 0.5 * jnp.expm1(gamma_t - gamma_s) * jax.nn.sigmoid(gamma_t)
    return _sum(weight * jnp.square(score_hat + eps / sigma_t))


# ---------------------------------------------------------------------------------------------
# Full KL for other reverse variances (docs/math.md §5.3)


def _log_floor(x):
    return jnp.maximum(x, jnp.log(jnp.finfo(jnp.result_type(x)).tiny))


def reverse_log_variance(gamma_s, gamma_t, *, kind: ReverseVariance = "posterior", v=None) -> jax.Array:
    """log σ² of the reverse step p_θ(z_s | z_t) (docs/math.md §5.3).

    - 'posterior': σ_q² = β̃ = σ²_{t|s} σ_s² / σ_t² (-inf at s = 0, where it is exactly 0);
    - 'beta':      σ²_{t|s} (= β_t for s = t-1);
    - 'learned':   v log σ²_{t|s} + (1 - v) log σ_q² (Nichol & Dhariwal 2021), v the network's output;
                   log σ_q² is floored at log(float tiny) so that s = 0 gives no NaN.

    Args:
      gamma_s, gamma_t: γ(s) < γ(t), scalars or [B].
      kind: which variance.
      v: for 'learned', the interpolation weights [B, ...] (the γ's are broadcast per example).
    Returns:
      log σ²: the γ's broadcast shape, or v's shape.
    """
    if v is not None:
        gamma_s, gamma_t = per_example(gamma_s, v), per_example(gamma_t, v)
    log_r = jnp.log(-jnp.expm1(gamma_s - gamma_t))
    if kind == "posterior":
        return log_r - jax.nn.softplus(-gamma_s)
    if kind == "beta":
        return log_r - jax.nn.softplus(-gamma_t)
    if kind != "learned" or v is None:
        raise ValueError(f"reverse_log_variance: kind must be 'posterior', 'beta' or 'learned' (with v), got {kind!r}"
                         f"{' without v' if kind == 'learned' else ''}.")
    return v * (log_r - jax.nn.softplus(-gamma_t)) + (1.0 - v) * _log_floor(log_r - jax.nn.softplus(-gamma_s))


def normal_kl(mean1, log_var1, mean2, log_var2) -> jax.Array:
    """Elementwise KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)) (docs/math.md §5.3).

    The arguments (any shapes) broadcast together; so does the result.
    """
    return 0.5 * (log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-log_var2) - 1.0)


def denoising_kl(x_hat, x, z_t, gamma_s, gamma_t, log_var) -> jax.Array:
    """KL(q(z_s|z_t,x) ‖ N(μ̃(x̂, z_t), e^log_var)) for any reverse variance (docs/math.md §5.3).

    μ_q - μ_θ = α_s (σ²_{t|s}/σ_t²) (x - x̂) is formed directly, not as a difference of means.

    Args:
      x_hat, x, z_t: [B, ...].
      gamma_s, gamma_t: γ(s) < γ(t) with γ(s) finite, scalar or [B].
      log_var: log σ² of the reverse step, scalar, [B] or x's shape (e.g. `reverse_log_variance`).
    Returns:
      [B] nats.
    """
    _, coef_x, var_q = _posterior_coefficients(per_example(gamma_s, x), per_example(gamma_t, x))
    return _sum(normal_kl(coef_x * (x - x_hat), jnp.log(var_q), 0.0, per_example(log_var, x)))


def vlb_term(x_hat, x, z_t, gamma_s, gamma_t, log_var) -> jax.Array:
    """One term of DDPM's VLB: L_{t-1} = KL for s > 0, the decoder -log p(x | z_1) for s = 0.

    The reverse mean at s = 0 is μ̃_1(x̂, z_1) = x̂, and the decoder is the discretised Gaussian
    N(x̂, e^log_var) over the 256 pixel bins (docs/math.md §5.6, §5.7).

    Args:
      x_hat: the data prediction [B, ...]; x: the data (on the 'ddpm' grid where s = 0); z_t: the latent.
      gamma_s: γ(s) with -inf marking s = 0 (discrete time), scalar or [B]; gamma_t: γ(t).
      log_var: log σ² of the reverse step, scalar, [B] or x's shape.
    Returns:
      [B] nats.
    """
    first = jnp.isneginf(gamma_s)
    safe_gs = jnp.where(first, gamma_t - 1.0, gamma_s)  # any finite γ_s < γ_t: the KL is discarded there
    kl = denoising_kl(x_hat, x, z_t, safe_gs, gamma_t, log_var)
    nll = ddpm_decoder_nll(x_hat, x, log_var)
    return jnp.where(first, nll, kl)


# ---------------------------------------------------------------------------------------------
# Training objectives that are not bounds (docs/math.md §5)


def simple_loss(prediction, target) -> jax.Array:
    """L_simple = ‖prediction - target‖² summed over an example's dimensions (Ho et al. 2020; docs/math.md §5.4).

    Not a bound: the ELBO's weights are dropped. Ho et al.'s code averages over dimensions
    instead; that is this value / D, the same objective up to the learning rate. Works for any
    kind (ε̂ and ε, x̂ and x, v̂ and v: see `prediction_target`).

    Args:
      prediction, target: [B, ...].
    Returns:
      [B].
    """
    return _sum(jnp.square(prediction - target))


def hybrid_loss(eps_hat, eps, vlb, *, T: int, lam: float = 0.001) -> jax.Array:
    """Improved DDPM's L_hybrid = L_simple + λ T L_{t-1} (Nichol & Dhariwal 2021; docs/math.md §5.4).

    `vlb` is the one-step VLB term L_{t-1} for a uniformly drawn t, computed with the mean's
    prediction under `stop_gradient` so that L_vlb trains only the variance; scaled by T it is
    an unbiased estimate of the whole L_vlb. Both are in nats summed over dimensions; Nichol &
    Dhariwal's code uses per-dimension means and bits, i.e. the same with λ/ln 2.

    Args:
      eps_hat, eps: [B, ...].
      vlb: [B], from `vlb_term` with `x_hat` built from `stop_gradient(eps_hat)`.
      T: number of steps of the discrete diffusion.
      lam: λ >= 0.
    Returns:
      [B].
    """
    return simple_loss(eps_hat, eps) + lam * T * vlb


# ---------------------------------------------------------------------------------------------
# Prior and reconstruction (docs/math.md §5)


def prior_loss(x, gamma_1) -> jax.Array:
    """L_prior = KL(q(z_1|x) ‖ N(0, I)) = ½ Σ (α_1² x² + σ_1² - 1 - log σ_1²) (docs/math.md §5.5).

    Written as ½ Σ (α_1² x² + g(α_1²)) with g(u) = -log(1 - u) - u = u²/2 + u³/3 + ..., summed as a
    series for small u, so the term keeps its relative precision when the prior is tiny.

    Args:
      x: data [B, ...]; gamma_1: γ at the last step / t = 1, scalar or [B].
    Returns:
      [B] nats.
    """
    u = jax.nn.sigmoid(-per_example(gamma_1, x))
    return _sum(0.5 * (u * jnp.square(x) + _neg_log1m_minus_u(u)))


def _neg_log1m_minus_u(u):
    """-log(1 - u) - u for u in [0, 1), without cancellation for small u."""
    series = sum(u ** k / k for k in range(2, 13))  # error < u^13/13 relative to u²/2 for u < 0.1
    return jnp.where(u < 0.1, series, -jnp.log1p(-u) - u)


def _log_prob_between(lo, hi):
    """log(Φ(hi) - Φ(lo)) for lo < hi, accurate in both tails (lo may be -inf, hi +inf)."""
    upper = lo > 0.0  # in the upper tail use the mirror image: Φ(-lo) - Φ(-hi)
    a, b = jnp.where(upper, -hi, lo), jnp.where(upper, -lo, hi)
    log_b, log_a = log_ndtr(b), log_ndtr(a)
    return log_b + jnp.log1p(-jnp.exp(jnp.minimum(log_a - log_b, 0.0)))


def ddpm_decoder_nll(mean, x, log_var) -> jax.Array:
    """-log p(x | z_1) for DDPM's discretised Gaussian decoder (Ho et al. 2020; docs/math.md §5.6).

        p(x|z_1) = ∏_i ∫_{x_i - 1/255}^{x_i + 1/255} N(u; mean_i, σ²) du,  x = 2k/255 - 1,

    the outer bins extended to ±∞. Log-probabilities are formed from `log_ndtr` in whichever tail
    is accurate, so there is no clamp.

    Args:
      mean: decoder mean (x̂ from z_1), [B, ...].
      x: data on the 'ddpm' grid (`pixels_to_data(pixels, grid='ddpm')`), mean's shape.
      log_var: log σ², scalar, [B] or x's shape.
    Returns:
      [B] nats.
    """
    pixels = data_to_pixels(x, grid="ddpm")
    x = pixels_to_data(pixels, grid="ddpm", dtype=mean.dtype)  # the exact bin centre
    inv_std = jnp.exp(-0.5 * per_example(log_var, x))
    lo = jnp.where(pixels <= 0, -jnp.inf, (x - 1.0 / 255.0 - mean) * inv_std)
    hi = jnp.where(pixels >= 255, jnp.inf, (x + 1.0 / 255.0 - mean) * inv_std)
    return -_sum(_log_prob_between(lo, hi))


def vdm_decoder_nll(z_0, x, gamma_0) -> jax.Array:
    """-log p(x | z_0) for VDM's factorised decoder over the 256 values (docs/math.md §5.8).

    logits_k = -½ (z_0/α_0 - v_k)² / (σ_0/α_0)²,  v_k = 2((k + 0.5)/256) - 1,  (σ_0/α_0)² = exp(γ_0).

    Args:
      z_0: latent at t = 0, [B, ...].
      x: data on the 'vdm' grid (`pixels_to_data(pixels, grid='vdm')`), z_0's shape.
      gamma_0: γ(0), scalar or [B].
    Returns:
      [B] nats.
    """
    pixels = data_to_pixels(x, grid="vdm")
    gamma_0 = per_example(gamma_0, x)
    alpha_0, _ = alpha_sigma(gamma_0)
    grid = pixels_to_data(jnp.arange(256), grid="vdm", dtype=z_0.dtype).reshape((1,) * z_0.ndim + (256,))
    precision = jnp.exp(-gamma_0)[..., None] if gamma_0.ndim else jnp.exp(-gamma_0)
    logits = -0.5 * jnp.square((z_0 / alpha_0)[..., None] - grid) * precision
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -_sum(jnp.take_along_axis(log_probs, pixels[..., None], axis=-1)[..., 0])


def gaussian_decoder_nll(z_0, x, gamma_0) -> jax.Array:
    """-log N(x; z_0/α_0, σ_0²/α_0²) for continuous data, σ_0²/α_0² = exp(γ_0) (docs/math.md §5.8).

    The reconstruction term for real-valued data, e.g. the analytic Gaussian checks.

    Args:
      z_0: latent at t = 0, [B, ...]; x: the data, z_0's shape; gamma_0: γ(0), scalar or [B].
    Returns:
      [B] nats.
    """
    gamma_0 = per_example(gamma_0, x)
    alpha_0, _ = alpha_sigma(gamma_0)
    return _sum(0.5 * (jnp.log(2.0 * jnp.pi) + gamma_0 + jnp.square(x - z_0 / alpha_0) * jnp.exp(-gamma_0)))


# ---------------------------------------------------------------------------------------------
# VDM's diffusion loss and time sampling (docs/math.md §5.11, §5.12)


def diffusion_loss(eps_hat, eps, t, gamma_fn: Callable, *, T: int = 0) -> jax.Array:
    """VDM's diffusion loss for one draw of t per example (docs/math.md §5.11).

    - T > 0 (discrete time, s = t - 1/T):  (T/2) (exp(γ(t) - γ(s)) - 1) ‖ε - ε̂‖²
    - T = 0 (continuous time):             ½ γ'(t) ‖ε - ε̂‖², γ' from `jax.jvp`.

    With t ~ U{1/T, ..., 1} (or U(0, 1)) this is an unbiased estimate of L_T (or L_∞).

    Args:
      eps_hat, eps: [B, ...].
      t: [B] times in [0, 1] (multiples of 1/T for T > 0).
      gamma_fn: the schedule, t -> γ(t), elementwise.
      T: number of steps (a Python int), 0 for continuous time.
    Returns:
      [B] nats.
    """
    err = _sum(jnp.square(eps - eps_hat))
    if T == 0:
        _, dgamma = jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))
        return 0.5 * dgamma * err
    gamma_t, gamma_s = gamma_fn(t), gamma_fn(jnp.maximum(t - 1.0 / T, 0.0))
    return 0.5 * T * jnp.expm1(gamma_t - gamma_s) * err


def sample_times(batch_size: int, *, key, T: int = 0, low_discrepancy: bool = True, dtype=jnp.float32) -> jax.Array:
    """Draws t for a batch: U(0, 1), or U{1/T, ..., 1} for T > 0 (docs/math.md §5.12).

    With `low_discrepancy`, t_i = (u + i/B) mod 1 for one u ~ U(0, 1): each t is still uniform,
    but the batch covers [0, 1] evenly, which lowers the variance of the batch's loss (VDM).

    Args:
      batch_size: B >= 1.
      key: PRNG key.
      T: number of steps, 0 for continuous time.
    Returns:
      [B] times of `dtype`.
    """
    if low_discrepancy:
        u = jax.random.uniform(key, (), dtype)
        t = jnp.mod(u + jnp.arange(batch_size, dtype=dtype) / batch_size, 1.0)
    else:
        t = jax.random.uniform(key, (batch_size,), dtype)
    if T > 0:
        t = jnp.maximum(jnp.ceil(t * T), 1.0) / T
    return t
