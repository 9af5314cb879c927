"""The forward process q(z_t | x), the posterior q(z_s | z_t, x) and the prediction conversions.

MATH.md §2 (forward), §3 (posterior), §4 (the equivalent predictions). Every function takes γ
values (γ = -log SNR) rather than a schedule, so it works for discrete and continuous time alike.
`x`, `z_t`, `eps` are [B, ...]; `gamma_*` is a scalar or [B] and is broadcast per example.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from vdm_jax import _checks
from vdm_jax.schedules import alpha_sigma

Prediction = Literal["eps", "x", "score", "v"]
PREDICTIONS = ("eps", "x", "score", "v")


def _alpha_sigma_like(gamma, x, name="gamma_t", x_name="x"):
    g = _checks.per_example(name, _checks.check_float(name, gamma), x, x_name)
    return alpha_sigma(g)


# ---------------------------------------------------------------------------------------------
# Forward process (MATH.md §2)


def q_sample(x, eps, gamma_t) -> jax.Array:
    """Draws z_t ~ q(z_t | x) = N(α_t x, σ_t² I) as z_t = α_t x + σ_t ε (MATH.md §2).

    Args:
      x: data [B, ...].
      eps: standard normal noise, x's shape.
      gamma_t: γ(t), scalar or [B].
    Returns:
      z_t, x's shape.
    """
    x, eps = _checks.check_float("x", x), _checks.check_float("eps", eps)
    _checks.check_same_shape(x=x, eps=eps)
    alpha, sigma = _alpha_sigma_like(gamma_t, x)
    return alpha * x + sigma * eps


def q_step(z_prev, eps, beta_t) -> jax.Array:
    """One DDPM forward step, z_t = sqrt(1 - β_t) z_{t-1} + sqrt(β_t) ε (MATH.md §2).

    Args:
      z_prev: z_{t-1} [B, ...].
      eps: standard normal noise, z_prev's shape.
      beta_t: β_t in [0, 1], scalar or [B].
    """
    z_prev, eps = _checks.check_float("z_prev", z_prev), _checks.check_float("eps", eps)
    _checks.check_same_shape(z_prev=z_prev, eps=eps)
    beta = _checks.per_example("beta_t", _checks.check_float("beta_t", beta_t), z_prev, "z_prev")
    _checks.check_in_range("beta_t", beta, 0.0, 1.0, "[0, 1]")
    return jnp.sqrt(1.0 - beta) * z_prev + jnp.sqrt(beta) * eps


def _posterior_coefficients(gamma_s, gamma_t):
    """Coefficients of q(z_s | z_t, x) in γ space (MATH.md §3), stable for γ_s = -inf (s = 0).

    With r = σ²_{t|s}/σ²_t = 1 - SNR(t)/SNR(s) = -expm1(γ_s - γ_t):
        mean = (α_t σ_s² / (α_s σ_t²)) z_t + α_s r x,   variance = r σ_s²,
    and α_t σ_s² / (α_s σ_t²) = exp((γ_s - γ_t)/2) σ_s / σ_t.
    """
    alpha_s, sigma_s = alpha_sigma(gamma_s)
    _, sigma_t = alpha_sigma(gamma_t)
    r = -jnp.expm1(gamma_s - gamma_t)
    coef_z = jnp.exp(0.5 * (gamma_s - gamma_t)) * sigma_s / sigma_t
    coef_x = alpha_s * r
    return coef_z, coef_x, r * jnp.square(sigma_s)


def q_posterior(x, z_t, gamma_s, gamma_t) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of q(z_s | z_t, x) for s < t (MATH.md §3).

        μ_q = (α_{t|s} σ_s² / σ_t²) z_t + (α_s σ²_{t|s} / σ_t²) x,   σ_q² = σ²_{t|s} σ_s² / σ_t²

    Computed in γ space; s = 0 in discrete time (γ_s = -inf) gives mean x and variance 0 exactly,
    which is DDPM's μ̃_1 = x, β̃_1 = 0.

    Args:
      x: data [B, ...].
      z_t: latent at t, x's shape.
      gamma_s, gamma_t: γ(s) < γ(t), scalars or [B].
    Returns:
      (mean, variance): mean of x's shape; variance of the broadcast shape of gamma_s, gamma_t
      (scalar or [B]: the posterior is isotropic).
    """
    x, z_t = _checks.check_float("x", x), _checks.check_float("z_t", z_t)
    _checks.check_same_shape(x=x, z_t=z_t)
    gs = _checks.check_float("gamma_s", gamma_s)
    gt = _checks.check_float("gamma_t", gamma_t)
    _checks.check_less("gamma_s", gs, "gamma_t", gt)
    coef_z, coef_x, var = _posterior_coefficients(gs, gt)
    mean = (_checks.per_example("gamma_s/gamma_t", coef_z, x) * z_t
            + _checks.per_example("gamma_s/gamma_t", coef_x, x) * x)
    return mean, var


