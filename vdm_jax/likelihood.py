"""Exact log-likelihoods by the probability-flow ODE, and bits/dim of 8-bit pixels by uniform
dequantisation (docs/math.md §6.8).

The probability-flow ODE of §6.5, dz/dt = v(z, t) = ½ γ'(t) σ_t (ε̂ - σ_t z), carries the model's
density of z at t_min to the prior N(0, I) at t = 1, and the change of variables for an ODE gives

    log p_{t_min}(z_{t_min}) = log N(z_1; 0, I) + ∫_{t_min}^1 div v(z_t, t) dt.

`ode_log_likelihood` integrates z and that integral together with diffrax's adaptive Runge-Kutta
solvers, one solve per example (`jax.vmap`), so each example takes its own steps and its result
does not depend on the rest of the batch. `pred_fn(z_t, t)` follows the samplers' convention
(t a float [B] in [0, 1]; inside the per-example solve it is called with B = 1). A
DiscreteSchedule's ODE is solved in γ rather than t (its γ'(t) jumps at every step).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp

from vdm_jax import _checks
from vdm_jax.diffusion import Prediction
from vdm_jax.pixels import Grid
from vdm_jax.sampling import _prediction
from vdm_jax.schedules import DiscreteSchedule, alpha_sigma

DIVERGENCES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")
SOLVERS = ("tsit5", "dopri5")
# Both are 7-stage explicit Runge-Kutta methods with the first-same-as-last property: a step
# (accepted or rejected) costs 6 new evaluations of the vector field, the first one 7. (With dt0=None
# diffrax 0.7 starts with a step of 0.01 without evaluating anything: diffeqsolve wraps the term,
# and PIDController's initial-step rule only runs on a bare ODETerm.)
_NEW_STAGES = 6


def _check_t_min(t_min, gamma_fn) -> None:
    if jnp.ndim(t_min) != 0:
        raise TypeError(f"ode_log_likelihood: t_min must be a scalar time in [0, 1), got shape {jnp.shape(t_min)}.")
    value = _checks.host_value(t_min)  # a jax.Array is not read back
    if value is not None and (isinstance(t_min, bool) or not np.issubdtype(value.dtype, np.number)
                              or not 0.0 <= float(value) < 1.0):
        raise ValueError(f"ode_log_likelihood: t_min must be a real number in [0, 1), got {t_min!r}.")
    if value is not None and float(value) == 0.0 and isinstance(gamma_fn, DiscreteSchedule):
        raise ValueError("ode_log_likelihood: t_min must be > 0 with a DiscreteSchedule: its γ(0) = -inf (σ = 0, "
                         "the clean data), where the ODE's velocity is not defined; pass t_min > 0, e.g. "
                         "t_min=1e-3 (= 1/T for T = 1000).")


def _discrete_time_of_gamma(schedule: DiscreteSchedule, gamma):
    """The t with schedule(t) = γ, exactly: c = -log ᾱ = softplus(γ) is linear in t on each step."""
    c = jax.nn.softplus(gamma)
    cs = jax.nn.softplus(schedule.gammas)  # c_0 = 0, ..., c_T
    i = jnp.clip(jnp.searchsorted(cs, c, side="right") - 1, 0, schedule.T - 1)
    return (i + (c - cs[i]) / -jnp.log1p(-schedule.betas[i])) / schedule.T


def _clock(gamma_fn, s):
    """(t, γ, dγ/ds) at the solver's variable s: t itself (γ' by `jax.jvp` of gamma_fn, so learned
    schedules work too), or for a DiscreteSchedule γ itself (t from `_discrete_time_of_gamma`)."""
    if isinstance(gamma_fn, DiscreteSchedule):
        return _discrete_time_of_gamma(gamma_fn, s).astype(s.dtype), s, jnp.ones_like(s)
    gamma, dgamma = jax.jvp(gamma_fn, (s,), (jnp.ones_like(s),))
    return s, gamma, dgamma


def _velocity(pred_fn, gamma_fn, kind, z, s):
    """dz/ds = ½ (dγ/ds) σ (ε̂ - σ z) for one example z (no batch axis); s = t, or γ (discrete)."""
    t, gamma, dgamma = _clock(gamma_fn, s)
    sigma = alpha_sigma(gamma)[1]
    eps_hat = _prediction(pred_fn, z[None], t, gamma, kind, None)[0][0]
    return (0.5 * dgamma * sigma * (eps_hat - sigma * z)).astype(z.dtype)


def _field(pred_fn, gamma_fn, kind, divergence):
    """diffrax's vector field of the augmented state (z, ∫ div v), with the probes as its args."""
    def field(s, state, probes):
        z, _ = state
        velocity = lambda z: _velocity(pred_fn, gamma_fn, kind, z, s)
        if divergence == "exact":  # the Jacobian's trace: D forward-mode products, batched by jacfwd
            def flat(zf):  # (v, v): the Jacobian of the first and v itself from one evaluation
                v = velocity(zf.reshape(z.shape)).reshape(-1)
                return v, v
            jac, v = jax.jacfwd(flat, has_aux=True)(z.reshape(-1))
            return v.reshape(z.shape), jnp.trace(jac)
        v, jvp = jax.linearize(velocity, z)  # one evaluation, then εᵀ(∂v/∂z)ε for each probe ε
        return v, jnp.mean(jax.vmap(lambda e: jnp.sum(e * jvp(e)))(probes))
    return field


