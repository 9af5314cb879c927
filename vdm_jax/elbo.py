"""Whole ELBOs of a batch, term by term, and bits per dimension (docs/math.md §5).

    -log p(x) <= L_prior + L_diffusion + L_recon

Both ELBOs take the data x [B, ...]; their discrete decoders read the pixels off it, so x must lie
on the decoder's grid (`pixels_to_data(pixels, grid=...)`).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from vdm_jax import _checks
from vdm_jax.diffusion import Prediction, eps_and_x, q_sample
from vdm_jax.losses import (ReverseVariance, diffusion_loss, gaussian_decoder_nll, prior_loss, reverse_log_variance,
                            sample_times, vdm_decoder_nll, vlb_term)
from vdm_jax.schedules import DiscreteSchedule


def bits_per_dim(nats, dims: int) -> jax.Array:
    """bpd = NLL_nats / (D ln 2) (docs/math.md §5.10). `dims` is D, the dimensions of one example."""
    return nats / (dims * math.log(2.0))


def _decoder_log_variance(schedule: DiscreteSchedule, variance, v):
    """log σ_1² of DDPM's decoder: β_1 ('beta'), β̃_2 ('posterior', as improved-diffusion clips it),
    or their learned interpolation; β̃_1 = 0 would make the decoder degenerate."""
    log_beta_1 = jnp.log(schedule.betas[0])
    if schedule.T >= 2:
        log_tilde = reverse_log_variance(schedule.gamma_step(1), schedule.gamma_step(2), kind="posterior")
    else:
        log_tilde = log_beta_1
    if variance == "beta":
        return log_beta_1
    if variance == "posterior":
        return log_tilde
    return v * log_beta_1 + (1.0 - v) * log_tilde


def ddpm_log_variance(schedule: DiscreteSchedule, step, *, variance: ReverseVariance = "posterior",
                      v=None) -> jax.Array:
    """log σ² of DDPM's reverse step p_θ(z_{i-1} | z_i) for integer steps i in 1..T (docs/math.md §5.7).

    For i >= 2 this is `reverse_log_variance(γ_{i-1}, γ_i, kind=variance, v=v)`. At i = 1 it is the
    decoder's variance: β_1 ('beta'), β̃_2 ('posterior', clipped as in improved-diffusion, since
    β̃_1 = 0 would make the decoder degenerate), or their interpolation by v ('learned').

    Args:
      schedule: the DiscreteSchedule.
      step: integer steps i, scalar or [B].
      variance: 'posterior', 'beta' or 'learned'.
      v: the network's interpolation output for 'learned', [B, ...].
    Returns:
      log σ² of step's shape, or v's shape when v is given.
    """
    _checks.arguments("ddpm_log_variance", schedule=schedule, variance=variance)
    step = jnp.asarray(step)
    rev = reverse_log_variance(schedule.gamma_step(step - 1), schedule.gamma_step(step), kind=variance, v=v)
    first = step == 1
    if jnp.ndim(rev) > first.ndim:
        first = first.reshape(first.shape + (1,) * (jnp.ndim(rev) - first.ndim))
    return jnp.where(first, _decoder_log_variance(schedule, variance, v), rev)


def ddpm_vlb(pred_fn: Callable, x, schedule: DiscreteSchedule, *, key, kind: Prediction = "eps",
             variance: ReverseVariance = "posterior") -> dict[str, jax.Array]:
    """DDPM's whole variational bound of a batch, every term (docs/math.md §5.7).

        L_prior = KL(q(z_T|x) ‖ N(0, I)),  L_{i-1} = E KL(q(z_{i-1}|z_i,x) ‖ p_θ(z_{i-1}|z_i)) for
        i = 2..T,  L_recon = -E log p(x|z_1) (discretised Gaussian decoder)

    Each of the T terms is one draw of z_i (a `lax.scan` over the steps, one network call each).

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction` with t = i/T, float [B] in [0, 1]; or
        `(prediction, v)` for variance='learned'.
      x: data [B, ...] on the 'ddpm' grid (`pixels_to_data(pixels, grid='ddpm')`).
      schedule: the DiscreteSchedule.
      key: PRNG key.
      kind: what pred_fn predicts ('eps', 'x', 'score', 'v').
      variance: reverse variance σ_i²: 'posterior' (β̃_i), 'beta' (β_i) or 'learned'.
    Returns:
      dict with 'prior' [B], 'denoising' [B, T-1] (i = 2..T), 'reconstruction' [B] and
      'total' [B], all nats.
    """
    _checks.arguments("ddpm_vlb", x=x, schedule=schedule, kind=kind, variance=variance)
    _checks.on_grid("ddpm_vlb", x, "ddpm")
    x = jnp.asarray(x)

    def term(_, step):
        gamma_s, gamma_t = schedule.gamma_step(step - 1), schedule.gamma_step(step)
        z_t = q_sample(x, jax.random.normal(jax.random.fold_in(key, step), x.shape, x.dtype), gamma_t)
        t = jnp.full(x.shape[:1], step, x.dtype) / schedule.T
        pred, v = _checks.split_prediction(pred_fn(z_t, t), z_t, variance == "learned")
        _, x_hat = eps_and_x(pred, z_t, gamma_t, kind=kind)
        log_var = ddpm_log_variance(schedule, step, variance=variance, v=v)
        return None, vlb_term(x_hat, x, z_t, gamma_s, gamma_t, log_var)

    _, terms = jax.lax.scan(term, None, jnp.arange(1, schedule.T + 1))  # [T, B]
    prior = prior_loss(x, schedule.gamma_step(schedule.T))
    out = {"prior": prior, "denoising": terms[1:].T, "reconstruction": terms[0]}
    out["total"] = prior + terms.sum(axis=0)
    return out


def vdm_elbo(pred_fn: Callable, x, gamma_fn: Callable, *, key, T: int = 0, kind: Prediction = "eps",
             decoder: str = "vdm", low_discrepancy: bool = True) -> dict[str, jax.Array]:
    """VDM's ELBO of a batch, one draw of t and ε per example (Kingma et al. 2021; docs/math.md §5.13).

        L_prior = KL(q(z_1|x) ‖ N(0, I)),  L_diffusion = L_T or L_∞ (`diffusion_loss`),
        L_recon = -E log p(x | z_0)

    Args:
      pred_fn: `pred_fn(z_t, t) -> prediction`, t float [B] in [0, 1].
      x: data [B, ...] (on the 'vdm' grid for the 'vdm' decoder).
      gamma_fn: the schedule t -> γ(t) (finite at t = 0 and 1).
      key: PRNG key.
      T: number of steps, 0 for continuous time.
      kind: what pred_fn predicts.
      decoder: 'vdm' (256-way factorised, reads the pixels off x) or 'gaussian' (continuous data,
        N(x; z_0/α_0, e^γ_0)).
      low_discrepancy: spread the batch's t evenly over [0, 1].
    Returns:
      dict of [B] nats: 'prior', 'diffusion', 'reconstruction', 'total'.
    """
    _checks.arguments("vdm_elbo", x=x, T=T, kind=kind, decoder=decoder)
    if decoder == "vdm":
        _checks.on_grid("vdm_elbo", x, "vdm")
    x = jnp.asarray(x)
    key_t, key_eps, key_0 = jax.random.split(key, 3)
    t = sample_times(x.shape[0], key=key_t, T=T, low_discrepancy=low_discrepancy, dtype=x.dtype)
    eps = jax.random.normal(key_eps, x.shape, x.dtype)
    gamma_t = gamma_fn(t)
    z_t = q_sample(x, eps, gamma_t)
    pred, _ = _checks.split_prediction(pred_fn(z_t, t), z_t, learned=False)
    eps_hat, _ = eps_and_x(pred, z_t, gamma_t, kind=kind)
    gamma_0, gamma_1 = gamma_fn(jnp.zeros((), x.dtype)), gamma_fn(jnp.ones((), x.dtype))
    z_0 = q_sample(x, jax.random.normal(key_0, x.shape, x.dtype), gamma_0)
    decoder_nll = vdm_decoder_nll if decoder == "vdm" else gaussian_decoder_nll
    out = {"prior": prior_loss(x, gamma_1),
           "diffusion": diffusion_loss(eps_hat, eps, t, gamma_fn, T=T),
           "reconstruction": decoder_nll(z_0, x, gamma_0)}
    out["total"] = out["prior"] + out["diffusion"] + out["reconstruction"]
    return out
