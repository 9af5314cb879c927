"""The forward process q(z_t | x), the posterior q(z_s | z_t, x) and the prediction conversions.

docs/math.md §2 (forward), §3 (posterior), §4 (the equivalent predictions). Every function takes
γ values (γ = -log SNR) rather than a schedule, so it works for discrete and continuous time alike.
`x`, `z_t`, `eps` are [B, ...]; `gamma_*` is a scalar or [B], broadcast over each example's axes by
`per_example`. These are formulas: they check nothing but a `kind` they would otherwise read as
another (the entry points that call them check the rest, see `vdm_jax._checks`).
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from vdm_jax import _checks
from vdm_jax.schedules import alpha_sigma

Prediction = Literal["eps", "x", "score", "v"]
PREDICTIONS = ("eps", "x", "score", "v")



def per_example(value, x) -> jax.Array:
    """A scalar or per-example value [B] shaped to broadcast over x [B, ...]: [B] -> [B, 1, ..., 1].

    Any other shape (e.g. x's own) is returned as it is.
    """
    value = jnp.asarray(value)
    if value.ndim != 1:
        return value
    if value.shape[0] not in (1, jnp.shape(x)[0]):
        raise ValueError(f"a per-example value must be a scalar or [B] = [{jnp.shape(x)[0]}] (the data's batch "
                         f"axis), got shape {value.shape}.")
    return value.reshape(value.shape + (1,) * (jnp.ndim(x) - 1))


# ---------------------------------------------------------------------------------------------
# Forward process (docs/math.md §2)


def q_sample(x, eps, gamma_t) -> jax.Array:
    """Draws z_t ~ q(z_t | x) = N(α_t x, σ_t² I) as z_t = α_t x + σ_t ε (docs/math.md §2.1).

    Args:
      x: data [B, ...].
      eps: standard normal noise, x's shape.
      gamma_t: γ(t), scalar or [B].
    Returns:
      z_t, x's shape.
    """
    alpha, sigma = alpha_sigma(per_example(gamma_t, x))
    return alpha * x + sigma * eps


def q_step(z_prev, eps, beta_t) -> jax.Array:
    """One DDPM forward step, z_t = sqrt(1 - β_t) z_{t-1} + sqrt(β_t) ε (docs/math.md §2.2).

    Args:
      z_prev: z_{t-1} [B, ...].
      eps: standard normal noise, z_prev's shape.
      beta_t: β_t in [0, 1], scalar or [B].
    Returns:
      z_t, z_prev's shape.
    """
    beta_t = per_example(beta_t, z_prev)
    return jnp.sqrt(1.0 - beta_t) * z_prev + jnp.sqrt(beta_t) * eps


def _posterior_coefficients(gamma_s, gamma_t):
    """Coefficients of q(z_s | z_t, x) in γ space (docs/math.md §3.1), stable for γ_s = -inf (s = 0).

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
    """Mean and variance of q(z_s | z_t, x) for s < t (docs/math.md §3.1; DDPM's form §3.2).

        μ_q = (α_{t|s} σ_s² / σ_t²) z_t + (α_s σ²_{t|s} / σ_t²) x,   σ_q² = σ²_{t|s} σ_s² / σ_t²

    Computed in γ space; s = 0 in discrete time (γ_s = -inf) gives mean x and variance 0 exactly,
    which is DDPM's μ̃_1 = x, β̃_1 = 0.

    Args:
      x: data [B, ...].
      z_t: latent at t, x's shape.
      gamma_s, gamma_t: γ(s) < γ(t), scalars or [B].
    Returns:
      (mean, variance): mean of x's shape; the variance is a scalar, or [B, 1, ..., 1] for [B]
      γ's (the posterior is isotropic), so that `mean + sqrt(variance) * noise` is a draw.
    """
    coef_z, coef_x, var = _posterior_coefficients(per_example(gamma_s, x), per_example(gamma_t, x))
    return coef_z * z_t + coef_x * x, var


# ---------------------------------------------------------------------------------------------
# Conversions between predictions (docs/math.md §4)


def x_from_eps(z_t, eps, gamma_t) -> jax.Array:
    """x̂ = (z_t - σ_t ε̂) / α_t (docs/math.md §4). z_t, eps: [B, ...]; gamma_t: scalar or [B]."""
    alpha, sigma = alpha_sigma(per_example(gamma_t, z_t))
    return (z_t - sigma * eps) / alpha


def eps_from_x(z_t, x, gamma_t) -> jax.Array:
    """ε̂ = (z_t - α_t x̂) / σ_t (docs/math.md §4)."""
    alpha, sigma = alpha_sigma(per_example(gamma_t, z_t))
    return (z_t - alpha * x) / sigma


def score_from_eps(eps, gamma_t) -> jax.Array:
    """ŝ = -ε̂ / σ_t, the score ∇ log p(z_t) (docs/math.md §4)."""
    return -eps / alpha_sigma(per_example(gamma_t, eps))[1]


def eps_from_score(score, gamma_t) -> jax.Array:
    """ε̂ = -σ_t ŝ (docs/math.md §4)."""
    return -alpha_sigma(per_example(gamma_t, score))[1] * score


def v_from_eps(z_t, eps, gamma_t) -> jax.Array:
    """v̂ = α_t ε̂ - σ_t x̂ = (ε̂ - σ_t z_t) / α_t (docs/math.md §4; Salimans & Ho 2022)."""
    alpha, sigma = alpha_sigma(per_example(gamma_t, z_t))
    return (eps - sigma * z_t) / alpha


def eps_from_v(z_t, v, gamma_t) -> jax.Array:
    """ε̂ = σ_t z_t + α_t v̂ (docs/math.md §4; uses α² + σ² = 1)."""
    alpha, sigma = alpha_sigma(per_example(gamma_t, z_t))
    return sigma * z_t + alpha * v


def x_from_v(z_t, v, gamma_t) -> jax.Array:
    """x̂ = α_t z_t - σ_t v̂ (docs/math.md §4)."""
    alpha, sigma = alpha_sigma(per_example(gamma_t, z_t))
    return alpha * z_t - sigma * v


def eps_and_x(prediction, z_t, gamma_t, *, kind: Prediction) -> tuple[jax.Array, jax.Array]:
    """Converts a network's prediction of any kind into (ε̂, x̂) (docs/math.md §4.1).

    Args:
      prediction: the prediction [B, ...] of the given kind.
      z_t: the latent it was made from, same shape.
      gamma_t: γ(t), scalar or [B].
      kind: 'eps', 'x', 'score' or 'v'.
    Returns:
      (eps_hat, x_hat), z_t's shape.
    """
    _checks.arguments("eps_and_x", kind=kind)  # (an unknown kind would be read as another)
    if kind == "x":
        return eps_from_x(z_t, prediction, gamma_t), prediction
    if kind == "v":
        return eps_from_v(z_t, prediction, gamma_t), x_from_v(z_t, prediction, gamma_t)
    eps = prediction if kind == "eps" else eps_from_score(prediction, gamma_t)
    return eps, x_from_eps(z_t, eps, gamma_t)


def prediction_target(x, eps, gamma_t, *, kind: Prediction) -> jax.Array:
    """What a network of the given kind is trained to output for z_t = α_t x + σ_t ε (docs/math.md §4.2).

        'eps': ε,   'x': x,   'v': α_t ε - σ_t x,   'score': ∇ log q(z_t | x) = -ε/σ_t

    Args:
      x: data [B, ...].
      eps: the noise that made z_t, x's shape.
      gamma_t: γ(t), scalar or [B].
      kind: 'eps', 'x', 'score' or 'v'.
    Returns:
      the target, x's shape.
    """
    _checks.arguments("prediction_target", kind=kind)
    if kind == "eps":
        return eps
    if kind == "x":
        return x
    alpha, sigma = alpha_sigma(per_example(gamma_t, x))
    return alpha * eps - sigma * x if kind == "v" else -eps / sigma