def ode_log_likelihood(pred_fn: Callable, gamma_fn: Callable, x, *, key, kind: Prediction = "eps",
                       t_min: float = 0.0, divergence: str = "hutchinson", probe: str = "rademacher",
                       num_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096,
                       solver: str = "tsit5") -> dict[str, jax.Array]:
    """log p(x) of data x under the probability-flow ODE's model (docs/math.md §6.8), per example.

    From z_{t_min} = α(t_min) x it integrates, from t = t_min to t = 1,

        dz/dt = v(z, t) = ½ γ'(t) σ_t (ε̂(z, t) - σ_t z),     dδ/dt = div v(z, t),   δ(t_min) = 0,

    and returns, with D the dimension of one example and z = α(t_min) x (so dz/dx = α(t_min) I),

        log p(x) = log N(z_1; 0, I) + δ(1) + D log α(t_min),    D log α = -(D/2) softplus(γ(t_min)).

    γ'(t) is `jax.jvp` of `gamma_fn`, so any continuous schedule works, learned ones too. A
    DiscreteSchedule's γ'(t) jumps at every grid point i/T (its -log ᾱ is linear on each step),
    which an adaptive solver's error estimate misses (0.04 nats wrong for T = 1000 at rtol = 1e-6);
    for it the same ODE is solved in γ itself, from γ(t_min) to γ(1): dz/dγ = ½ σ (ε̂ - σ z), with
    pred_fn called at the exact t(γ) of the piecewise schedule. The divergence is εᵀ(∂v/∂z)ε
    averaged over `num_probes` probes (Hutchinson; the same probes over the whole solve, each by
    one forward-mode product), or the trace of the whole Jacobian (`divergence='exact'`, D
    products per evaluation: for small D). Each example is solved
    on its own (`jax.vmap` of `diffrax.diffeqsolve` with `PIDController(rtol, atol)` and dt0=None),
    so it takes its own steps and its values do not depend on the other examples. An example that
    does not finish within `max_steps` steps gets NaN (device values are not read back).

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction`, t float [B] in [0, 1] (here called with B = 1).
      gamma_fn: the schedule t -> γ(t) (continuous, learned, or a DiscreteSchedule with t_min > 0).
      x: data [B, ...] (floating; its dtype is the solve's).
      key: PRNG key of the probes: shape [B, num_probes, ...], Rademacher (±1) or standard normal.
      kind: what pred_fn predicts ('eps', 'x', 'score' or 'v').
      t_min: the time the likelihood is taken at, in [0, 1); > 0 for a DiscreteSchedule (γ(0) = -inf).
      divergence: 'hutchinson' (an unbiased estimate) or 'exact' (the Jacobian's trace).
      probe: 'rademacher' or 'gaussian' (Hutchinson's probes).
      num_probes: probes per example, >= 1.
      rtol, atol: the step-size controller's tolerances (on z and δ).
      max_steps: most solver steps per example (the first step is 0.01 in t, or in γ).
      solver: 'tsit5' (Tsitouras 5(4)) or 'dopri5' (Dormand-Prince 5(4)).
    Returns:
      dict of [B] arrays: 'log_likelihood' log p(x) (nats), 'prior' log N(z_1; 0, I), 'delta' δ(1),
      'num_steps' the solver's steps (accepted and rejected), 'nfe' its evaluations of the vector
      field, 6 num_steps + 1 (both solvers are 7-stage and first-same-as-last: 6 new stages per
      step, and the first stage of the first; diffrax evaluates that stage again after each
      rejection of the first step, which the count leaves out). Each evaluation is one call of
      pred_fn and its forward-mode products (num_probes of them, or D for 'exact').
    """
    import diffrax  # on first use: it adds about a second to `import vdm_jax`

    _checks.arguments("ode_log_likelihood", x=x, kind=kind, divergence=divergence, probe=probe, num_probes=num_probes,
                      rtol=rtol, atol=atol, max_steps=max_steps, solver=solver)
    _check_t_min(t_min, gamma_fn)
    x = jnp.asarray(x)
    dtype = x.dtype
    shape, dims = x.shape[1:], int(np.prod(x.shape[1:], dtype=np.int64))
    t_0 = jnp.asarray(t_min, dtype)
    gamma_0 = gamma_fn(t_0)
    discrete = isinstance(gamma_fn, DiscreteSchedule)
    s_0, s_1 = (gamma_0, gamma_fn(jnp.ones((), dtype))) if discrete else (t_0, jnp.ones((), dtype))
    # pred_fn's output is checked once on the whole batch (tracing only), with the samplers' messages.
    out = jax.eval_shape(pred_fn, x, jnp.zeros(x.shape[:1], dtype))
    _checks.split_prediction(out, x, False)
    if divergence == "exact":
        probes = None
    elif probe == "rademacher":
        probes = jax.random.rademacher(key, (x.shape[0], num_probes) + shape, dtype)
    else:
        probes = jax.random.normal(key, (x.shape[0], num_probes) + shape, dtype)
    term = diffrax.ODETerm(_field(pred_fn, gamma_fn, kind, divergence))
    method = diffrax.Tsit5() if solver == "tsit5" else diffrax.Dopri5()
    controller = diffrax.PIDController(rtol=rtol, atol=atol)

    def solve(z_0, probes):
        sol = diffrax.diffeqsolve(term, method, s_0, s_1, None, (z_0, jnp.zeros((), dtype)), probes,
                                  saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller,
                                  max_steps=max_steps, throw=False)
        ok = sol.result == diffrax.RESULTS.successful
        return sol.ys[0][0], jnp.where(ok, sol.ys[1][0], jnp.nan), sol.stats["num_steps"]

    z_1, delta, num_steps = jax.vmap(solve)(alpha_sigma(gamma_0)[0] * x, probes)
    prior = -0.5 * (dims * jnp.log(2 * jnp.pi).astype(dtype) + jnp.sum(jnp.square(z_1).reshape(x.shape[0], -1), -1))
    log_alpha = -0.5 * jax.nn.softplus(gamma_0)
    num_steps = num_steps.astype(jnp.int32)
    return {"log_likelihood": prior + delta + dims * log_alpha, "prior": prior, "delta": delta,
            "num_steps": num_steps, "nfe": _NEW_STAGES * num_steps + 1}


