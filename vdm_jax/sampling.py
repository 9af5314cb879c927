"""Samplers: DDPM ancestral, VDM continuous-time ancestral, DDIM (MATH.md §6).

Each runs its whole reverse chain as one `lax.scan` (no Python loop per step), so under `jax.jit`
it is a single compiled program. Each takes a prediction function `pred_fn(z_t, t)` returning a
prediction of the given kind ('eps', 'x', 'score' or 'v'); `t` is passed as a [B] array (int32
steps for discrete schedules, floats in [0, 1] for continuous ones).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import jax
import jax.numpy as jnp

from vdm_jax import _checks
from vdm_jax.diffusion import Prediction, check_prediction, eps_and_x, q_posterior
from vdm_jax.losses import ReverseVariance, check_variance, reverse_log_variance
from vdm_jax.schedules import DiscreteSchedule, alpha_sigma


_USE_CONTINUOUS = "; for a continuous schedule use vdm_sample or ddim_sample"


def _check_shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"shape must be a tuple of ints [B, ...], got {shape!r}.")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes [B, ...], got {shape}.")
    return shape


def _check_clip(clip_x) -> None:
    if clip_x is None:
        return
    if not (isinstance(clip_x, (tuple, list)) and len(clip_x) == 2 and clip_x[0] < clip_x[1]):
        raise ValueError(f"clip_x must be None or a pair (lo, hi) with lo < hi, got {clip_x!r}.")


def _prediction(pred_fn, z, t, gamma_t, kind, clip_x, learned=False):
    out, v = _checks.split_prediction(pred_fn(z, t), learned)
    eps_hat, x_hat = eps_and_x(out, z, gamma_t, kind)
    if clip_x is not None:  # clip the data prediction and make ε̂ agree with it (DDPM's clip_denoised)
        x_hat = jnp.clip(x_hat, *clip_x)
        alpha, sigma = alpha_sigma(gamma_t)
        eps_hat = (z - alpha * x_hat) / sigma
    return eps_hat, x_hat, v


def ddpm_sample(pred_fn: Callable, schedule: DiscreteSchedule, shape: Sequence[int], key, *,
                kind: Prediction = "eps", variance: ReverseVariance = "posterior",
                clip_x: tuple[float, float] | None = None, dtype=None) -> jax.Array:
    """DDPM ancestral sampling (Ho et al. 2020; MATH.md §6).

        z_T ~ N(0, I);  z_{t-1} = μ̃_t(x̂, z_t) + σ_t ε for t = T..1, no noise at t = 1,

    with σ_t² = β̃_t ('posterior'), β_t ('beta'), or learned (pred_fn returns (prediction, v)).
    μ̃_1(x̂, z_1) = x̂, so the result is the last data prediction.

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction` with t int32 [B].
      schedule: the DiscreteSchedule.
      shape: [B, ...] of the samples.
      key: PRNG key.
      kind: what pred_fn predicts.
      variance: reverse variance.
      clip_x: optional (lo, hi) clip of x̂ at every step (DDPM clips to (-1, 1) for images).
    Returns:
      samples of `shape`.
    """
    _checks.check_instance("schedule", schedule, DiscreteSchedule, _USE_CONTINUOUS)
    check_prediction(kind)
    check_variance(variance)
    _check_clip(clip_x)
    shape = _check_shape(shape)
    dtype = dtype or schedule.dtype
    key_init, key_steps = jax.random.split(key)
    z_T = jax.random.normal(key_init, shape, dtype)

    def step(z, t):
        return ddpm_step(pred_fn, schedule, z, t, key_steps, kind=kind, variance=variance, clip_x=clip_x), None

    z_0, _ = jax.lax.scan(step, z_T, jnp.arange(schedule.T, 0, -1))
    return z_0


def ddpm_step(pred_fn: Callable, schedule: DiscreteSchedule, z, t, key, *, kind: Prediction = "eps",
              variance: ReverseVariance = "posterior", clip_x: tuple[float, float] | None = None) -> jax.Array:
    """One step z_t -> z_{t-1} of `ddpm_sample` (its scan body), for a scalar integer t in 1..T.

    The noise is `normal(fold_in(key, t))`, so T calls of this function from t = T down to 1 with
    the `key_steps` half of `jax.random.split(key)` reproduce `ddpm_sample(..., key)`. Use it to
    drive the chain from Python (e.g. to look at intermediate steps); `ddpm_sample` runs it as one
    compiled `lax.scan`, which is much faster for small models.
    """
    _checks.check_instance("schedule", schedule, DiscreteSchedule, _USE_CONTINUOUS)
    check_variance(variance)
    _check_clip(clip_x)
    z = _checks.check_float("z", z)
    _checks.check_batched("z", z)
    t = jnp.asarray(t)
    if t.ndim != 0 or not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"t must be a scalar integer step in 1..T, got shape {t.shape} and dtype {t.dtype}.")
    _checks.check_in_range("t", t, 1, schedule.T, f"1..T = 1..{schedule.T}")
    shape = z.shape
    gamma_s, gamma_t = schedule.gamma(t - 1), schedule.gamma(t)
    t_vec = jnp.full(shape[:1], t, jnp.int32)
    _, x_hat, v = _prediction(pred_fn, z, t_vec, gamma_t, kind, clip_x, variance == "learned")
    mean, _ = q_posterior(x_hat, z, gamma_s, gamma_t)
    std = jnp.where(t > 1, jnp.exp(0.5 * reverse_log_variance(gamma_s, gamma_t, variance, v)), 0.0)
    noise = jax.random.normal(jax.random.fold_in(key, t), shape, z.dtype)
    return (mean + std * noise).astype(z.dtype)


def vdm_sample(pred_fn: Callable, gamma_fn: Callable, shape: Sequence[int], key, *, num_steps: int,
               kind: Prediction = "eps", clip_x: tuple[float, float] | None = None,
               return_latent: bool = False, dtype=jnp.float32) -> jax.Array:
    """VDM's ancestral sampler with any number of steps (Kingma et al. 2021; MATH.md §6).

    t_i = i/N; z_1 ~ N(0, I); for i = N..1, z_s ~ q(z_s | z_t, x = x̂(z_t; t)) with s = t - 1/N
    (the posterior of MATH.md §3, noise at every step). Returns the decoder's mean z_0/α_0.

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction` with t float [B].
      gamma_fn: the schedule t -> γ(t), finite on [0, 1].
      shape, key: sample shape [B, ...] and PRNG key.
      num_steps: N >= 1.
      kind, clip_x: as in `ddpm_sample`.
      return_latent: return z_0 instead of z_0/α_0.
    """
    check_prediction(kind)
    _check_clip(clip_x)
    shape = _check_shape(shape)
    num_steps = _checks.check_int("num_steps", num_steps, 1)
    key_init, key_steps = jax.random.split(key)
    z_1 = jax.random.normal(key_init, shape, dtype)

    def step(z, i):
        t, s = i.astype(dtype) / num_steps, (i - 1).astype(dtype) / num_steps
        gamma_s, gamma_t = gamma_fn(s), gamma_fn(t)
        _, x_hat, _ = _prediction(pred_fn, z, jnp.full(shape[:1], t, dtype), gamma_t, kind, clip_x)
        mean, var = q_posterior(x_hat, z, gamma_s, gamma_t)
        noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, dtype)
        return (mean + jnp.sqrt(var) * noise).astype(dtype), None

    z_0, _ = jax.lax.scan(step, z_1, jnp.arange(num_steps, 0, -1))
    if return_latent:
        return z_0
    return z_0 / alpha_sigma(gamma_fn(jnp.zeros((), dtype)))[0]


def strided_times(T: int, num_steps: int) -> np.ndarray:
    """Evenly strided integer times T = t_N > ... > t_0 = 0 for DDIM on a T-step schedule."""
    T, num_steps = _checks.check_int("T", T, 1), _checks.check_int("num_steps", num_steps, 1)
    if not num_steps <= T:
        raise ValueError(f"num_steps must be in 1..T = 1..{T}, got {num_steps}.")
    return np.round(np.linspace(T, 0, num_steps + 1)).astype(np.int32)


def _check_times(times, gamma_fn):
    """Checks that `times` is [N + 1], strictly decreasing and (when concrete) in gamma_fn's domain."""
    value = _checks.concrete_or_none(times)
    if jnp.ndim(times) != 1 or jnp.shape(times)[0] < 2:
        raise ValueError(f"times must be a 1-D array of at least 2 times (t_N > ... > t_0), got shape "
                         f"{jnp.shape(times)}.")
    if value is None:
        return jnp.asarray(times)
    if not np.all(np.diff(value) < 0):
        raise ValueError(f"times must be strictly decreasing, got {value.tolist()}.")
    try:  # gamma_fn checks its own domain on concrete times (e.g. 0..T, or [0, 1]), also inside jit.
        with jax.ensure_compile_time_eval():
            gammas = _checks.concrete_or_none(gamma_fn(jnp.asarray(value)))
    except (TypeError, ValueError) as e:
        raise type(e)(f"times (from {value[0]} down to {value[-1]}) are not valid for gamma_fn: {e}") from None
    if gammas is not None and np.any(np.isnan(gammas)):
        raise ValueError(f"times (from {value[0]} down to {value[-1]}) are not valid for gamma_fn: it gives "
                         f"NaN at {value[np.isnan(gammas)].tolist()}.")
    return jnp.asarray(times)