# ---------------------------------------------------------------------------------------------
# Conversions between predictions (MATH.md §4)


def _latent_and(z_t, other, other_name):
    """Checks z_t and a prediction of its shape (floats, same shape); returns both as arrays."""
    z_t, other = _checks.check_float("z_t", z_t), _checks.check_float(other_name, other)
    _checks.check_same_shape(z_t=z_t, **{other_name: other})
    return z_t, other


def x_from_eps(z_t, eps, gamma_t) -> jax.Array:
    """x̂ = (z_t - σ_t ε̂) / α_t (MATH.md §4)."""
    z_t, eps = _latent_and(z_t, eps, "eps")
    alpha, sigma = _alpha_sigma_like(gamma_t, z_t, x_name="z_t")
    return (z_t - sigma * eps) / alpha


def eps_from_x(z_t, x, gamma_t) -> jax.Array:
    """ε̂ = (z_t - α_t x̂) / σ_t (MATH.md §4)."""
    z_t, x = _latent_and(z_t, x, "x")
    alpha, sigma = _alpha_sigma_like(gamma_t, z_t, x_name="z_t")
    return (z_t - alpha * x) / sigma


def score_from_eps(eps, gamma_t) -> jax.Array:
    """ŝ = -ε̂ / σ_t, the score ∇ log p(z_t) (MATH.md §4)."""
    eps = _checks.check_float("eps", eps)
    _, sigma = _alpha_sigma_like(gamma_t, eps, x_name="eps")
    return -eps / sigma


def eps_from_score(score, gamma_t) -> jax.Array:
    """ε̂ = -σ_t ŝ (MATH.md §4)."""
    score = _checks.check_float("score", score)
    _, sigma = _alpha_sigma_like(gamma_t, score, x_name="score")
    return -sigma * score


def v_from_eps(z_t, eps, gamma_t) -> jax.Array:
    """v̂ = α_t ε̂ - σ_t x̂ = (ε̂ - σ_t z_t) / α_t (MATH.md §4; Salimans & Ho 2022)."""
    z_t, eps = _latent_and(z_t, eps, "eps")
    alpha, sigma = _alpha_sigma_like(gamma_t, z_t, x_name="z_t")
    return (eps - sigma * z_t) / alpha


def eps_from_v(z_t, v, gamma_t) -> jax.Array:
    """ε̂ = σ_t z_t + α_t v̂ (MATH.md §4; uses α² + σ² = 1)."""
    z_t, v = _latent_and(z_t, v, "v")
    alpha, sigma = _alpha_sigma_like(gamma_t, z_t, x_name="z_t")
    return sigma * z_t + alpha * v


def x_from_v(z_t, v, gamma_t) -> jax.Array:
    """x̂ = α_t z_t - σ_t v̂ (MATH.md §4)."""
    z_t, v = _latent_and(z_t, v, "v")
    alpha, sigma = _alpha_sigma_like(gamma_t, z_t, x_name="z_t")
    return alpha * z_t - sigma * v


def check_prediction(kind: str) -> str:
    """Checks a prediction kind, one of 'eps', 'x', 'score', 'v'."""
    if not isinstance(kind, str) or kind not in PREDICTIONS:
        raise ValueError(f"kind must be one of {PREDICTIONS}, got {kind!r}.")
    return kind


def eps_and_x(prediction, z_t, gamma_t, kind: Prediction) -> tuple[jax.Array, jax.Array]:
    """Converts a network's prediction of any kind into (ε̂, x̂) (MATH.md §4).

    Args:
      prediction: the prediction [B, ...] of the given kind.
      z_t: the latent it was made from, same shape.
      gamma_t: γ(t), scalar or [B].
      kind: 'eps', 'x', 'score' or 'v'.
    Returns:
      (eps_hat, x_hat).
    """
    check_prediction(kind)
    z_t, prediction = _latent_and(z_t, prediction, "prediction")
    if kind == "x":
        return eps_from_x(z_t, prediction, gamma_t), prediction
    if kind == "v":
        return eps_from_v(z_t, prediction, gamma_t), x_from_v(z_t, prediction, gamma_t)
    eps = prediction if kind == "eps" else eps_from_score(prediction, gamma_t)
    return eps, x_from_eps(z_t, eps, gamma_t)
