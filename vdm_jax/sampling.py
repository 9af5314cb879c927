"""Samplers: DDPM ancestral, VDM continuous-time ancestral, DDIM (docs/math.md §6).

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
from vdm_jax.diffusion import PREDICTIONS, Prediction, eps_and_x, q_posterior
from vdm_jax.losses import VARIANCES, ReverseVariance, reverse_log_variance
from vdm_jax.schedules import DiscreteSchedule, alpha_sigma


def _sample_shape(name, shape, args):
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"{name} must be a tuple of ints [B, ...], got {shape!r}.")
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be a non-empty tuple of positive sizes [B, ...], got {tuple(shape)}.")


def _clip(name, clip_x, args):
    if clip_x is not None and not (isinstance(clip_x, (tuple, list)) and len(clip_x) == 2
                                   and clip_x[0] < clip_x[1]):
        raise ValueError(f"{name} must be None or a pair (lo, hi) with lo < hi, got {clip_x!r}.")


def _scalar(name, step, args):
    if jnp.ndim(step) != 0:
        raise TypeError(f"{name} must be a scalar integer step in 1..T, got shape {jnp.shape(step)}.")


_COMMON = dict(shape=_sample_shape, clip_x=_clip, kind=_checks.one_of(*PREDICTIONS))
_DISCRETE = _checks.instance(DiscreteSchedule, "; for a continuous schedule use vdm_sample or ddim_sample")


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


@_checks.boundary(schedule=_DISCRETE, variance=_checks.one_of(*VARIANCES), **_COMMON)
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
    dtype = dtype or schedule.dtype
    key_init, key_steps = jax.random.split(key)
    z_T = jax.random.normal(key_init, tuple(shape), dtype)

    def step(z, i):
        return ddpm_step(pred_fn, schedule, z, i, key=key_steps, kind=kind, variance=variance, clip_x=clip_x), None

    z_0, _ = jax.lax.scan(step, z_T, jnp.arange(schedule.T, 0, -1))
    return (z_0, z_0) if return_latent else z_0


@_checks.boundary(arrays=("z",), ints=("step",), schedule=_DISCRETE, variance=_checks.one_of(*VARIANCES),
                  step=(_scalar, _checks.in_range(1, lambda args: args["schedule"].T, "1..T = {lo}..{hi}")),
                  clip_x=_clip, kind=_checks.one_of(*PREDICTIONS))
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
    gamma_s, gamma_t = schedule.gamma_step(step - 1), schedule.gamma_step(step)
    t = step.astype(z.dtype) / schedule.T
    _, x_hat, v = _prediction(pred_fn, z, t, gamma_t, kind, clip_x, variance == "learned")
    mean, _ = q_posterior(x_hat, z, gamma_s, gamma_t)
    std = jnp.where(step > 1, jnp.exp(0.5 * reverse_log_variance(gamma_s, gamma_t, kind=variance, v=v)), 0.0)
    noise = jax.random.normal(jax.random.fold_in(key, step), z.shape, z.dtype)
    return (mean + std * noise).astype(z.dtype)


@_checks.boundary(sample_steps=_checks.int_at_least(1), **_COMMON)
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
    T, sample_steps = _checks.check_int("T", T, 1), _checks.check_int("sample_steps", sample_steps, 1)
    if not sample_steps <= T:
        raise ValueError(f"sample_steps must be in 1..T = 1..{T}, got {sample_steps}.")
    steps = np.round(np.linspace(T, 0, sample_steps + 1))
    return (steps / T).astype(np.float32)


def _times(name, times, args):
    if jnp.ndim(times) != 1 or jnp.shape(times)[0] < 2:
        raise ValueError(f"{name} must be a 1-D array of at least 2 times (t_N > ... > t_0), got shape "
                         f"{jnp.shape(times)}.")
    value = _checks.host_value(times)
    if value is not None and not np.all(np.diff(value) < 0):
        raise ValueError(f"{name} must be strictly decreasing, got {value.tolist()}.")


@_checks.boundary(floats=("times",), times=(_times, _checks.in_range(0.0, 1.0)), eta=_checks.in_range(0.0, 1.0),
                  **_COMMON)
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
    shape = tuple(shape)
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