def _bins(pixels, grid: Grid, dtype):
    """(lower edge, width) of each pixel's bin in [-1, 1] (docs/math.md §6.8)."""
    k = pixels.astype(dtype)
    if grid == "vdm":  # 256 equal bins, centred on 2(k + ½)/256 - 1
        return 2.0 * k / 256.0 - 1.0, jnp.full_like(k, 2.0 / 256.0)
    end = (pixels == 0) | (pixels == 255)  # DDPM's bins [x_k ± 1/255], the two end ones cut at ±1
    width = jnp.where(end, 1.0 / 255.0, 2.0 / 255.0).astype(dtype)
    return jnp.where(pixels == 0, -1.0, (2.0 * k - 1.0) / 255.0 - 1.0).astype(dtype), width


def dequantized_bits_per_dim(pred_fn: Callable, gamma_fn: Callable, pixels, *, key, grid: Grid = "ddpm",
                             num_draws: int = 1, **ode_kwargs) -> dict[str, jax.Array]:
    """Bits/dim of 8-bit pixels by uniform dequantisation and `ode_log_likelihood` (docs/math.md §6.8).

    Each pixel value k owns a bin of [-1, 1] around its grid value, [lo_k, lo_k + w_k): 'vdm',
    w = 2/256 (lo_k = 2k/256 - 1); 'ddpm', DDPM's decoder bins x_k ± 1/255 (x_k = 2k/255 - 1) with
    the two end ones cut at ±1, so w = 2/255, and 1/255 for k = 0 and 255. With y = k + u,
    u ~ U[0, 1)^D, the data x = lo_k + w_k u has dx/dy = diag(w_k), and since the bins tile [-1, 1],

        log P(k) >= E_u[log p(x)] + Σ_d log w_{k_d}  =: -D ln 2 · bits_per_dim   (Jensen),

    averaged over `num_draws` draws of u. With the same draws, the importance-weighted estimate
    log P(k) >= E[log mean_n exp(log p(x_n))] + Σ_d log w_{k_d} (log-mean-exp over the draws) is
    tighter: bits_per_dim_iw <= bits_per_dim, equal for one draw. The data are in the default float
    dtype (float64 with x64).

    Args:
      pred_fn, gamma_fn: as in `ode_log_likelihood`.
      pixels: integer [B, ...] in 0..255.
      key: PRNG key: draw n uses `jax.random.split(jax.random.fold_in(key, n))`, u from the first
        key (`jax.random.uniform` of the pixels' shape) and the probes from the second.
      grid: 'ddpm' or 'vdm' (the model's data grid, docs/math.md §5.9).
      num_draws: dequantisation draws per example, >= 1.
      **ode_kwargs: `ode_log_likelihood`'s options (kind, t_min, divergence, probe, num_probes,
        rtol, atol, max_steps, solver).
    Returns:
      dict of [B] arrays: 'bits_per_dim' (the mean over draws), 'bits_per_dim_iw' (importance
      weighted), 'log_jacobian' Σ_d log w_{k_d} (nats), 'nfe' the vector field's evaluations over
      all draws, and the three terms of 'bits_per_dim' (they add up to it): 'prior_bpd' (of
      log N(z_1; 0, I)), 'flow_bpd' (of the divergence integral and D log α(t_min)) and
      'dequantization_bpd' (of log_jacobian), each averaged over the draws.
    """
    _checks.arguments("dequantized_bits_per_dim", pixels=pixels, grid=grid, num_draws=num_draws)
    pixels = jnp.asarray(pixels)
    dtype = jax.dtypes.canonicalize_dtype(float)
    lo, width = _bins(pixels, grid, dtype)
    batch = pixels.shape[0]
    dims = int(np.prod(pixels.shape[1:], dtype=np.int64))
    log_jacobian = jnp.sum(jnp.log(width).reshape(batch, -1), -1)

    def draw(n):
        key_u, key_ode = jax.random.split(jax.random.fold_in(key, n))
        x = lo + width * jax.random.uniform(key_u, pixels.shape, dtype)
        out = ode_log_likelihood(pred_fn, gamma_fn, x, key=key_ode, **ode_kwargs)
        return out["log_likelihood"], out["prior"], out["nfe"]

    log_p, prior, nfe = jax.lax.map(draw, jnp.arange(num_draws))  # [num_draws, B]
    scale = -1.0 / (dims * np.log(2.0))
    log_mean = jax.nn.logsumexp(log_p, axis=0) - np.log(num_draws)
    return {"bits_per_dim": scale * (jnp.mean(log_p, axis=0) + log_jacobian),
            "bits_per_dim_iw": scale * (log_mean + log_jacobian),
            "log_jacobian": log_jacobian, "nfe": jnp.sum(nfe, axis=0),
            "prior_bpd": scale * jnp.mean(prior, axis=0), "flow_bpd": scale * jnp.mean(log_p - prior, axis=0),
            "dequantization_bpd": scale * log_jacobian}