def ddim_sample(pred_fn: Callable, gamma_fn: Callable, times, shape: Sequence[int], key, *,
                kind: Prediction = "eps", eta: float = 0.0, clip_x: tuple[float, float] | None = None,
                dtype=jnp.float32) -> jax.Array:
    """DDIM (Song et al. 2021; MATH.md §6) on any strictly decreasing sequence of times.

        z_s = α_s x̂ + sqrt(σ_s² - σ_η²) ε̂ + σ_η ε,   σ_η = η sqrt(σ_s²/σ_t²) sqrt(1 - α_t²/α_s²)

    η = 0 is deterministic; η = 1 is ancestral sampling with σ² = β̃. Starts from z ~ N(0, I) at
    times[0]. With a discrete schedule (`gamma_fn = schedule.gamma`, integer times ending in 0,
    e.g. `strided_times`) the last step lands on α = 1, σ = 0 and returns x̂.

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction`, t [B] of times' dtype.
      gamma_fn: t -> γ(t) for the values in `times`.
      times: [N + 1] strictly decreasing times t_N > ... > t_0.
      shape, key: sample shape [B, ...] and PRNG key.
      kind: what pred_fn predicts.
      eta: η in [0, 1].
      clip_x: optional clip of x̂.
    """
    check_prediction(kind)
    _check_clip(clip_x)
    shape = _check_shape(shape)
    times = _check_times(times, gamma_fn)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}.")
    key_init, key_steps = jax.random.split(key)
    z = jax.random.normal(key_init, shape, dtype)

    def step(z, inputs):
        i, t, s = inputs
        gamma_t, gamma_s = gamma_fn(t), gamma_fn(s)
        eps_hat, x_hat, _ = _prediction(pred_fn, z, jnp.full(shape[:1], t, times.dtype), gamma_t, kind, clip_x)
        alpha_s, sigma_s = alpha_sigma(gamma_s)
        # σ_η² = η² σ_s²/σ_t² (1 - α_t²/α_s²); log(α_t²/α_s²) = softplus(γ_s) - softplus(γ_t).
        var_eta = (eta ** 2 * jnp.exp(jax.nn.softplus(-gamma_t) - jax.nn.softplus(-gamma_s))
                   * -jnp.expm1(jax.nn.softplus(gamma_s) - jax.nn.softplus(gamma_t)))
        var_eta = jnp.where(jnp.isneginf(gamma_s), 0.0, var_eta)  # s = 0: σ_s = 0
        dir_scale = jnp.sqrt(jnp.maximum(jnp.square(sigma_s) - var_eta, 0.0))
        noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, dtype)
        return (alpha_s * x_hat + dir_scale * eps_hat + jnp.sqrt(var_eta) * noise).astype(dtype), None

    n = times.shape[0] - 1
    z, _ = jax.lax.scan(step, z, (jnp.arange(n), times[:-1], times[1:]))
    return z
