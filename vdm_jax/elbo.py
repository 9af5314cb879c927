"""Whole ELBOs of a batch, term by term, and bits per dimension (MATH.md §5).

    -log p(x) <= L_prior + L_diffusion + L_recon
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from vdm_jax import _checks
from vdm_jax.diffusion import Prediction, check_prediction, eps_and_x, q_sample
from vdm_jax.losses import (ReverseVariance, check_variance, diffusion_loss, gaussian_decoder_nll,
                            prior_loss, reverse_log_variance, sample_times, vdm_decoder_nll, vlb_term)
from vdm_jax.pixels import pixels_to_data
from vdm_jax.schedules import DiscreteSchedule


def bits_per_dim(nats, dims: int) -> jax.Array:
    """bpd = NLL_nats / (D ln 2) (MATH.md §5). `dims` is D, the dimensions of one example."""
    dims = _checks.check_int("dims", dims, 1)
    return jnp.asarray(nats) / (dims * math.log(2.0))


def _decoder_log_variance(schedule: DiscreteSchedule, variance, v):
    """log σ_1² of DDPM's decoder: β_1 ('beta'), β̃_2 ('posterior', as improved-diffusion clips it),
    or their learned interpolation; β̃_1 = 0 would make the decoder degenerate."""
    log_beta_1 = jnp.log(schedule.betas[0])
    if schedule.T >= 2:
        log_tilde = reverse_log_variance(schedule.gamma(1), schedule.gamma(2), "posterior")
    else:
        log_tilde = log_beta_1
    if variance == "beta":
        return log_beta_1
    if variance == "posterior":
        return log_tilde
    return v * log_beta_1 + (1.0 - v) * log_tilde


def ddpm_log_variance(schedule: DiscreteSchedule, t, variance: ReverseVariance = "posterior", v=None) -> jax.Array:
    """log σ_t² of DDPM's reverse step p_θ(z_{t-1} | z_t) for integer t in 1..T (MATH.md §5).

    For t >= 2 this is `reverse_log_variance(γ_{t-1}, γ_t, variance, v)`. At t = 1 it is the
    decoder's variance: β_1 ('beta'), β̃_2 ('posterior', clipped as in improved-diffusion, since
    β̃_1 = 0 would make the decoder degenerate), or their interpolation by v ('learned').

    Args:
      schedule: the DiscreteSchedule.
      t: integer steps, scalar or [B].
      variance: 'posterior', 'beta' or 'learned'.
      v: the network's interpolation output for 'learned' ([B, ...] or broadcastable).
    Returns:
      log σ² of t's shape, or v's shape when v has more dimensions.
    """
    t = jnp.asarray(t)
    _checks.check_in_range("t", t, 1, schedule.T, f"1..T = 1..{schedule.T}")
    rev = reverse_log_variance(schedule.gamma(t - 1), schedule.gamma(t), variance, v)
    first = t == 1
    if jnp.ndim(rev) > first.ndim:
        first = first.reshape(first.shape + (1,) * (jnp.ndim(rev) - first.ndim))
    return jnp.where(first, _decoder_log_variance(schedule, variance, v), rev)


def ddpm_vlb(pred_fn: Callable, pixels, key, schedule: DiscreteSchedule, *,
             kind: Prediction = "eps", variance: ReverseVariance = "posterior") -> dict[str, jax.Array]:
    """DDPM's whole variational bound of a batch, every term (MATH.md §5, discrete time).

        L_prior = KL(q(z_T|x) ‖ N(0, I)),  L_{t-1} = E KL(q(z_{t-1}|z_t,x) ‖ p_θ(z_{t-1}|z_t)) for
        t = 2..T,  L_recon = -E log p(x|z_1) (discretised Gaussian decoder)

    Each of the T terms is one draw of z_t (a `lax.scan` over t, one network call per step).

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction` ([B, ...], t int32 [B]), or `(prediction, v)` for
        variance='learned'.
      pixels: integer images [B, ...] in 0..255 (data x = 2k/255 - 1, the 'ddpm' grid).
      key: PRNG key.
      schedule: the DiscreteSchedule.
      kind: what pred_fn predicts ('eps', 'x', 'score', 'v').
      variance: reverse variance σ_t²: 'posterior' (β̃_t), 'beta' (β_t) or 'learned'.
    Returns:
      dict with 'prior' [B], 'denoising' [B, T-1] (t = 2..T), 'reconstruction' [B] and
      'total' [B], all nats.
    """
    _checks.check_instance("schedule", schedule, DiscreteSchedule, "; for a continuous schedule use vdm_elbo")
    check_prediction(kind)
    check_variance(variance)
    _checks.check_batched("pixels", pixels)
    x = pixels_to_data(pixels, grid="ddpm", dtype=schedule.dtype)
    batch = x.shape[0]

    def term(_, t):
        t_vec = jnp.full((batch,), t, jnp.int32)
        gamma_s, gamma_t = schedule.gamma(t - 1), schedule.gamma(t)
        z_t = q_sample(x, jax.random.normal(jax.random.fold_in(key, t), x.shape, x.dtype), gamma_t)
        pred, v = _checks.split_prediction(pred_fn(z_t, t_vec), variance == "learned")
        _, x_hat = eps_and_x(pred, z_t, gamma_t, kind)
        log_var = ddpm_log_variance(schedule, t, variance, v)
        return None, vlb_term(x, pixels, z_t, x_hat, gamma_s, gamma_t, log_var)

    _, terms = jax.lax.scan(term, None, jnp.arange(1, schedule.T + 1))  # [T, B]
    prior = prior_loss(x, schedule.gamma(schedule.T))
    out = {"prior": prior, "denoising": terms[1:].T, "reconstruction": terms[0]}
    out["total"] = prior + terms.sum(axis=0)
    return out


def vdm_elbo(pred_fn: Callable, x, key, gamma_fn: Callable, *, T: int = 0, pixels=None,
             kind: Prediction = "eps", decoder: str = "vdm", low_discrepancy: bool = True) -> dict[str, jax.Array]:
    """VDM's ELBO of a batch, one draw of t and ε per example (Kingma et al. 2021; MATH.md §5).

        L_prior = KL(q(z_1|x) ‖ N(0, I)),  L_diffusion = L_T or L_∞ (`diffusion_loss`),
        L_recon = -E log p(x | z_0)

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction` ([B, ...], t float [B] in [0, 1]).
      x: data [B, ...] (on the 'vdm' grid for the 'vdm' decoder).
      key: PRNG key.
      gamma_fn: the schedule t -> γ(t) (finite at t = 0 and 1).
      T: number of steps, 0 for continuous time.
      pixels: integer pixels of x, needed by the 'vdm' decoder.
      kind: what pred_fn predicts.
      decoder: 'vdm' (256-way factorised) or 'gaussian' (continuous data, N(x; z_0/α_0, e^γ_0)).
      low_discrepancy: spread the batch's t evenly over [0, 1].
    Returns:
      dict of [B] nats: 'prior', 'diffusion', 'reconstruction', 'total'.
    """
    x = _checks.check_float("x", x)
    _checks.check_batched("x", x)
    check_prediction(kind)
    if decoder not in ("vdm", "gaussian"):
        raise ValueError(f"decoder must be 'vdm' or 'gaussian', got {decoder!r}.")
    if decoder == "vdm" and pixels is None:
        raise ValueError("the 'vdm' decoder needs the integer pixels: pass pixels=...")
    key_t, key_eps, key_0 = jax.random.split(key, 3)
    batch = x.shape[0]
    one, zero = jnp.ones((), x.dtype), jnp.zeros((), x.dtype)
    t = sample_times(key_t, batch, T=T, low_discrepancy=low_discrepancy, dtype=x.dtype)
    eps = jax.random.normal(key_eps, x.shape, x.dtype)
    gamma_t = gamma_fn(t)
    z_t = q_sample(x, eps, gamma_t)
    pred, _ = _checks.split_prediction(pred_fn(z_t, t), learned=False)
    eps_hat, _ = eps_and_x(pred, z_t, gamma_t, kind)
    gamma_0 = gamma_fn(zero)
    z_0 = q_sample(x, jax.random.normal(key_0, x.shape, x.dtype), gamma_0)
    recon = (vdm_decoder_nll(pixels, z_0, gamma_0) if decoder == "vdm"
             else gaussian_decoder_nll(x, z_0, gamma_0))
    out = {"prior": prior_loss(x, gamma_fn(one)),
           "diffusion": diffusion_loss(eps, eps_hat, t, gamma_fn, T),
           "reconstruction": recon}
    out["total"] = out["prior"] + out["diffusion"] + out["reconstruction"]
    return out
