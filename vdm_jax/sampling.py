"""Samplers: DDPM ancestral, VDM continuous-time ancestral, DDIM, and the fast deterministic ones:
DPM-Solver++(2M) and the probability-flow ODE by Heun's or Euler's method (docs/math.md §6).

Each runs its whole reverse chain as one `lax.scan` (no Python loop per step), so under `jax.jit`
it is a single compiled program. Each takes a prediction function `pred_fn(z_t, t)` returning a
prediction of the given kind ('eps', 'x', 'score' or 'v'), with t a float [B] array in [0, 1]
(DDPM step i is t = i/T). Each returns the data estimate x = z_0 / α(t_0), or with
`return_latent=True` the pair (x, z_0).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import jax
import jax.numpy as jnp

from vdm_jax import _checks
from vdm_jax.diffusion import Prediction, eps_and_x, q_posterior
from vdm_jax.losses import ReverseVariance, reverse_log_variance
from vdm_jax.schedules import DiscreteSchedule, alpha_sigma


def _prediction(pred_fn, z, t, gamma_t, kind, clip_x, learned=False):
    """(ε̂, x̂, v) from pred_fn at (z, t); with clip_x, x̂ is clipped and ε̂ made to agree with it."""
    out, v = _checks.split_prediction(pred_fn(z, jnp.full(z.shape[:1], t, jnp.result_type(t))), z, learned)
    eps_hat, x_hat = eps_and_x(out, z, gamma_t, kind=kind)
    if clip_x is not None:  # DDPM's clip_denoised
        x_hat = jnp.clip(x_hat, *clip_x)
        alpha, sigma = alpha_sigma(gamma_t)
        eps_hat = (z - alpha * x_hat) / sigma
    return eps_hat, x_hat, v


def _result(z_0, gamma_0, return_latent):
    x = z_0 / alpha_sigma(gamma_0)[0]
    return (x, z_0) if return_latent else x


def ddpm_sample(pred_fn: Callable, schedule: DiscreteSchedule, shape: Sequence[int], *, key,
                kind: Prediction = "eps", variance: ReverseVariance = "posterior",
                clip_x: tuple[float, float] | None = None, return_latent: bool = False, dtype=None):
    """DDPM ancestral sampling (Ho et al. 2020; docs/math.md §6.2).

        z_T ~ N(0, I);  z_{i-1} = μ̃_i(x̂, z_i) + σ_i ε for i = T..1, no noise at i = 1,

    with σ_i² = β̃_i ('posterior'), β_i ('beta'), or learned (pred_fn returns (prediction, v)).
    μ̃_1(x̂, z_1) = x̂, so z_0 is the last data prediction and α(0) = 1: x = z_0.

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction` with t = i/T, float [B].
      schedule: the DiscreteSchedule.
      shape: [B, ...] of the samples.
      key: PRNG key.
      kind: what pred_fn predicts.
      variance: reverse variance.
      clip_x: optional (lo, hi) clip of x̂ at every step (DDPM clips to (-1, 1) for images).
      return_latent: also return z_0.
      dtype: of the samples (default: the schedule's).
    Returns:
      x of `shape`, or (x, z_0).
    """
    _checks.arguments("ddpm_sample", schedule=schedule, shape=shape, kind=kind, variance=variance, clip_x=clip_x)
    dtype = dtype or schedule.dtype
    key_init, key_steps = jax.random.split(key)
    z_T = jax.random.normal(key_init, tuple(shape), dtype)

    def step(z, i):
        return _ddpm_step(pred_fn, schedule, z, i, key_steps, kind, variance, clip_x), None

    z_0, _ = jax.lax.scan(step, z_T, jnp.arange(schedule.T, 0, -1))
    return (z_0, z_0) if return_latent else z_0


def ddpm_step(pred_fn: Callable, schedule: DiscreteSchedule, z, step, *, key, kind: Prediction = "eps",
              variance: ReverseVariance = "posterior", clip_x: tuple[float, float] | None = None) -> jax.Array:
    """One step z_i -> z_{i-1} of `ddpm_sample` (its scan body), for a scalar integer step i in 1..T.

    The noise is `normal(fold_in(key, i))`, so T calls of this function from i = T down to 1 with
    the `key_steps` half of `jax.random.split(key)` reproduce `ddpm_sample(..., key=key)`. Use it
    to drive the chain from Python (e.g. to look at intermediate steps); `ddpm_sample` runs it as
    one compiled `lax.scan`.

    Args:
      pred_fn, schedule, key, kind, variance, clip_x: as in `ddpm_sample`.
      z: z_i [B, ...].
      step: i, a scalar integer.
    Returns:
      z_{i-1}, z's shape and dtype.
    """
    _checks.arguments("ddpm_step", schedule=schedule, z=z, kind=kind, variance=variance, clip_x=clip_x)
    if jnp.ndim(step) != 0 or not jnp.issubdtype(jnp.result_type(step), jnp.integer):
        raise ValueError(f"ddpm_step: step must be a scalar integer in 1..T, got {jnp.result_type(step)} of shape "
                         f"{jnp.shape(step)}.")
    return _ddpm_step(pred_fn, schedule, z, jnp.asarray(step), key, kind, variance, clip_x)


def _ddpm_step(pred_fn, schedule, z, step, key, kind, variance, clip_x):
    gamma_s, gamma_t = schedule.gamma_step(step - 1), schedule.gamma_step(step)
    t = step.astype(z.dtype) / schedule.T
    _, x_hat, v = _prediction(pred_fn, z, t, gamma_t, kind, clip_x, variance == "learned")
    mean, _ = q_posterior(x_hat, z, gamma_s, gamma_t)
    std = jnp.where(step > 1, jnp.exp(0.5 * reverse_log_variance(gamma_s, gamma_t, kind=variance, v=v)), 0.0)
    noise = jax.random.normal(jax.random.fold_in(key, step), z.shape, z.dtype)
    return (mean + std * noise).astype(z.dtype)


def vdm_sample(pred_fn: Callable, gamma_fn: Callable, shape: Sequence[int], *, key, sample_steps: int,
               kind: Prediction = "eps", clip_x: tuple[float, float] | None = None,
               return_latent: bool = False, dtype=jnp.float32):
    """VDM's ancestral sampler with any number of steps (Kingma et al. 2021; docs/math.md §6.3).

    t_i = i/N; z_1 ~ N(0, I); for i = N..1, z_s ~ q(z_s | z_t, x = x̂(z_t; t)) with s = t - 1/N
    (the posterior of docs/math.md §3.1, noise at every step). Returns the decoder's mean z_0/α_0.

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction`, t float [B] in [0, 1].
      gamma_fn: the schedule t -> γ(t), finite on [0, 1].
      shape: [B, ...] of the samples.
      key: PRNG key.
      sample_steps: N >= 1.
      kind, clip_x, return_latent: as in `ddpm_sample`.
      dtype: of the samples.
    Returns:
      x = z_0/α_0 of `shape`, or (x, z_0).
    """
    _checks.arguments("vdm_sample", shape=shape, sample_steps=sample_steps, kind=kind, clip_x=clip_x)
    shape = tuple(shape)
    key_init, key_steps = jax.random.split(key)
    z_1 = jax.random.normal(key_init, shape, dtype)

    def step(z, i):
        t, s = i.astype(dtype) / sample_steps, (i - 1).astype(dtype) / sample_steps
        gamma_s, gamma_t = gamma_fn(s), gamma_fn(t)
        _, x_hat, _ = _prediction(pred_fn, z, t, gamma_t, kind, clip_x)
        mean, var = q_posterior(x_hat, z, gamma_s, gamma_t)
        noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, dtype)
        return (mean + jnp.sqrt(var) * noise).astype(dtype), None

    z_0, _ = jax.lax.scan(step, z_1, jnp.arange(sample_steps, 0, -1))
    return _result(z_0, gamma_fn(jnp.zeros((), dtype)), return_latent)


def strided_times(T: int, sample_steps: int) -> np.ndarray:
    """Evenly strided times 1 = t_N > ... > t_0 = 0 on the grid i/T of a T-step schedule, for DDIM.

    Args:
      T: steps of the schedule, >= 1.
      sample_steps: N in 1..T.
    Returns:
      NumPy float32 [N + 1] times i/T, decreasing from 1 to 0.
    """
    _checks.arguments("strided_times", T=T, sample_steps=sample_steps)
    if not 1 <= sample_steps <= T:
        raise ValueError(f"strided_times: sample_steps must be in 1..T = 1..{T}, got {sample_steps}.")
    steps = np.round(np.linspace(T, 0, sample_steps + 1))
    return (steps / T).astype(np.float32)


def ddim_sample(pred_fn: Callable, gamma_fn: Callable, times, shape: Sequence[int], *, key,
                kind: Prediction = "eps", eta: float = 0.0, clip_x: tuple[float, float] | None = None,
                return_latent: bool = False, dtype=jnp.float32):
    """DDIM (Song et al. 2021; docs/math.md §6.4) on any strictly decreasing sequence of times.

        z_s = α_s x̂ + sqrt(σ_s² - σ_η²) ε̂ + σ_η ε,
        σ_η = η sqrt(σ_s²/σ_t²) sqrt(1 - α_t²/α_s²)

    η = 0 is deterministic; η = 1 is ancestral sampling with σ² = β̃. Starts from z ~ N(0, I) at
    times[0]. With a DiscreteSchedule and times ending in 0 (e.g. `strided_times`), the last step
    lands on α = 1, σ = 0 and z_0 = x̂.

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction`, t float [B] in [0, 1].
      gamma_fn: the schedule t -> γ(t).
      times: [N + 1] strictly decreasing floats t_N > ... > t_0 in [0, 1].
      shape: [B, ...] of the samples.
      key: PRNG key.
      kind: what pred_fn predicts.
      eta: η in [0, 1].
      clip_x, return_latent: as in `ddpm_sample`.
      dtype: of the samples.
    Returns:
      x = z_0/α(t_0) of `shape`, or (x, z_0).
    """
    _checks.arguments("ddim_sample", times=times, shape=shape, kind=kind, eta=eta, clip_x=clip_x)
    shape, times = tuple(shape), jnp.asarray(times)
    key_init, key_steps = jax.random.split(key)
    z = jax.random.normal(key_init, shape, dtype)

    def step(z, inputs):
        i, t, s = inputs
        gamma_t, gamma_s = gamma_fn(t), gamma_fn(s)
        eps_hat, x_hat, _ = _prediction(pred_fn, z, t, gamma_t, kind, clip_x)
        alpha_s, sigma_s = alpha_sigma(gamma_s)
        # σ_η² = η² σ_s²/σ_t² (1 - α_t²/α_s²); log(α_t²/α_s²) = softplus(γ_s) - softplus(γ_t).
        var_eta = (eta ** 2 * jnp.exp(jax.nn.softplus(-gamma_t) - jax.nn.softplus(-gamma_s))
                   * -jnp.expm1(jax.nn.softplus(gamma_s) - jax.nn.softplus(gamma_t)))
        var_eta = jnp.where(jnp.isneginf(gamma_s), 0.0, var_eta)  # s = 0: σ_s = 0
        dir_scale = jnp.sqrt(jnp.maximum(jnp.square(sigma_s) - var_eta, 0.0))
        noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, dtype)
        return (alpha_s * x_hat + dir_scale * eps_hat + jnp.sqrt(var_eta) * noise).astype(dtype), None

    n = times.shape[0] - 1
    z_0, _ = jax.lax.scan(step, z, (jnp.arange(n), times[:-1], times[1:]))
    return _result(z_0, gamma_fn(times[-1]), return_latent)


# --- fast deterministic samplers: the probability-flow ODE ----------------------------------------

SPACINGS = ("logsnr", "time", "edm")


def _time_of_gamma(gamma_fn, gamma, lo, hi, iterations: int = 64):
    """t in [lo, hi] with γ(t) = `gamma` (any shape), by bisection: every schedule is increasing."""
    lo, hi = jnp.full_like(gamma, lo), jnp.full_like(gamma, hi)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        below = gamma_fn(mid) < gamma
        lo, hi = jnp.where(below, mid, lo), jnp.where(below, hi, mid)
    return 0.5 * (lo + hi)


def solver_times(gamma_fn: Callable, sample_steps: int, *, spacing: str = "logsnr", rho: float = 7.0,
                 dtype=jnp.float32) -> jax.Array:
    """The N + 1 decreasing times 1 = t_N > ... > t_0 of an N-step ODE sampler (docs/math.md §6.5).

    The times are evenly spaced between t = 1 and the least noisy time t_min in one of three
    variables: 'logsnr', λ = -γ/2 (DPM-Solver's choice for small images); 'time', t itself;
    'edm', ς^(1/ρ) with ς = σ/α = exp(γ/2) (Karras et al. 2022's spacing, ρ = 7). For a continuous
    schedule t_min = 0 = t_0. A `DiscreteSchedule` has γ(0) = -∞ (clean data), where λ and ς are
    infinite: its grid is N points from t = 1 to t_min = 1/T, and the last step goes from there
    to t_0 = 0 (σ = 0), where the samplers take a first-order step, as DPM-Solver does.

    Args:
      gamma_fn: the schedule t -> γ(t) (a DiscreteSchedule, a continuous or a learned one).
      sample_steps: N >= 1.
      spacing: 'logsnr', 'time' or 'edm'.
      rho: ρ of the 'edm' spacing.
      dtype: of the times.
    Returns:
      [N + 1] times, t_N = 1 first, t_0 last.
    """
    _checks.arguments("solver_times", sample_steps=sample_steps, spacing=spacing)
    discrete = isinstance(gamma_fn, DiscreteSchedule)
    t_min = 1.0 / gamma_fn.T if discrete else 0.0
    n = sample_steps - 1 if discrete else sample_steps  # intervals evenly spaced
    if n == 0:  # one step of a discrete schedule: from t = 1 straight to the data
        return jnp.asarray([1.0, 0.0], dtype)
    u = jnp.linspace(0.0, 1.0, n + 1, dtype=dtype)[1:-1]
    g_max, g_min = gamma_fn(jnp.ones((), dtype)), gamma_fn(jnp.full((), t_min, dtype))
    if spacing == "time":
        inner = 1.0 - u * (1.0 - t_min)
    else:
        if spacing == "logsnr":  # γ linear in u
            gamma = g_max + u * (g_min - g_max)
        else:  # ς^(1/ρ) = exp(γ/(2ρ)) linear in u
            gamma = 2.0 * rho * jnp.log(jnp.exp(g_max / (2.0 * rho)) + u * (jnp.exp(g_min / (2.0 * rho))
                                                                             - jnp.exp(g_max / (2.0 * rho))))
        inner = _time_of_gamma(gamma_fn, gamma, t_min, 1.0)
    ends = [jnp.full((1,), t_min, dtype)] + ([jnp.zeros((1,), dtype)] if discrete else [])
    return jnp.concatenate([jnp.ones((1,), dtype), inner.astype(dtype), *ends])


def _ratios(gamma_t, gamma_s):
    """(σ_s/σ_t, α_s, 1 - exp(-h)) for the step t -> s, h = λ_s - λ_t = (γ_t - γ_s)/2; exact at γ_s = -∞."""
    sigma_ratio = jnp.exp(-0.5 * (jax.nn.softplus(-gamma_s) - jax.nn.softplus(-gamma_t)))
    return sigma_ratio, alpha_sigma(gamma_s)[0], -jnp.expm1(0.5 * (gamma_s - gamma_t))


def dpm_solver_sample(pred_fn: Callable, gamma_fn: Callable, times, shape: Sequence[int], *, key,
                      kind: Prediction = "eps", order: int = 2, lower_order_final: bool = True,
                      clip_x: tuple[float, float] | None = None, return_latent: bool = False, dtype=jnp.float32):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the probability-flow ODE solved in λ = -γ/2
    with the data prediction, multistep (docs/math.md §6.6). One network evaluation per step.

    For each step t -> s of `times` (h = λ_s - λ_t, and h' the step before's):

        z_s = (σ_s/σ_t) z_t + α_s (1 - e^(-h)) D,
        D = x̂_t (first order: the first step; DDIM)   or   D = (1 + 1/(2r)) x̂_t - 1/(2r) x̂_t' (r = h'/h).

    The final step is first order when it lands on σ = 0 (a discrete schedule's t = 0, where h is
    infinite), and, with `lower_order_final`, whenever N < 15 (diffusers' default, which steadies
    sampling with few steps).

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction`, t float [B] in [0, 1].
      gamma_fn: the schedule t -> γ(t).
      times: [N + 1] strictly decreasing times t_N > ... > t_0 in [0, 1] (e.g. `solver_times`).
      shape: [B, ...] of the samples.
      key: PRNG key (only the starting noise z ~ N(0, I) at times[0]).
      kind: what pred_fn predicts.
      order: 1 (DDIM, η = 0) or 2.
      lower_order_final: a first-order last step for N < 15.
      clip_x, return_latent: as in `ddpm_sample`.
      dtype: of the samples.
    Returns:
      x = z_0/α(t_0) of `shape`, or (x, z_0).
    """
    _checks.arguments("dpm_solver_sample", times=times, shape=shape, kind=kind, order=order, clip_x=clip_x)
    shape, times = tuple(shape), jnp.asarray(times)
    z = jax.random.normal(jax.random.split(key)[0], shape, dtype)
    n = times.shape[0] - 1
    gammas = gamma_fn(times)
    final_first = lower_order_final and n < 15

    def step(carry, inputs):
        z, x_prev, h_prev = carry
        i, t, gamma_t, gamma_s = inputs
        _, x_hat, _ = _prediction(pred_fn, z, t, gamma_t, kind, clip_x)
        h = 0.5 * (gamma_t - gamma_s)
        r = h_prev / h
        second = (order == 2) & (i > 0) & jnp.isfinite(h) & ~((i == n - 1) & final_first)
        d = jnp.where(second, (1.0 + 0.5 / r) * x_hat - (0.5 / r) * x_prev, x_hat)
        sigma_ratio, alpha_s, one_minus = _ratios(gamma_t, gamma_s)
        return ((sigma_ratio * z + alpha_s * one_minus * d).astype(dtype), x_hat, h), None

    carry = (z, jnp.zeros(shape, dtype), jnp.ones((), gammas.dtype))
    (z_0, _, _), _ = jax.lax.scan(step, carry, (jnp.arange(n), times[:-1], gammas[:-1], gammas[1:]))
    return _result(z_0, gammas[-1], return_latent)


def ode_sample(pred_fn: Callable, gamma_fn: Callable, times, shape: Sequence[int], *, key, method: str = "heun",
               kind: Prediction = "eps", clip_x: tuple[float, float] | None = None, return_latent: bool = False,
               dtype=jnp.float32):
    """The probability-flow ODE in Karras et al. 2022's (EDM) variables, by Heun's or Euler's method
    (docs/math.md §6.7).

    With x̃ = z/α and ς = σ/α = exp(γ/2) the ODE is dx̃/dς = ε̂(z, t). For each step t -> s,
    Δ = ς_s - ς_t:

        Euler:  x̃_s = x̃_t + Δ ε̂_t                        (this is DDIM, η = 0)
        Heun:   x̃' = x̃_t + Δ ε̂_t,  x̃_s = x̃_t + Δ (ε̂_t + ε̂(α_s x̃', s))/2

    Heun's last step is Euler's where it lands on ς = 0 (a discrete schedule's t = 0). Network
    evaluations: N for Euler; 2N for Heun, 2N - 1 when the last time has σ = 0.

    Args:
      pred_fn, gamma_fn, times, shape, kind, clip_x, return_latent, dtype: as in `dpm_solver_sample`.
      key: PRNG key (only the starting noise).
      method: 'heun' (second order) or 'euler' (first order).
    Returns:
      x = z_0/α(t_0) of `shape`, or (x, z_0).
    """
    _checks.arguments("ode_sample", times=times, shape=shape, kind=kind, method=method, clip_x=clip_x)
    shape, times = tuple(shape), jnp.asarray(times)
    z = jax.random.normal(jax.random.split(key)[0], shape, dtype)
    gammas = gamma_fn(times)

    def eps(z, t, gamma):
        return _prediction(pred_fn, z, t, gamma, kind, clip_x)[0]

    def step(z, inputs):
        t, s, gamma_t, gamma_s = inputs
        alpha_t, alpha_s = alpha_sigma(gamma_t)[0], alpha_sigma(gamma_s)[0]
        delta = jnp.exp(0.5 * gamma_s) - jnp.exp(0.5 * gamma_t)
        x_t = z / alpha_t
        eps_t = eps(z, t, gamma_t)
        euler = x_t + delta * eps_t
        if method == "euler":
            return (alpha_s * euler).astype(dtype), None
        x_s = jax.lax.cond(gamma_s > -jnp.inf,
                           lambda: x_t + 0.5 * delta * (eps_t + eps(alpha_s * euler, s, gamma_s)),
                           lambda: euler)
        return (alpha_s * x_s).astype(dtype), None

    z_0, _ = jax.lax.scan(step, z, (times[:-1], times[1:], gammas[:-1], gammas[1:]))
    return _result(z_0, gammas[-1], return_latent)
